"""nccl_moe: expert-parallel dispatch / combine for PyTorch, over
libnccl-net-moe.so (ctypes, no compile step).

    import nccl_moe
    buf = nccl_moe.Buffer(group, max_tokens_per_rank=4096, hidden=7168, num_experts=256)
    res = buf.dispatch(x, topk_idx, topk_weights)        # res.recv_x, res.recv_topk_idx, ...
    out, _ = buf.combine(expert_out, res.handle)

    vbuf = nccl_moe.VirtualBuffer(8, max_tokens_per_rank=..., hidden=..., num_experts=...)  # 8 ranks, one GPU

The library is looked for at $NCCL_MOE_LIBRARY, next to this package, in the
source tree's build/ (when run from a checkout), then on the loader path.

Virtual ranks need CUDA_DEVICE_MAX_CONNECTIONS >= ranks + 1 when CUDA starts:
importing this package before CUDA is initialized sets it to 32 unless it is
already set (more hardware queues than CUDA's default 8; harmless otherwise).
"""

import os as _os

from ._lib import (
    LibraryNotFoundError,
    NcclMoeArgumentError,
    NcclMoeError,
    get_library,
    library_candidates,
)

__version__ = "0.2.0"

try:
    import torch as _torch
except ImportError:  # the bindings still import; the torch API says what is missing
    _torch = None


def _set_cuda_connections():
    # CUDA reads the variable once, when it creates a context.
    if _torch is not None and _torch.cuda.is_initialized():
        if "CUDA_DEVICE_MAX_CONNECTIONS" not in _os.environ:
            import warnings

            warnings.warn("nccl_moe was imported after CUDA started, so it could not set "
                          "CUDA_DEVICE_MAX_CONNECTIONS=32: virtual ranks (VirtualBuffer) may time out waiting for "
                          "each other. Import nccl_moe first, or set the variable in the environment "
                          "(process-group Buffers do not need it)", RuntimeWarning, stacklevel=2)
        return False
    _os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
    return True


_CONNECTIONS_SET_BEFORE_CUDA = _set_cuda_connections()

_TORCH_API = ("Buffer", "VirtualBuffer", "DispatchResult", "Handle", "Layout", "LowLatencyDispatchResult",
              "LowLatencyHandle", "fp8")

if _torch is not None:
    from . import fp8
    from .buffer import (Buffer, DispatchResult, Handle, Layout, LowLatencyDispatchResult, LowLatencyHandle,
                         VirtualBuffer)


def __getattr__(name):
    if name in _TORCH_API:
        raise ImportError("nccl_moe.%s needs PyTorch, which is not installed for this Python" % name)
    raise AttributeError("module 'nccl_moe' has no attribute %r" % name)


def library_path() -> str:
    """Path of the loaded libnccl-net-moe.so (loads it)."""
    return get_library().path


def library_version():
    """(major, minor, patch) of the loaded library (loads it)."""
    return get_library().version


__all__ = [
    "Buffer",
    "VirtualBuffer",
    "DispatchResult",
    "Handle",
    "Layout",
    "LowLatencyDispatchResult",
    "LowLatencyHandle",
    "fp8",
    "NcclMoeError",
    "NcclMoeArgumentError",
    "LibraryNotFoundError",
    "get_library",
    "library_candidates",
    "library_path",
    "library_version",
]
