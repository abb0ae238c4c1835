# SPDX-License-Identifier: Apache-2.0
"""ctypes view of libnccl-net-moe.so: the C structs and constants of
include/nccl_moe.h, the function prototypes, where the library is looked for,
and how an ncclResult_t becomes a Python exception.

This module needs no torch, so the layout checks of tests/python run anywhere.
The structs must match the C header byte for byte; tests/python/test_bindings.py
compiles a small C program against the header and compares every size and
offset.
"""

from __future__ import annotations

import ctypes
import os
import threading

from ._version import VERSION_TUPLE

# ------------------------------------------------- constants of nccl_moe.h
# The header this module mirrors, of this package's version (meson.build). A
# library of another major.minor may lay its structs out differently, so
# loading one is refused (see Library.__init__).
NCCL_MOE_MAJOR, NCCL_MOE_MINOR, NCCL_MOE_PATCH = VERSION_TUPLE


def version_code(major: int, minor: int, patch: int) -> int:
    """NCCL_MOE_VERSION(X, Y, Z)."""
    return major * 10000 + minor * 100 + patch


NCCL_MOE_VERSION_CODE = version_code(NCCL_MOE_MAJOR, NCCL_MOE_MINOR, NCCL_MOE_PATCH)

FP8_BLOCK = 128          # NCCL_MOE_FP8_BLOCK: channels per FP8 scale
FP8_MAX = 448.0          # NCCL_MOE_FP8_MAX
MAX_TOPK = 16            # NCCL_MOE_MAX_TOPK
MAX_RANKS = 64           # NCCL_MOE_MAX_RANKS
MAX_EXPERTS = 1024       # NCCL_MOE_MAX_EXPERTS
ALIGN = 16               # NCCL_MOE_ALIGN: bytes of every row and pointer
CONFIG_MAGIC = 0x4D6F4543  # NCCL_MOE_CONFIG_MAGIC ("MoEC")

# ncclMoeScaleFormat_t
SCALE_FLOAT = 0
SCALE_POW2 = 1
SCALE_UE8M0 = 2  # low-latency dispatch only

# ncclMoeScaleLayout_t (added after 0.2.0)
SCALE_ROW_MAJOR = 0
SCALE_COL_MAJOR = 1
SCALE_TOKEN_ALIGN = 4    # NCCL_MOE_SCALE_TOKEN_ALIGN: column-major columns padded to this many elements
MAX_CALL_SMS = 1024      # NCCL_MOE_MAX_CALL_SMS: largest per-call numSMs

LL_MAX_TOKENS = 4096     # NCCL_MOE_LL_MAX_TOKENS: largest config.llMaxTokensPerRank
UE8M0_PER_WORD = 4       # UE8M0 scale bytes per 32-bit word

# The same limits the C entry points check (core/moe_ops.c, moe_config.c):
# checking them here too means a bad argument fails before any virtual rank
# has started waiting for its peers on the GPU.
DEFAULT_TOPK = 8
MAX_EXPERT_ALIGNMENT = 1 << 16
MAX_TOKENS_PER_RANK = 1 << 20
MAX_HIDDEN = 65536
INT_MAX = 2**31 - 1

# ---------------------------------------------------- constants of nccl.h
ncclSuccess = 0
ncclUnhandledCudaError = 1
ncclSystemError = 2
ncclInternalError = 3
ncclInvalidArgument = 4
ncclInvalidUsage = 5
ncclRemoteError = 6
ncclInProgress = 7

RESULT_NAMES = {
    ncclSuccess: "ncclSuccess",
    ncclUnhandledCudaError: "ncclUnhandledCudaError",
    ncclSystemError: "ncclSystemError",
    ncclInternalError: "ncclInternalError",
    ncclInvalidArgument: "ncclInvalidArgument",
    ncclInvalidUsage: "ncclInvalidUsage",
    ncclRemoteError: "ncclRemoteError",
    ncclInProgress: "ncclInProgress",
}

ncclFloat32 = 7
ncclBfloat16 = 9
ncclFloat8e4m3 = 10

# ------------------------------------------------------------ C structs
# Pointers are c_void_p so that Python sees plain integer addresses; enums
# are C ints.


class Config(ctypes.Structure):
    """ncclMoeConfig_t."""

    _fields_ = [
        ("size", ctypes.c_size_t),
        ("magic", ctypes.c_uint),
        ("version", ctypes.c_uint),
        ("maxTokensPerRank", ctypes.c_int),
        ("hidden", ctypes.c_int),
        ("numExperts", ctypes.c_int),
        ("maxTopk", ctypes.c_int),
        ("maxRecvTokens", ctypes.c_int),
        ("numSMs", ctypes.c_int),
        ("timeoutMs", ctypes.c_int),
        # Low-latency buffers (0: none). Libraries older than this field read
        # it as the struct's tail padding: sizeof is 48 bytes either way.
        ("llMaxTokensPerRank", ctypes.c_int),
    ]


def config_initializer() -> Config:
    """NCCL_MOE_CONFIG_INITIALIZER: size, magic and version set, the rest 0."""
    c = Config()
    c.size = ctypes.sizeof(Config)
    c.magic = CONFIG_MAGIC
    c.version = NCCL_MOE_VERSION_CODE
    return c


class DispatchArgs(ctypes.Structure):
    """ncclMoeDispatchArgs_t."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("xType", ctypes.c_int),
        ("xScales", ctypes.c_void_p),
        ("sendType", ctypes.c_int),
        ("scaleFormat", ctypes.c_int),
        ("numTokens", ctypes.c_int),
        ("hidden", ctypes.c_int),
        ("topk", ctypes.c_int),
        ("topkIdx", ctypes.c_void_p),
        ("topkWeights", ctypes.c_void_p),
        ("capacity", ctypes.c_int),
        ("expertAlignment", ctypes.c_int),
        ("reuseHandle", ctypes.c_int),
        # Added after 0.2.0 (0: the earlier behaviour).
        ("scaleLayout", ctypes.c_int),
        ("sendOnly", ctypes.c_int),
        ("numSMs", ctypes.c_int),
    ]


class DispatchResult(ctypes.Structure):
    """ncclMoeDispatchResult_t."""

    _fields_ = [
        ("recvX", ctypes.c_void_p),
        ("recvScales", ctypes.c_void_p),
        ("recvTopkIdx", ctypes.c_void_p),
        ("recvTopkWeights", ctypes.c_void_p),
        ("recvCount", ctypes.c_void_p),
        ("recvTokensPerExpert", ctypes.c_void_p),
        ("numRecv", ctypes.c_int),
        ("hostRecvTokensPerExpert", ctypes.c_void_p),
        ("scaleTokenStride", ctypes.c_int),
    ]


class CombineArgs(ctypes.Structure):
    """ncclMoeCombineArgs_t."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("hidden", ctypes.c_int),
        ("topkWeights", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("outTopkWeights", ctypes.c_void_p),
        ("bias0", ctypes.c_void_p),
        ("bias1", ctypes.c_void_p),
        ("sendOnly", ctypes.c_int),
        ("numSMs", ctypes.c_int),
    ]


class LowLatencyDispatchArgs(ctypes.Structure):
    """ncclMoeLowLatencyDispatchArgs_t."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("numTokens", ctypes.c_int),
        ("hidden", ctypes.c_int),
        ("topk", ctypes.c_int),
        ("topkIdx", ctypes.c_void_p),
        ("sendType", ctypes.c_int),
        ("scaleFormat", ctypes.c_int),
        ("cumulativeRecvCount", ctypes.c_void_p),
        ("sendOnly", ctypes.c_int),
        ("scaleLayout", ctypes.c_int),
        ("cumulativeRecvCount32", ctypes.c_void_p),
    ]


class LowLatencyDispatchResult(ctypes.Structure):
    """ncclMoeLowLatencyDispatchResult_t."""

    _fields_ = [
        ("recvX", ctypes.c_void_p),
        ("recvScales", ctypes.c_void_p),
        ("scaleStride", ctypes.c_int),
        ("recvCountPerExpert", ctypes.c_void_p),
        ("recvSource", ctypes.c_void_p),
        ("expertStride", ctypes.c_int),
        ("numLocalExperts", ctypes.c_int),
        ("scaleTokenStride", ctypes.c_int),
    ]


class LowLatencyCombineArgs(ctypes.Structure):
    """ncclMoeLowLatencyCombineArgs_t."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("topkWeights", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("sendOnly", ctypes.c_int),
    ]


# The structs the layout test checks against the header, by C type name.
STRUCTS = {
    "ncclMoeConfig_t": Config,
    "ncclMoeDispatchArgs_t": DispatchArgs,
    "ncclMoeDispatchResult_t": DispatchResult,
    "ncclMoeCombineArgs_t": CombineArgs,
    "ncclMoeLowLatencyDispatchArgs_t": LowLatencyDispatchArgs,
    "ncclMoeLowLatencyDispatchResult_t": LowLatencyDispatchResult,
    "ncclMoeLowLatencyCombineArgs_t": LowLatencyCombineArgs,
}

# Constants the layout test checks against the header (C expression -> value).
CONSTANTS = {
    "NCCL_MOE_VERSION_CODE": NCCL_MOE_VERSION_CODE,
    "NCCL_MOE_FP8_BLOCK": FP8_BLOCK,
    "NCCL_MOE_MAX_TOPK": MAX_TOPK,
    "NCCL_MOE_MAX_RANKS": MAX_RANKS,
    "NCCL_MOE_MAX_EXPERTS": MAX_EXPERTS,
    "NCCL_MOE_ALIGN": ALIGN,
    "NCCL_MOE_CONFIG_MAGIC": CONFIG_MAGIC,
    "(int)ncclMoeScaleFloat": SCALE_FLOAT,
    "(int)ncclMoeScalePow2": SCALE_POW2,
    "(int)ncclMoeScaleUE8M0": SCALE_UE8M0,
    "(int)ncclMoeScaleRowMajor": SCALE_ROW_MAJOR,
    "(int)ncclMoeScaleColMajor": SCALE_COL_MAJOR,
    "NCCL_MOE_SCALE_TOKEN_ALIGN": SCALE_TOKEN_ALIGN,
    "NCCL_MOE_MAX_CALL_SMS": MAX_CALL_SMS,
    "NCCL_MOE_LL_MAX_TOKENS": LL_MAX_TOKENS,
    "NCCL_MOE_HAS_LOW_LATENCY": 1,
    "(int)ncclFloat32": ncclFloat32,
    "(int)ncclBfloat16": ncclBfloat16,
    "(int)ncclFloat8e4m3": ncclFloat8e4m3,
    "(int)ncclSuccess": ncclSuccess,
    "(int)ncclUnhandledCudaError": ncclUnhandledCudaError,
    "(int)ncclSystemError": ncclSystemError,
    "(int)ncclInternalError": ncclInternalError,
    "(int)ncclInvalidArgument": ncclInvalidArgument,
    "(int)ncclInvalidUsage": ncclInvalidUsage,
    "(int)ncclRemoteError": ncclRemoteError,
    "(int)ncclInProgress": ncclInProgress,
}
# Compared as fp32 values: the C constant is a float.
FLOAT_CONSTANTS = {"NCCL_MOE_FP8_MAX": FP8_MAX}

# --------------------------------------------------------------- errors


class NcclMoeError(RuntimeError):
    """A call into libnccl-net-moe.so failed. `result` is the ncclResult_t
    value, `result_name` its name; the message includes the library's own
    explanation (ncclMoeGetLastError)."""

    def __init__(self, result: int, message: str):
        self.result = int(result)
        self.result_name = RESULT_NAMES.get(self.result, "ncclResult_t %d" % self.result)
        super().__init__(message)


class NcclMoeArgumentError(NcclMoeError, ValueError):
    """The library rejected an argument (ncclInvalidArgument), or a kernel
    recorded a bad batch (expert id out of range, receive capacity exceeded,
    ranks disagreeing on hidden/topk/send type)."""


class LibraryNotFoundError(OSError):
    """libnccl-net-moe.so could not be found or loaded."""


def make_error(result: int, what: str, detail: str) -> NcclMoeError:
    name = RESULT_NAMES.get(int(result), "ncclResult_t %d" % result)
    msg = "%s failed: %s" % (what, name)
    if detail:
        msg += ": " + detail
    cls = NcclMoeArgumentError if result == ncclInvalidArgument else NcclMoeError
    return cls(result, msg)


# ---------------------------------------------------------- the library
LIBRARY_NAME = "libnccl-net-moe.so"
LIBRARY_ENV = "NCCL_MOE_LIBRARY"

_c_int_p = ctypes.POINTER(ctypes.c_int)
_c_size_p = ctypes.POINTER(ctypes.c_size_t)
_c_void_pp = ctypes.POINTER(ctypes.c_void_p)

# name -> (restype, argtypes); every ncclResult_t is a C int.
PROTOTYPES = {
    "ncclMoeGetVersion": (ctypes.c_int, [_c_int_p]),
    "ncclMoeGetLastError": (ctypes.c_char_p, []),
    "ncclMoeCommInit": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(Config), _c_void_pp]),
    "ncclMoeCommInitVirtual": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.POINTER(Config), _c_void_pp]),
    "ncclMoeCommDestroy": (ctypes.c_int, [ctypes.c_void_p]),
    "ncclMoeCommBufferBytes": (ctypes.c_int, [ctypes.c_void_p, _c_size_p]),
    "ncclMoeCommQuery": (ctypes.c_int, [ctypes.c_void_p, _c_int_p, _c_int_p, _c_int_p, _c_int_p,
                                        ctypes.POINTER(Config)]),
    "ncclMoeCommGetAsyncError": (ctypes.c_int, [ctypes.c_void_p, _c_int_p]),
    "ncclMoeGetDispatchLayout": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                                ctypes.c_void_p]),
    "ncclMoeHandleCreate": (ctypes.c_int, [ctypes.c_void_p, _c_void_pp]),
    "ncclMoeHandleDestroy": (ctypes.c_int, [ctypes.c_void_p]),
    "ncclMoeDispatch": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(DispatchArgs), ctypes.c_void_p,
                                       ctypes.POINTER(DispatchResult), ctypes.c_void_p]),
    "ncclMoeGetCombineBuffer": (ctypes.c_int, [ctypes.c_void_p, _c_void_pp, _c_size_p]),
    "ncclMoeCombine": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(CombineArgs), ctypes.c_void_p,
                                      ctypes.c_void_p]),
}

# ncclMoeAllGatherFn_t: int (*)(const void* send, void* recv, size_t bytes, void* ctx).
AllGatherFn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)

# Bound when the library has them (newer than the 0.1 core API).
OPTIONAL_PROTOTYPES = {
    # Virtual ranks grouped into virtual nodes that talk through the network
    # transport (single-GPU development of the internode path).
    "ncclMoeCommInitVirtualNodes": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                                   ctypes.POINTER(Config), _c_void_pp]),
    # Split halves of normal-mode dispatch / combine (sendOnly).
    "ncclMoeDispatchRecv": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]),
    "ncclMoeCombineRecv": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]),
    # Low-latency bytes of a config without a comm (DeepEP's size hint).
    "ncclMoeLowLatencySizeHint": (ctypes.c_int, [ctypes.POINTER(Config), ctypes.c_int, _c_size_p]),
    # A comm bootstrapped through the caller's all-gather (any process group).
    "ncclMoeCommInitOob": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, AllGatherFn, ctypes.c_void_p,
                                          ctypes.POINTER(Config), _c_void_pp]),
    # Ends a comm without waiting for its peers (a peer died).
    "ncclMoeCommAbort": (ctypes.c_int, [ctypes.c_void_p]),
}

# The low-latency API: bound when the library has it (builds with
# NCCL_MOE_HAS_LOW_LATENCY = 1).
LL_PROTOTYPES = {
    "ncclMoeLowLatencyDispatch": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(LowLatencyDispatchArgs),
                                                 ctypes.c_void_p, ctypes.POINTER(LowLatencyDispatchResult),
                                                 ctypes.c_void_p]),
    "ncclMoeLowLatencyDispatchRecv": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]),
    "ncclMoeLowLatencyCombine": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(LowLatencyCombineArgs),
                                                ctypes.c_void_p, ctypes.c_void_p]),
    "ncclMoeLowLatencyCombineRecv": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]),
    "ncclMoeLowLatencyBufferBytes": (ctypes.c_int, [ctypes.c_void_p, _c_size_p]),
}


class Library:
    """The loaded shared object with typed functions as attributes."""

    def __init__(self, path: str):
        # RTLD_LOCAL (ctypes' default): our names stay out of the global
        # namespace, so NCCL does not mistake us for a plugin it loaded.
        self.cdll = ctypes.CDLL(path)
        self.path = path
        missing = [n for n in PROTOTYPES if not hasattr(self.cdll, n)]
        if missing:
            raise LibraryNotFoundError("%s lacks %s: it is not an nccl-moe library, or a much older one"
                                       % (path, ", ".join(missing)))
        for name, (restype, argtypes) in PROTOTYPES.items():
            fn = getattr(self.cdll, name)
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, name, fn)
        for name, (restype, argtypes) in OPTIONAL_PROTOTYPES.items():
            fn = getattr(self.cdll, name, None)
            if fn is not None:
                fn.restype = restype
                fn.argtypes = argtypes
            setattr(self, name, fn)
        v = ctypes.c_int(0)
        self.check(self.ncclMoeGetVersion(ctypes.byref(v)), "ncclMoeGetVersion")
        self.version_code = v.value
        self.version = (v.value // 10000, (v.value // 100) % 100, v.value % 100)
        if self.version[:2] != (NCCL_MOE_MAJOR, NCCL_MOE_MINOR):
            raise LibraryNotFoundError(
                "%s is nccl-moe %d.%d.%d, but this Python package binds the %d.%d API (its structs may differ): "
                "use the package from the same source tree as the library"
                % ((path,) + self.version + (NCCL_MOE_MAJOR, NCCL_MOE_MINOR)))
        # The low-latency entry points exist only in builds with
        # NCCL_MOE_HAS_LOW_LATENCY = 1: all of them, or none is bound.
        self.has_low_latency = all(hasattr(self.cdll, n) for n in LL_PROTOTYPES)
        for name, (restype, argtypes) in LL_PROTOTYPES.items():
            fn = getattr(self.cdll, name) if self.has_low_latency else None
            if fn is not None:
                fn.restype = restype
                fn.argtypes = argtypes
            setattr(self, name, fn)

    def last_error(self) -> str:
        """ncclMoeGetLastError() of the calling thread."""
        msg = self.ncclMoeGetLastError()
        return msg.decode("utf-8", "replace") if msg else ""

    def check(self, result: int, what: str) -> None:
        """Raises NcclMoeError when `result` (an ncclResult_t) is not
        ncclSuccess. Call it on the thread that made the failing call: the
        library keeps the message per thread."""
        if result != ncclSuccess:
            raise make_error(result, what, self.last_error())


def _source_root():
    """The repository root when this package runs from a source checkout
    (python/nccl_moe/ of the repository), else None."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    if os.path.isfile(os.path.join(root, "include", "nccl_moe.h")):
        return root
    return None


def library_candidates():
    """[(where, path)] in search order: the package's own library (what pip
    install . puts inside it), the source tree's build/ (a checkout), the
    loader path. NCCL_MOE_LIBRARY (a file, or a folder holding the library),
    when set, is an explicit override and the only candidate: an explicit
    choice must not silently fall back to another copy."""
    env = os.environ.get(LIBRARY_ENV, "")
    if env:
        path = os.path.join(env, LIBRARY_NAME) if os.path.isdir(env) else env
        return [("%s=%s" % (LIBRARY_ENV, env), path)]
    here = os.path.dirname(os.path.abspath(__file__))
    out = [("inside the package", os.path.join(here, LIBRARY_NAME))]
    root = _source_root()
    if root is not None:
        out.append(("the source tree's build/", os.path.join(root, "build", LIBRARY_NAME)))
    # A bare name: dlopen searches LD_LIBRARY_PATH, the ld.so cache and the
    # system directories.
    out.append(("the loader path", LIBRARY_NAME))
    return out


_lock = threading.Lock()
_library = None


def get_library() -> Library:
    """The loaded library (loaded on first use); LibraryNotFoundError with
    every place tried when it cannot be loaded."""
    global _library
    with _lock:
        if _library is not None:
            return _library
        tried = []
        for where, path in library_candidates():
            if os.sep in path and not os.path.exists(path):
                tried.append("  %s: %s does not exist" % (where, path))
                continue
            try:
                _library = Library(path)
                return _library
            except OSError as e:
                tried.append("  %s (%s): %s" % (where, path, e))
        raise LibraryNotFoundError(
            "cannot load %s. Tried:\n%s\nInstall the package with its library (pip install . from the "
            "repository), or build it in a checkout (meson setup build && ninja -C build, or scripts/setup.sh) "
            "and set %s to its path, or add its folder to LD_LIBRARY_PATH."
            % (LIBRARY_NAME, "\n".join(tried), LIBRARY_ENV))
