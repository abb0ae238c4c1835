# SPDX-License-Identifier: Apache-2.0
"""nccl_moe: expert-parallel dispatch / combine for PyTorch, over
libnccl-net-moe.so (ctypes).

    import nccl_moe
    buf = nccl_moe.Buffer(group, max_tokens_per_rank=4096, hidden=7168, num_experts=256)
    res = buf.dispatch(x, topk_idx, topk_weights)        # res.recv_x, res.recv_topk_idx, ...
    out, _ = buf.combine(expert_out, res.handle)

    vbuf = nccl_moe.VirtualBuffer(8, max_tokens_per_rank=..., hidden=..., num_experts=...)  # 8 ranks, one GPU

The library is looked for at $NCCL_MOE_LIBRARY when it is set (only there),
else inside this package (where pip install . puts it), in the source tree's
build/ (when run from a checkout), then on the loader path.

Importing the package changes nothing in the process (no environment
variables, no CUDA calls, no library loaded until first use).
"""

from ._lib import (
    LibraryNotFoundError,
    NcclMoeArgumentError,
    NcclMoeError,
    get_library,
    library_candidates,
)
from ._version import VERSION as __version__

try:
    import torch as _torch
except ImportError:  # the bindings still import; the torch API says what is missing
    _torch = None

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
