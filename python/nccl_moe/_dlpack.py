# SPDX-License-Identifier: Apache-2.0
"""Torch tensors over memory the C library owns (receive buffers, the combine
buffer, a handle's counts), without copying.

torch has no public "tensor from a raw pointer" call, but it imports DLPack
capsules on every version and needs nothing else for it (the CUDA array
interface would need numpy). We build the DLPack structs with ctypes. The
capsule's deleter, called by torch when the last tensor over the memory dies,
drops our reference to `owner`: a view keeps the object owning its memory (a
communicator or a handle) alive.
"""

from __future__ import annotations

import ctypes

import torch
import torch.utils.dlpack

_kDLCPU = 1
_kDLCUDA = 2
_kDLInt = 0
_kDLUInt = 1
_kDLFloat = 2


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    pass


_Deleter = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [
    ("dl_tensor", _DLTensor),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", _Deleter),
]

# Element types DLPack carries on every torch version; others are exported as
# one of these and reinterpreted with Tensor.view(dtype) (same element size).
_EXPORTED = {
    torch.uint8: (_kDLUInt, 8),
    torch.int16: (_kDLInt, 16),
    torch.int32: (_kDLInt, 32),
    torch.int64: (_kDLInt, 64),
    torch.float32: (_kDLFloat, 32),
}
_CARRIER = {torch.bfloat16: torch.int16, torch.bool: torch.uint8}
_fp8 = getattr(torch, "float8_e4m3fn", None)
if _fp8 is not None:
    _CARRIER[_fp8] = torch.uint8

# address of a _DLManagedTensor -> what must live as long as torch uses it.
_live = {}


@_Deleter
def _release(managed):
    # Runs when torch frees the tensor (any thread; ctypes takes the GIL).
    # During interpreter shutdown module globals may be gone: never raise.
    try:
        _live.pop(ctypes.cast(managed, ctypes.c_void_p).value, None)
    except Exception:  # noqa: BLE001 - a deleter must not raise into C
        pass


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def live_count() -> int:
    """Tensors made here that torch still holds (for tests)."""
    return len(_live)


def wrap(ptr: int, shape, dtype: torch.dtype, device: torch.device, owner) -> torch.Tensor:
    """A contiguous tensor of `shape` and `dtype` over `ptr` on `device`
    (CUDA, or CPU for tests), keeping `owner` alive while the tensor lives.
    An empty shape gives a fresh empty tensor (there is nothing to view)."""
    shape = tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    if n == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    if not ptr:
        raise ValueError("internal error: NULL pointer for a %s tensor of shape %s" % (dtype, shape))
    carrier = _CARRIER.get(dtype, dtype)
    if carrier not in _EXPORTED:
        raise TypeError("internal error: cannot view memory as %s" % dtype)
    code, bits = _EXPORTED[carrier]
    ndim = len(shape)
    shape_arr = (ctypes.c_int64 * ndim)(*shape)
    strides = []
    stride = 1
    for s in reversed(shape):
        strides.append(stride)
        stride *= s
    strides_arr = (ctypes.c_int64 * ndim)(*reversed(strides))

    managed = _DLManagedTensor()
    t = managed.dl_tensor
    t.data = ptr
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        t.device = _DLDevice(_kDLCUDA, index)
    elif device.type == "cpu":
        t.device = _DLDevice(_kDLCPU, 0)
    else:
        raise ValueError("cannot view memory of device type %s" % device.type)
    t.ndim = ndim
    t.dtype = _DLDataType(code, bits, 1)
    t.shape = shape_arr
    t.strides = strides_arr
    t.byte_offset = 0
    managed.manager_ctx = None
    managed.deleter = _release
    address = ctypes.addressof(managed)
    _live[address] = (managed, shape_arr, strides_arr, owner)
    try:
        capsule = _capsule_new(address, b"dltensor", None)
        tensor = torch.utils.dlpack.from_dlpack(capsule)
    except BaseException:
        _live.pop(address, None)
        raise
    return tensor.view(dtype) if carrier is not dtype else tensor
