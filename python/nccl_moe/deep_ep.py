# SPDX-License-Identifier: Apache-2.0
"""DeepEP's legacy (V1) Python API on nccl-moe: code written for DeepEP runs
after changing ``import deep_ep`` to ``from nccl_moe import deep_ep``.

    from nccl_moe import deep_ep
    buffer = deep_ep.Buffer(group, num_nvl_bytes=int(1e9))
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = \\
        buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = \\
        buffer.dispatch(x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
                        num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=topk_weights)
    combined_x, combined_topk_weights, event = buffer.combine(expert_out, handle, topk_weights=recv_topk_weights)

Same classes (Buffer, Config, EventOverlap, topk_idx_t), methods, argument
names, defaults and return tuples as DeepEP's deep_ep/buffer.py; the same
stream semantics (a communication stream per Buffer; ``previous_event``
makes it wait for an event instead of the current stream;
``async_finish=True`` returns an EventOverlap recorded on it and leaves the
current stream free; ``allocate_on_comm_stream`` allocates the outputs there;
tensors used across streams are kept alive with ``record_stream``, or in the
event's ``extra_tensors`` during CUDA-graph capture); and DeepEP's layouts
(low-latency FP8 scales column-major and TMA-aligned, written that way by the
receive kernel; UE8M0 scales packed four per int32; int32
``cumulative_local_expert_recv_stats``; BF16 combine input, FP8 dispatch by
default in low-latency mode).

Virtual ranks (N ranks on one GPU, for tests and single-GPU development):
``deep_ep.virtual_buffers(n, ...)`` returns N Buffers over one set of
communicators; ``group.run(fn)`` calls ``fn(buffer)`` for every rank at once,
each on its own thread and CUDA stream (exact-mode dispatch waits on the host
for its peers, so the ranks must run concurrently). Set
CUDA_DEVICE_MAX_CONNECTIONS >= 2 * n + 1 (each rank uses two streams) and
CUDA_MODULE_LOADING=EAGER before CUDA starts.

What differs from DeepEP (everything else is DeepEP's behaviour):

Construction and memory
  * The communicator is built at the first collective call that needs it
    (dispatch, combine, low_latency_dispatch), when hidden and num_experts
    (and for low latency num_max_dispatch_tokens_per_rank) are known; all
    ranks reach that call together. A later call that needs a larger hidden,
    another num_experts or another num_max_dispatch_tokens_per_rank rebuilds
    it (collectively: a barrier on the group first); tensors returned as
    views of the old one (low-latency outputs) are then invalid. Passing
    hidden=, num_experts= (and num_max_dispatch_tokens_per_rank=) to the
    constructor (nccl_moe extensions, keyword-only) builds it at once.
  * num_nvl_bytes sizes the normal-mode receive rows:
    rows = num_nvl_bytes // normal_row_bytes(hidden), a multiple of 4.
    nccl-moe keeps every received row (no chunked ring), so this bounds the
    rows one rank receives per dispatch; a dispatch that receives more raises
    an error naming the num_nvl_bytes it needs. Config.get_nvl_buffer_size_hint
    returns the bytes for 4096 tokens per rank. num_nvl_bytes = 0: no normal
    mode.
  * num_rdma_bytes must cover the low-latency buffers
    (get_low_latency_rdma_size_hint, nccl-moe's own sizes, about half of
    DeepEP's); the network slabs of normal mode across nodes are allocated
    by the communicator itself (Config.get_rdma_buffer_size_hint returns 0).
    One communicator serves both modes with one hidden size, the largest any
    call used: a Buffer whose normal-mode hidden is larger than its
    low-latency one allocates low-latency buffers for the larger hidden.
  * num_qps_per_rank is validated (> 0 as DeepEP asserts) and has no other
    effect: no NVSHMEM, the network proxy uses its own connections.
    allow_nvlink_for_low_latency_mode=False, allow_mnnvl=True,
    use_fabric=True, enable_shrink=True and comm= (mpi4py) raise
    NotImplementedError (NCCL_MOE_P2P_DISABLE=1 routes every rank through
    the network instead).
  * Config's chunk sizes are validated as DeepEP does and have no effect
    (nccl-moe writes straight into the receiver's rows); Config.num_sms is the
    thread-block budget of each dispatch / combine call (Buffer.num_sms = 20 by
    default, as DeepEP). get_dispatch_config / get_combine_config accept any
    number of ranks up to 64.
  * get_local_buffer_tensor raises NotImplementedError (no raw buffer to
    hand out); destroy() needs explicitly_destroy=True as in DeepEP. There
    is no Buffer.runtime (DeepEP's C++ object).
  * EventOverlap.event is a torch.cuda.Event (DeepEP: its own EventHandle):
    wait for it with EventOverlap.current_stream_wait() (or
    torch.cuda.current_stream().wait_event(event.event)).

Normal mode
  * dispatch needs topk_idx (routing by is_token_in_rank alone, DeepEP's
    "without top-k" mode, raises NotImplementedError): the routing and the
    per-expert counts are derived from topk_idx. num_tokens_per_rank,
    is_token_in_rank and num_tokens_per_expert must be given (as DeepEP asserts)
    and are checked for shape and dtype; they must be what get_dispatch_layout
    returned for this topk_idx. num_tokens_per_rdma_rank must be None
    (get_dispatch_layout always returns None there).
  * Outputs are fresh tensors, as DeepEP's; they are copied out of the
    communicator's receive rows (one device copy). FP8 input scales may have
    any strides (copied contiguous); per-token 1-D scales are not supported.
  * topk_weights may be None with topk_idx (recv_topk_weights is then None).
  * num_worst_tokens > 0: no host synchronization (capacity mode, CUDA-graph
    capturable); rows past the received count hold stale data, with
    recv_topk_idx -1 and recv_topk_weights 0 there. num_worst_tokens must fit
    the rows of num_nvl_bytes.
  * Handles are opaque objects, not DeepEP's tuples of internal tensors
    (indexing a normal-mode handle raises TypeError; low-latency handles do
    index like DeepEP's: see below). A cached dispatch (handle=) needs the
    hidden, the number of tokens and num_worst_tokens of the dispatch that
    made the handle.
  * Extension: dispatch / combine take return_recv_hook=True (keyword-only,
    capacity mode for dispatch): the call enqueues its send half on the
    current stream and returns the receive half as a callable appended to the
    result tuple (dispatch: 7 items, combine: 4); the outputs are filled once
    it has run on the current stream. For two-micro-batch overlap (send A,
    compute B, receive A). async_finish must be False then.
  * The internode entry points internode_dispatch / internode_combine are the
    same calls (the communicator picks the path).

Low-latency mode
  * Outputs are views into the communicator's two buffer sets (DeepEP's too:
    valid until the dispatch two calls later); recv_count likewise.
  * Scales: column-major [num_local_experts, num_ranks * M, hidden / 128]
    with the token dimension padded to a multiple of 4 in memory (DeepEP
    asserts it is one); UE8M0: int32 [.., ceil(hidden / 512)] words (DeepEP
    needs hidden % 512 == 0). BF16 rows need hidden % 8 == 0, FP8 hidden %
    128 == 0 (DeepEP: fixed hidden sizes).
  * The handle is a 5-item sequence like DeepEP's: handle[0] the source token
    index of each received row (int32 [L, num_ranks * M]), handle[1] the
    (begin << 32 | count) row range of each source rank (int64 [L,
    num_ranks]), handle[2:5] M, hidden, num_experts; items 0 and 1 are
    computed (a few small kernels) when first read, on the current stream,
    from the buffer set's rows: read them after the receive half ran and
    before the dispatch two calls later. Rows of an expert are ordered by
    source rank, then token (DeepEP's order within a source is its own).
  * low_latency_combine reduces with the topk_idx of the dispatch (the
    topk_idx argument is checked for shape only) and its topk_weights.
    zero_copy=True reads the tensor get_next_low_latency_combine_buffer(handle)
    returned (a buffer of this Buffer per buffer set, allocated on first use).
  * cumulative_local_expert_recv_stats may be int32 (DeepEP) or int64.
  * use_logfmt=True, dispatch_wait_recv_cost_stats and
    combine_wait_recv_cost_stats raise NotImplementedError;
    clean_low_latency_buffer only checks its arguments (nccl-moe's flags carry
    sequence numbers and never need cleaning); the mask-buffer (shrink)
    methods raise NotImplementedError.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import warnings
from typing import Callable, List, Optional, Tuple, Union

import torch

from . import _dlpack, _lib
from ._core import Config as _CoreConfig
from ._core import check_int
from .fp8 import FP8_DTYPE, as_fp8

topk_idx_t = torch.int64
"""dtype of topk_idx (DeepEP's deep_ep.topk_idx_t)."""

_FP8_DTYPES = (torch.uint8,) + ((FP8_DTYPE,) if FP8_DTYPE is not None else ())
_HINT_TOKENS_PER_RANK = 4096  # tokens per rank Config.get_nvl_buffer_size_hint sizes for
_REGION_SLACK = 8 * 256        # alignment padding of the communicator's regions
_ROW_ALIGN = _lib.SCALE_TOKEN_ALIGN
_DEFAULT_NUM_SMS = 20          # DeepEP's Buffer.num_sms


# ------------------------------------------------------------------ helpers
def normal_row_bytes(hidden: int, max_topk: int = _lib.MAX_TOPK) -> int:
    """Bytes of the communicator's normal-mode buffers per received row:
    received BF16 row, FP8 scales, top-k ids and weights, the combine row and
    its weights."""
    return 4 * hidden + 4 * ((hidden + _lib.FP8_BLOCK - 1) // _lib.FP8_BLOCK) + 16 * max_topk


def _rows_for_bytes(num_nvl_bytes: int, hidden: int) -> int:
    rows = max(0, num_nvl_bytes - _REGION_SLACK) // normal_row_bytes(hidden)
    return min(rows - rows % _ROW_ALIGN, _lib.INT_MAX - _ROW_ALIGN)


def _bytes_for_rows(rows: int, hidden: int) -> int:
    rows = (rows + _ROW_ALIGN - 1) // _ROW_ALIGN * _ROW_ALIGN
    return rows * normal_row_bytes(hidden) + _REGION_SLACK


def _check_bool(value, name):
    if not isinstance(value, bool):
        raise ValueError("%s must be True or False, got %r" % (name, value))
    return value


def _check(t, what, dtypes, shape, device, dims, contiguous=True, align=None):
    """A ValueError naming `what` unless t is a tensor of `dtypes` and `shape`
    (None = any size) on `device`, contiguous and `align`-byte aligned (the
    element size by default) unless contiguous=False."""
    if not isinstance(t, torch.Tensor):
        raise ValueError("%s must be a torch.Tensor, got %s" % (what, type(t).__name__))
    if t.dtype not in dtypes:
        raise ValueError("%s must be %s, got %s" % (what, " or ".join(str(d).replace("torch.", "") for d in dtypes),
                                                     str(t.dtype).replace("torch.", "")))
    if t.dim() != len(shape) or any(w is not None and g != w for g, w in zip(t.shape, shape)):
        want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        raise ValueError("%s must have shape %s = %s, got %s" % (what, dims, want, list(t.shape)))
    if t.device != device:
        raise ValueError("%s is on %s, but this Buffer is on %s" % (what, t.device, device))
    if contiguous and not t.is_contiguous():
        raise ValueError("%s must be contiguous (call .contiguous())" % what)
    align = t.element_size() if align is None else align
    if contiguous and t.numel() > 0 and t.data_ptr() % align != 0:
        raise ValueError("%s is not %d-byte aligned (a view at an odd offset?): pass a copy (.clone())" % (what, align))
    return t


def _layout_torch(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    """get_dispatch_layout in plain torch ops (no communicator needed, no host
    synchronization): per-rank token counts (a token once per rank), per-
    expert counts (one per top-k entry), and which ranks each token goes to.
    Ids outside [0, num_experts) count nowhere."""
    dev = topk_idx.device
    T, K = topk_idx.shape
    L = num_experts // num_ranks
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    ids = torch.where(valid, topk_idx, torch.full_like(topk_idx, num_experts)).reshape(-1)
    per_expert = torch.zeros(num_experts + 1, dtype=torch.int32, device=dev)
    per_expert.scatter_add_(0, ids, torch.ones(T * K, dtype=torch.int32, device=dev))
    owner = torch.where(valid, torch.div(topk_idx, L, rounding_mode="floor"), torch.full_like(topk_idx, num_ranks))
    in_rank = torch.zeros(T, num_ranks + 1, dtype=torch.bool, device=dev)
    in_rank.scatter_(1, owner, torch.ones_like(owner, dtype=torch.bool))
    in_rank = in_rank[:, :num_ranks].contiguous()
    return in_rank.sum(0, dtype=torch.int32), per_expert[:num_experts], in_rank


def _distinct_streams(n, device, taken=()):
    """n CUDA streams distinct from each other and from `taken` (torch hands
    streams out round-robin from a small pool; two ranks on one stream would
    wait for each other forever)."""
    seen = set(s.cuda_stream for s in taken)
    out = []
    for priority in (0, -1):
        for _ in range(64):
            s = torch.cuda.Stream(device=device, priority=priority)
            if s.cuda_stream not in seen:
                seen.add(s.cuda_stream)
                out.append(s)
                if len(out) == n:
                    return out
    raise RuntimeError("could not get %d distinct CUDA streams from torch" % n)


# ------------------------------------------------------------------ EventOverlap
class EventOverlap:
    """A CUDA event (torch.cuda.Event) of a communication call, for overlap:
    ``event.current_stream_wait()`` makes the current stream wait for it; as a
    context manager the current stream waits for it on exit.

    extra_tensors: tensors kept alive until this object goes (used instead of
    record_stream during CUDA-graph capture, where record_stream is not
    allowed)."""

    def __init__(self, event: Optional[torch.cuda.Event] = None, extra_tensors: Optional[Tuple] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        if self.event is None:
            raise ValueError("this EventOverlap holds no event: the call was made without async_finish=True")
        torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)


# ------------------------------------------------------------------ Config
class Config:
    """DeepEP's performance config. num_sms: thread blocks of each dispatch /
    combine call (at most NCCL_MOE_MAX_CALL_SMS). The chunk sizes are checked
    as DeepEP checks them and otherwise unused (no chunked rings here)."""

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256, num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256) -> None:
        self.num_sms = check_int(num_sms, "num_sms")
        self.num_max_nvl_chunked_send_tokens = check_int(num_max_nvl_chunked_send_tokens,
                                                         "num_max_nvl_chunked_send_tokens")
        self.num_max_nvl_chunked_recv_tokens = check_int(num_max_nvl_chunked_recv_tokens,
                                                         "num_max_nvl_chunked_recv_tokens")
        self.num_max_rdma_chunked_send_tokens = check_int(num_max_rdma_chunked_send_tokens,
                                                          "num_max_rdma_chunked_send_tokens")
        rdma_recv = check_int(num_max_rdma_chunked_recv_tokens, "num_max_rdma_chunked_recv_tokens")
        if not 0 <= self.num_sms <= _lib.MAX_CALL_SMS:
            raise ValueError("num_sms = %d: must be in [0, %d] (0 = the communicator's default)"
                             % (self.num_sms, _lib.MAX_CALL_SMS))
        if not 0 < self.num_max_nvl_chunked_send_tokens < self.num_max_nvl_chunked_recv_tokens:
            raise ValueError("need 0 < num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens, got %d, %d"
                             % (self.num_max_nvl_chunked_send_tokens, self.num_max_nvl_chunked_recv_tokens))
        send = self.num_max_rdma_chunked_send_tokens
        if send <= 0 or rdma_recv <= 0:
            raise ValueError("the RDMA chunk sizes must be > 0, got %d, %d" % (send, rdma_recv))
        rdma_recv = (rdma_recv + send - 1) // send * send  # DeepEP rounds it up to the send chunk
        if not send <= rdma_recv // 2:
            raise ValueError("num_max_rdma_chunked_send_tokens = %d must be at most half of "
                             "num_max_rdma_chunked_recv_tokens = %d" % (send, rdma_recv))
        self.num_max_rdma_chunked_recv_tokens = rdma_recv

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """num_nvl_bytes for 4096 tokens per rank of hidden_bytes / 2 BF16
        channels (every row a rank can receive is kept)."""
        hidden = (check_int(hidden_bytes, "hidden_bytes") + 1) // 2
        return _bytes_for_rows(check_int(num_ranks, "num_ranks") * _HINT_TOKENS_PER_RANK, hidden)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """0: normal mode across nodes allocates its network slabs itself."""
        check_int(hidden_bytes, "hidden_bytes")
        check_int(num_ranks, "num_ranks")
        return 0

    def __repr__(self):
        return "Config(num_sms=%d, nvl_chunks=(%d, %d), rdma_chunks=(%d, %d))" % (
            self.num_sms, self.num_max_nvl_chunked_send_tokens, self.num_max_nvl_chunked_recv_tokens,
            self.num_max_rdma_chunked_send_tokens, self.num_max_rdma_chunked_recv_tokens)


# ------------------------------------------------------------------ handles
class _Handle:
    """A normal-mode dispatch's routing (opaque; DeepEP's is a tuple)."""

    __slots__ = ("buffer", "route", "num_tokens", "hidden", "topk", "capacity", "num_recv", "num_experts",
                 "topk_idx")

    def __getitem__(self, i):
        raise TypeError("nccl_moe.deep_ep normal-mode handles are opaque (DeepEP's is a tuple of internal tensors): "
                        "pass the handle to combine / dispatch as it is")

    @property
    def rows(self) -> int:
        return self.capacity if self.capacity > 0 else self.num_recv

    def __repr__(self):
        return "deep_ep handle(rank=%d, num_tokens=%d, hidden=%d, rows=%d)" % (
            self.buffer.rank, self.num_tokens, self.hidden, self.rows)


class _LowLatencyHandle:
    """A low-latency dispatch: indexes like DeepEP's (src_info, layout_range,
    num_max_dispatch_tokens_per_rank, hidden, num_experts); the first two are
    computed on first access, on the current stream."""

    def __init__(self, buffer, route, views, T, K, H, M, E, keep):
        self.buffer, self.route = buffer, route
        self.num_tokens, self.topk, self.hidden = T, K, H
        self.num_max_dispatch_tokens_per_rank, self.num_experts = M, E
        self.recv_source, self.recv_count = views
        self.set_key = None
        self.keep = keep  # what the library reads after the call (until the receive half)
        self._src_info = None
        self._layout_range = None

    def _items(self):
        return (self.src_info, self.layout_range, self.num_max_dispatch_tokens_per_rank, self.hidden,
                self.num_experts)

    @property
    def src_info(self) -> torch.Tensor:
        if self._src_info is None:
            self._src_info = torch.remainder(self.recv_source, self.num_max_dispatch_tokens_per_rank)
        return self._src_info

    @property
    def layout_range(self) -> torch.Tensor:
        if self._layout_range is None:
            L, S = self.recv_source.shape
            N = self.buffer.group_size
            dev = self.recv_source.device
            valid = torch.arange(S, device=dev).unsqueeze(0) < self.recv_count.to(torch.int64).unsqueeze(1)
            src = torch.div(self.recv_source.to(torch.int64), self.num_max_dispatch_tokens_per_rank,
                            rounding_mode="floor").clamp(0, N - 1)
            src = torch.where(valid, src, torch.full_like(src, N))
            cnt = torch.zeros(L, N + 1, dtype=torch.int64, device=dev)
            cnt.scatter_add_(1, src, torch.ones_like(src))
            cnt = cnt[:, :N]
            begin = torch.cumsum(cnt, 1) - cnt
            self._layout_range = (begin << 32) | cnt
        return self._layout_range

    def __len__(self):
        return 5

    def __getitem__(self, i):
        return self._items()[i]

    def __iter__(self):
        return iter(self._items())

    def __repr__(self):
        return "deep_ep low-latency handle(rank=%d, num_tokens=%d, hidden=%d)" % (
            self.buffer.rank, self.num_tokens, self.hidden)


# ------------------------------------------------------------------ shared state
class _Shared:
    """The nccl_moe buffer owning the native communicators of one Buffer (a
    process-group rank) or of N virtual-rank Buffers, and what it was built
    for."""

    def __init__(self, owner, hidden, num_experts, ll_tokens, max_recv):
        self.owner = owner            # nccl_moe.Buffer or nccl_moe.VirtualBuffer
        self.core = owner._core
        self.hidden = hidden
        self.num_experts = num_experts
        self.ll_tokens = ll_tokens
        self.max_recv = max_recv      # 0: no normal-mode rows (num_nvl_bytes = 0)

    def fits(self, hidden, num_experts, ll_tokens):
        return (self.core.alive and hidden <= self.hidden and num_experts == self.num_experts
                and (ll_tokens is None or ll_tokens == self.ll_tokens))


def _build_config_kwargs(num_ranks, num_nvl_bytes, hidden, num_experts, ll_tokens, timeout_ms):
    rows = _rows_for_bytes(num_nvl_bytes, hidden) if num_nvl_bytes > 0 else 0
    if num_nvl_bytes > 0 and rows < _ROW_ALIGN:
        raise ValueError("num_nvl_bytes = %d holds no normal-mode rows of hidden %d (%d bytes per row): pass at least "
                         "%d, e.g. deep_ep.Config().get_nvl_buffer_size_hint(hidden * 2, num_ranks)"
                         % (num_nvl_bytes, hidden, normal_row_bytes(hidden), _bytes_for_rows(_ROW_ALIGN, hidden)))
    kw = dict(max_tokens_per_rank=max(1, min(rows, _lib.MAX_TOKENS_PER_RANK)), hidden=hidden,
              num_experts=num_experts, max_topk=_lib.MAX_TOPK, max_recv_tokens=rows, timeout_ms=timeout_ms,
              ll_max_tokens_per_rank=ll_tokens)
    return kw, rows


def _ll_size_hint(M, hidden, num_ranks, num_experts):
    lib = _lib.get_library()
    fn = getattr(lib, "ncclMoeLowLatencySizeHint", None)
    if fn is None:
        raise RuntimeError("%s has no ncclMoeLowLatencySizeHint: rebuild the library from this source tree" % lib.path)
    cfg = _CoreConfig(num_ranks, 1, hidden, num_experts, _lib.MAX_TOPK, 0, 0, 0, M)
    n = ctypes.c_size_t(0)
    lib.check(fn(ctypes.byref(cfg.struct), num_ranks, ctypes.byref(n)), "ncclMoeLowLatencySizeHint")
    return n.value


# ------------------------------------------------------------------ the stream dance of one call
class _OnComm:
    """DeepEP's stream protocol of one call: the communication stream waits
    for `previous_event` (or the current stream); outputs are allocated on the
    current stream (or the communication stream); at the end either an event
    is recorded on the communication stream (async_finish) or the current
    stream waits for it."""

    def __init__(self, buf, previous_event, async_finish, allocate_on_comm_stream):
        _check_bool(async_finish, "async_finish")
        _check_bool(allocate_on_comm_stream, "allocate_on_comm_stream")
        if previous_event is not None and not isinstance(previous_event, EventOverlap):
            raise ValueError("previous_event must be an EventOverlap (e.g. Buffer.capture()), got %s"
                             % type(previous_event).__name__)
        if previous_event is not None and previous_event.event is None:
            raise ValueError("previous_event holds no event (it comes from a call without async_finish=True)")
        if allocate_on_comm_stream and previous_event is None:
            raise ValueError("allocate_on_comm_stream=True needs previous_event (as in DeepEP)")
        self.async_finish = async_finish
        self.alloc_on_comm = allocate_on_comm_stream
        self.previous_event = previous_event
        self.compute = torch.cuda.current_stream(buf.device)
        self.comm = buf._comm_stream

    def start(self):
        if self.previous_event is not None:
            self.comm.wait_event(self.previous_event.event)
        else:
            self.comm.wait_stream(self.compute)

    def alloc(self):
        return torch.cuda.stream(self.comm) if self.alloc_on_comm else contextlib.nullcontext()

    def finish(self, inputs, outputs) -> EventOverlap:
        inputs = [t for t in inputs if isinstance(t, torch.Tensor)]
        outputs = [t for t in outputs if isinstance(t, torch.Tensor)]
        capturing = torch.cuda.is_current_stream_capturing()
        if self.async_finish:
            event = torch.cuda.Event()
            event.record(self.comm)
            if not capturing:
                for t in inputs + outputs:
                    t.record_stream(self.comm)
                if self.alloc_on_comm:
                    for t in outputs:
                        t.record_stream(self.compute)
            return EventOverlap(event, tuple(inputs + outputs) if capturing else None)
        self.compute.wait_stream(self.comm)
        if self.alloc_on_comm and not capturing:
            for t in outputs:
                t.record_stream(self.compute)
        return EventOverlap(None)


# ------------------------------------------------------------------ Buffer
class Buffer:
    """DeepEP's Buffer on nccl-moe (see the module notes for what differs).

    group: the torch.distributed process group (NCCL backend) of the expert
        parallel ranks; its NCCL communicator is reused.
    num_nvl_bytes: normal-mode budget (sizes the receive rows).
    num_rdma_bytes: low-latency budget (get_low_latency_rdma_size_hint).
    low_latency_mode: allow the low_latency_* calls.
    Extensions (keyword-only): hidden, num_experts,
    num_max_dispatch_tokens_per_rank: build the communicator now; timeout_ms:
    bound on every wait for a peer (0: NCCL_MOE_TIMEOUT_MS, default 60 s).
    """

    num_sms: int = _DEFAULT_NUM_SMS

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False, use_fabric: bool = False, explicitly_destroy: bool = False,
                 enable_shrink: bool = False, comm=None, *, hidden: Optional[int] = None,
                 num_experts: Optional[int] = None, num_max_dispatch_tokens_per_rank: Optional[int] = None,
                 timeout_ms: int = 0) -> None:
        self._shared = None  # a failing constructor leaves a destroyable object
        self._options(num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank,
                      allow_nvlink_for_low_latency_mode, allow_mnnvl, use_fabric, explicitly_destroy, enable_shrink,
                      comm, timeout_ms)
        import torch.distributed as dist

        if group is None:
            raise ValueError("group is None: pass the torch.distributed ProcessGroup of the expert-parallel ranks "
                             "(nccl_moe.deep_ep.virtual_buffers makes N ranks on one GPU without one)")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialized: call init_process_group('nccl', ...) first")
        self.group = group
        self.rank = group.rank()
        self.group_size = group.size()
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._slot = 0
        self._virtual = None
        self._comm_stream = torch.cuda.Stream(device=self.device, priority=-1)
        self._init_state()
        if hidden is not None or num_experts is not None or num_max_dispatch_tokens_per_rank is not None:
            if hidden is None or num_experts is None:
                raise ValueError("building the communicator at construction needs both hidden= and num_experts=")
            self._ensure(check_int(hidden, "hidden"), check_int(num_experts, "num_experts"),
                         None if num_max_dispatch_tokens_per_rank is None
                         else check_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank"))

    def _options(self, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank,
                 allow_nvlink_for_low_latency_mode, allow_mnnvl, use_fabric, explicitly_destroy, enable_shrink, comm,
                 timeout_ms):
        self.num_nvl_bytes = check_int(num_nvl_bytes, "num_nvl_bytes")
        self.num_rdma_bytes = check_int(num_rdma_bytes, "num_rdma_bytes")
        if self.num_nvl_bytes < 0 or self.num_rdma_bytes < 0:
            raise ValueError("num_nvl_bytes and num_rdma_bytes must be >= 0")
        self.low_latency_mode = _check_bool(low_latency_mode, "low_latency_mode")
        if check_int(num_qps_per_rank, "num_qps_per_rank") <= 0:
            raise ValueError("num_qps_per_rank = %d: must be > 0" % num_qps_per_rank)
        self.explicitly_destroy = _check_bool(explicitly_destroy, "explicitly_destroy")
        self.enable_shrink = _check_bool(enable_shrink, "enable_shrink")
        if not _check_bool(allow_nvlink_for_low_latency_mode, "allow_nvlink_for_low_latency_mode"):
            raise NotImplementedError("allow_nvlink_for_low_latency_mode=False: nccl-moe always uses peer stores "
                                      "inside a node; set NCCL_MOE_P2P_DISABLE=1 to send every rank's traffic "
                                      "through the network instead")
        if _check_bool(allow_mnnvl, "allow_mnnvl"):
            raise NotImplementedError("allow_mnnvl=True: multi-node NVLink is not supported by nccl-moe")
        if _check_bool(use_fabric, "use_fabric"):
            raise NotImplementedError("use_fabric=True: fabric memory handles are not supported by nccl-moe")
        if self.enable_shrink:
            raise NotImplementedError("enable_shrink=True: rank masking is not supported by nccl-moe")
        if comm is not None:
            raise NotImplementedError("comm= (mpi4py): nccl-moe builds on a torch.distributed NCCL process group; pass "
                                      "group=")
        self.timeout_ms = check_int(timeout_ms, "timeout_ms")
        if self.timeout_ms < 0:
            raise ValueError("timeout_ms must be >= 0 (0 = NCCL_MOE_TIMEOUT_MS)")

    def _init_state(self):
        self._ll_combine_buffers = {}   # buffer set (its recv pointer) -> zero-copy combine input
        self._destroyed = False

    @classmethod
    def _virtual_rank(cls, group_obj, slot, comm_stream, options):
        self = cls.__new__(cls)
        self._shared = None
        self._options(**options)
        self.group = None
        self.rank = slot
        self.group_size = group_obj.num_ranks
        self.device = group_obj.device
        self._slot = slot
        self._virtual = group_obj
        self._comm_stream = comm_stream
        self._init_state()
        self._shared = group_obj.shared
        return self

    # ---------------------------------------------------------------- building
    def _ensure(self, hidden, num_experts, ll_tokens=None) -> _Shared:
        if self._destroyed:
            raise RuntimeError("this Buffer was destroyed")
        if ll_tokens is not None and not self.low_latency_mode:
            raise ValueError("low-latency calls need a Buffer created with low_latency_mode=True")
        if not 1 <= num_experts <= _lib.MAX_EXPERTS or num_experts % self.group_size != 0:
            raise ValueError("num_experts = %d: must be a multiple of the %d ranks, at most %d"
                             % (num_experts, self.group_size, _lib.MAX_EXPERTS))
        cur = self._shared
        if cur is not None and cur.fits(hidden, num_experts, ll_tokens):
            return cur
        if self._virtual is not None:
            raise ValueError(
                "this virtual rank's communicators were built for hidden <= %d, num_experts = %d, "
                "num_max_dispatch_tokens_per_rank = %d; the call needs hidden = %d, num_experts = %d%s: pass those to "
                "deep_ep.virtual_buffers" % (cur.hidden, cur.num_experts, cur.ll_tokens, hidden, num_experts,
                                             "" if ll_tokens is None else ", num_max_dispatch_tokens_per_rank = %d"
                                             % ll_tokens))
        # The budget is checked against the shape of the low-latency call that
        # asks for the buffers (they are sized for the largest hidden any
        # call of this Buffer used, which may be more).
        checked_hidden = hidden
        if cur is not None and cur.core.alive and cur.num_experts == num_experts:
            hidden = max(hidden, cur.hidden)
        if ll_tokens is None:
            ll_tokens = cur.ll_tokens if cur is not None and cur.num_experts == num_experts else 0
            checked_hidden = None  # kept from the call that asked for them (already checked)
        if ll_tokens and checked_hidden is not None:
            need = _ll_size_hint(ll_tokens, checked_hidden, self.group_size, num_experts)
            if need > self.num_rdma_bytes:
                raise ValueError("num_rdma_bytes = %d is too small for low-latency buffers of %d tokens per rank, "
                                 "hidden %d, %d experts: pass at least %d "
                                 "(deep_ep.Buffer.get_low_latency_rdma_size_hint(%d, %d, %d, %d))"
                                 % (self.num_rdma_bytes, ll_tokens, checked_hidden, num_experts, need, ll_tokens,
                                    checked_hidden, self.group_size, num_experts))
        from .buffer import Buffer as _NcclMoeBuffer

        kw, rows = _build_config_kwargs(self.group_size, self.num_nvl_bytes, hidden, num_experts, ll_tokens,
                                        self.timeout_ms)
        with torch.cuda.device(self.device):
            if cur is not None:
                # Collective: every rank is in this same call. Peers may still
                # read this rank's memory until they too are here.
                self._shared = None
                cur.owner.destroy(barrier=True)
            else:
                # torch may create a group's NCCL communicator lazily, at its
                # first collective; the library needs it now.
                import torch.distributed as dist

                dist.all_reduce(torch.zeros(1, device=self.device), group=self.group)
            owner = _NcclMoeBuffer(self.group, **kw)
        self._ll_combine_buffers = {}
        self._shared = _Shared(owner, hidden, num_experts, ll_tokens, rows)
        return self._shared

    # ---------------------------------------------------------------- statics
    @staticmethod
    def is_sm90_compiled() -> bool:
        """FP8 dispatch is available (the in-kernel FP8 codec builds for every
        architecture nccl-moe targets)."""
        return True

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Sets Buffer.num_sms, the default config's thread blocks per call
        (even, as DeepEP asserts)."""
        n = check_int(new_num_sms, "new_num_sms")
        if n % 2 != 0 or not 0 < n <= _lib.MAX_CALL_SMS:
            raise ValueError("new_num_sms = %d: must be even and in [2, %d]" % (n, _lib.MAX_CALL_SMS))
        Buffer.num_sms = n

    @staticmethod
    def capture() -> EventOverlap:
        """An event recorded on the current stream."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream())
        return EventOverlap(event)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """num_rdma_bytes for low-latency calls of this shape (nccl-moe's own
        buffer size, both buffer sets)."""
        return _ll_size_hint(check_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank"),
                             check_int(hidden, "hidden"), check_int(num_ranks, "num_ranks"),
                             check_int(num_experts, "num_experts"))

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        n = check_int(num_ranks, "num_ranks")
        if not 1 <= n <= _lib.MAX_RANKS:
            raise ValueError("num_ranks = %d: nccl-moe supports 1 to %d ranks" % (n, _lib.MAX_RANKS))
        return Config(Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return Buffer.get_dispatch_config(num_ranks)

    def get_comm_stream(self) -> torch.cuda.Stream:
        """The communication stream of this Buffer."""
        return self._comm_stream

    def get_local_buffer_tensor(self, dtype, size=None, offset: int = 0, use_rdma_buffer: bool = False):
        raise NotImplementedError("get_local_buffer_tensor: nccl-moe hands out no raw communication buffer "
                                  "(its regions are laid out per call); use the tensors the calls return")

    def destroy(self) -> None:
        """Frees the communicator now (collective, as DeepEP's: every rank
        calls it). Needs explicitly_destroy=True, as in DeepEP."""
        if not self.explicitly_destroy:
            raise ValueError("destroy() needs a Buffer created with explicitly_destroy=True (as in DeepEP); "
                             "otherwise the resources go with the Buffer")
        if self._destroyed:
            return
        self._destroyed = True
        shared, self._shared = self._shared, None
        self._ll_combine_buffers = {}
        if self._virtual is not None:
            self._virtual._rank_destroyed()
        elif shared is not None:
            shared.owner.destroy(barrier=True)

    # ---------------------------------------------------------------- internals
    def _core(self, shared):
        core = shared.core
        core.check_alive()
        return core, core.comms[self._slot], core.lib

    def _check_async(self, comm, lib, rows):
        e = ctypes.c_int(0)
        lib.check(lib.ncclMoeCommGetAsyncError(comm.ptr, ctypes.byref(e)), "ncclMoeCommGetAsyncError")
        if e.value == _lib.ncclSuccess or comm.async_reported:
            return
        comm.async_reported = True
        raise _lib.make_error(e.value, "rank %d: dispatch" % self.rank,
                              "%s (this Buffer keeps %d received rows per dispatch: if a rank received more, pass a "
                              "larger num_nvl_bytes, %d bytes per row)" % (lib.last_error(), rows,
                                                                          normal_row_bytes(self._shared.hidden)))

    def _split_x(self, x):
        if isinstance(x, tuple):
            if len(x) != 2:
                raise ValueError("an FP8 x is a tuple (float8_e4m3fn [num_tokens, hidden], float scales [num_tokens, "
                                 "hidden / 128]), got %d items" % len(x))
            codes, scales = x
            _check(codes, "x[0]", _FP8_DTYPES, (None, None), self.device, "[num_tokens, hidden]", align=_lib.ALIGN)
            T, H = codes.shape
            if H % _lib.FP8_BLOCK != 0:
                raise ValueError("FP8 x has hidden = %d: must be a multiple of %d" % (H, _lib.FP8_BLOCK))
            if isinstance(scales, torch.Tensor) and scales.dim() == 1:
                raise NotImplementedError("per-token (1-D) FP8 scales are not supported: pass float scales "
                                          "[num_tokens, hidden / 128]")
            _check(scales, "x[1]", (torch.float32,), (T, H // _lib.FP8_BLOCK), self.device,
                   "[num_tokens, hidden / 128]", contiguous=False)
            return codes, scales, T, H  # any strides: made contiguous in the call's stream order
        _check(x, "x", (torch.bfloat16,), (None, None), self.device, "[num_tokens, hidden]", align=_lib.ALIGN)
        T, H = x.shape
        if H % 8 != 0:
            raise ValueError("x has hidden = %d: must be a multiple of 8 (16-byte rows)" % H)
        return x, None, T, H

    # ---------------------------------------------------------------- layout
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False):
        """Returns (num_tokens_per_rank int32 [num_ranks], None,
        num_tokens_per_expert int32 [num_experts], is_token_in_rank bool
        [num_tokens, num_ranks], EventOverlap). Not collective."""
        _check(topk_idx, "topk_idx", (torch.int64,), (None, None), self.device, "[num_tokens, num_topk]")
        E = check_int(num_experts, "num_experts")
        if not self.group_size <= E <= _lib.MAX_EXPERTS or E % self.group_size != 0:
            raise ValueError("num_experts = %d: must be a multiple of the %d ranks, at most %d"
                             % (E, self.group_size, _lib.MAX_EXPERTS))
        T, K = topk_idx.shape
        if not 1 <= K <= _lib.MAX_TOPK:
            raise ValueError("topk_idx has num_topk = %d: must be in [1, %d]" % (K, _lib.MAX_TOPK))
        call = _OnComm(self, previous_event, async_finish, allocate_on_comm_stream)
        shared = self._shared
        use_kernel = (shared is not None and shared.core.alive and shared.num_experts == E
                      and T <= shared.core.config.max_tokens_per_rank)
        N = self.group_size
        with torch.cuda.device(self.device):
            call.start()
            if use_kernel:
                core, comm, lib = self._core(shared)
                with call.alloc():
                    per_rank = torch.empty(N, dtype=torch.int32, device=self.device)
                    per_expert = torch.empty(E, dtype=torch.int32, device=self.device)
                    in_rank = torch.empty(T, N, dtype=torch.bool, device=self.device)
                lib.check(lib.ncclMoeGetDispatchLayout(comm.ptr, topk_idx.data_ptr() or None, T, K,
                                                       per_rank.data_ptr(), per_expert.data_ptr(),
                                                       in_rank.data_ptr() or None, call.comm.cuda_stream),
                          "ncclMoeGetDispatchLayout")
                event = call.finish([topk_idx], [per_rank, per_expert, in_rank])
            else:
                # No communicator yet (it is built by the first collective call):
                # the same counts in torch ops, on the communication stream.
                with torch.cuda.stream(call.comm):
                    per_rank, per_expert, in_rank = _layout_torch(topk_idx, E, N)
                call.alloc_on_comm = True  # they were allocated there
                event = call.finish([topk_idx], [per_rank, per_expert, in_rank])
        return per_rank, None, per_expert, in_rank, event

    # ---------------------------------------------------------------- dispatch
    def dispatch(self, x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], handle=None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None, num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False, *, return_recv_hook: bool = False):
        """Sends each token to every rank owning one of its experts (once per
        rank). Collective. Returns (recv_x, recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert_list, handle, event), plus the receive
        hook with return_recv_hook=True (see the module notes)."""
        config = self.get_dispatch_config(self.group_size) if config is None else config
        if not isinstance(config, Config):
            raise ValueError("config must be a nccl_moe.deep_ep.Config, got %s" % type(config).__name__)
        _check_bool(return_recv_hook, "return_recv_hook")
        if num_tokens_per_rdma_rank is not None:
            raise ValueError("num_tokens_per_rdma_rank must be None (nccl-moe's get_dispatch_layout returns None "
                             "there; the communicator routes across nodes itself)")
        expert_alignment = check_int(expert_alignment, "expert_alignment")
        if not 1 <= expert_alignment <= _lib.MAX_EXPERT_ALIGNMENT:
            raise ValueError("expert_alignment = %d: must be in [1, %d]" % (expert_alignment,
                                                                          _lib.MAX_EXPERT_ALIGNMENT))
        num_worst_tokens = check_int(num_worst_tokens, "num_worst_tokens")
        if num_worst_tokens < 0:
            raise ValueError("num_worst_tokens must be >= 0")
        if return_recv_hook and (async_finish or allocate_on_comm_stream or num_worst_tokens == 0):
            raise ValueError("return_recv_hook=True needs num_worst_tokens > 0 (no host synchronization), "
                             "async_finish=False and allocate_on_comm_stream=False")
        xv, scales, T, H = self._split_x(x)
        N = self.group_size
        if handle is not None:
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("a cached dispatch (handle=) takes no topk_idx / topk_weights (as in DeepEP)")
            if not isinstance(handle, _Handle) or handle.buffer is not self:
                raise ValueError("handle must come from a dispatch of this Buffer")
            if self._shared is None or handle.route.core is not self._shared.core:
                raise ValueError("handle comes from before this Buffer's communicator was rebuilt")
            if (handle.num_tokens, handle.hidden, handle.capacity) != (T, H, num_worst_tokens):
                raise ValueError("a cached dispatch needs the num_tokens, hidden and num_worst_tokens of the dispatch "
                                 "that made the handle (%d, %d, %d), got (%d, %d, %d)"
                                 % (handle.num_tokens, handle.hidden, handle.capacity, T, H, num_worst_tokens))
            E = handle.num_experts
            idx, K = handle.topk_idx, handle.topk
        else:
            if num_tokens_per_rank is None or is_token_in_rank is None or num_tokens_per_expert is None:
                raise ValueError("dispatch needs num_tokens_per_rank, is_token_in_rank and num_tokens_per_expert "
                                 "(from get_dispatch_layout), or a handle")
            if topk_idx is None:
                raise NotImplementedError("dispatch without topk_idx (routing by is_token_in_rank alone) is not "
                                          "supported by nccl-moe: pass topk_idx (and topk_weights)")
            _check(num_tokens_per_rank, "num_tokens_per_rank", (torch.int32,), (N,), self.device, "[num_ranks]")
            _check(is_token_in_rank, "is_token_in_rank", (torch.bool,), (T, N), self.device,
                   "[num_tokens, num_ranks]", contiguous=False)
            _check(num_tokens_per_expert, "num_tokens_per_expert", (torch.int32,), (None,), self.device,
                   "[num_experts]")
            E = num_tokens_per_expert.shape[0]
            _check(topk_idx, "topk_idx", (torch.int64,), (T, None), self.device, "[num_tokens, num_topk]")
            K = topk_idx.shape[1]
            if not 1 <= K <= _lib.MAX_TOPK:
                raise ValueError("topk_idx has num_topk = %d: must be in [1, %d]" % (K, _lib.MAX_TOPK))
            if topk_weights is not None:
                _check(topk_weights, "topk_weights", (torch.float32,), (T, K), self.device, "[num_tokens, num_topk]")
            idx = topk_idx
        shared = self._ensure(H, E)
        core, comm, lib = self._core(shared)
        if shared.max_recv == 0:
            raise ValueError("this Buffer has no normal-mode buffers (num_nvl_bytes = 0): create it with "
                             "num_nvl_bytes = deep_ep.Config().get_nvl_buffer_size_hint(hidden * 2, num_ranks)")
        if num_worst_tokens > shared.max_recv:
            raise ValueError("num_worst_tokens = %d is more than the %d rows num_nvl_bytes = %d holds: pass "
                             "num_nvl_bytes >= %d" % (num_worst_tokens, shared.max_recv, self.num_nvl_bytes,
                                                      _bytes_for_rows(num_worst_tokens, shared.hidden)))
        if T > core.config.max_tokens_per_rank:
            raise ValueError("x has %d tokens, more than the %d rows num_nvl_bytes = %d holds"
                             % (T, core.config.max_tokens_per_rank, self.num_nvl_bytes))
        call = _OnComm(self, previous_event, async_finish, allocate_on_comm_stream)
        route = handle.route if handle is not None else core.acquire(self._slot)
        a = _lib.DispatchArgs()
        a.x = xv.data_ptr() or None
        a.xType = _lib.ncclFloat8e4m3 if scales is not None else _lib.ncclBfloat16
        a.sendType = a.xType
        a.scaleFormat = _lib.SCALE_FLOAT
        a.numTokens, a.hidden, a.topk = T, H, K
        a.topkIdx = idx.data_ptr() or None
        a.topkWeights = None if topk_weights is None else (topk_weights.data_ptr() or core.dummy.data_ptr())
        a.capacity = num_worst_tokens
        a.expertAlignment = expert_alignment
        a.reuseHandle = 1 if handle is not None else 0
        a.scaleLayout = _lib.SCALE_ROW_MAJOR
        a.sendOnly = 1 if return_recv_hook else 0
        a.numSMs = config.num_sms
        res = _lib.DispatchResult()
        stream = call.compute if return_recv_hook else call.comm
        with torch.cuda.device(self.device):
            if not return_recv_hook:
                call.start()
            elif previous_event is not None:
                call.compute.wait_event(previous_event.event)
            if scales is not None:
                if not scales.is_contiguous():  # e.g. DeepEP's column-major input scales
                    with torch.cuda.stream(stream):
                        scales = scales.contiguous()
                a.xScales = scales.data_ptr() or None
            lib.check(lib.ncclMoeDispatch(comm.ptr, ctypes.byref(a), route.ptr, ctypes.byref(res), stream.cuda_stream),
                      "ncclMoeDispatch on rank %d" % self.rank)
            if handle is None:
                route.filled = True
                route.num_tokens, route.capacity, route.hidden, route.topk = T, num_worst_tokens, H, K
                route.num_recv = res.numRecv if num_worst_tokens == 0 else None
                h = _Handle()
                h.buffer, h.route, h.num_tokens, h.hidden, h.topk = self, route, T, H, K
                h.capacity, h.num_recv, h.num_experts = num_worst_tokens, route.num_recv, E
            else:
                h = handle
            if num_worst_tokens == 0:
                self._check_async(comm, lib, shared.max_recv)
            rows = num_worst_tokens if num_worst_tokens > 0 else res.numRecv
            want_meta = handle is None
            with call.alloc() if not return_recv_hook else contextlib.nullcontext():
                out_x = torch.empty(rows, H, dtype=torch.uint8 if scales is not None else torch.bfloat16,
                                    device=self.device)
                out_s = (torch.empty(rows, H // _lib.FP8_BLOCK, dtype=torch.float32, device=self.device)
                         if scales is not None else None)
                out_i = torch.empty(rows, K, dtype=torch.int64, device=self.device) if want_meta else None
                out_w = (torch.empty(rows, K, dtype=torch.float32, device=self.device)
                         if want_meta and topk_weights is not None else None)
            if handle is None:
                # A private copy of the routing for cached dispatches, taken in
                # the order of the dispatch that read it.
                with torch.cuda.stream(stream):
                    h.topk_idx = topk_idx.clone()
            outputs = [out_x, out_s, out_i, out_w]

            def receive(on_stream):
                with torch.cuda.stream(on_stream):
                    self._copy_out(res, rows, num_worst_tokens, route, out_x, out_s, out_i, out_w, H, K)

            if return_recv_hook:
                keep = (xv, scales, idx, topk_weights)

                def hook():
                    with torch.cuda.device(self.device):
                        s = torch.cuda.current_stream(self.device)
                        lib.check(lib.ncclMoeDispatchRecv(comm.ptr, route.ptr, s.cuda_stream),
                                  "ncclMoeDispatchRecv on rank %d" % self.rank)
                        receive(s)

                hook.keep = keep  # alive as long as the hook
                event = EventOverlap(None)
            else:
                receive(call.comm)
                event = call.finish([xv, scales, idx, topk_weights, h.topk_idx], outputs)
        recv_x = (as_fp8(out_x), out_s) if scales is not None else out_x
        if handle is not None:
            out = (recv_x, None, None, None, None, event)
        else:
            tpe = ([] if num_worst_tokens > 0 else
                   [ctypes.cast(res.hostRecvTokensPerExpert, ctypes.POINTER(ctypes.c_int))[i]
                    for i in range(E // N)])
            out = (recv_x, out_i, out_w, tpe, h, event)
        return out + (hook,) if return_recv_hook else out

    def _copy_out(self, res, rows, capacity, route, out_x, out_s, out_i, out_w, H, K):
        """The received rows out of the communicator's buffers into the fresh
        outputs, on the current stream (after the dispatch)."""
        if rows == 0:
            return
        dev, owner = self.device, self._shared.core
        if out_s is not None:
            out_x.copy_(_dlpack.wrap(res.recvX, (rows, H), torch.uint8, dev, owner))
            out_s.copy_(_dlpack.wrap(res.recvScales, (rows, H // _lib.FP8_BLOCK), torch.float32, dev, owner))
        else:
            out_x.copy_(_dlpack.wrap(res.recvX, (rows, H), torch.bfloat16, dev, owner))
        if out_i is None:
            return
        idx = _dlpack.wrap(res.recvTopkIdx, (rows, K), torch.int64, dev, owner)
        w = _dlpack.wrap(res.recvTopkWeights, (rows, K), torch.float32, dev, owner) if out_w is not None else None
        if capacity == 0:
            out_i.copy_(idx)
            if w is not None:
                out_w.copy_(w)
            return
        # Capacity mode: rows past the received count hold stale data; ids -1
        # and weights 0 there (as DeepEP's num_worst_tokens padding).
        count = _dlpack.wrap(res.recvCount, (1,), torch.int32, dev, route)
        valid = (torch.arange(rows, device=dev) < count.to(torch.int64).clamp(max=rows)).unsqueeze(1)
        torch.where(valid, idx, torch.full((), -1, dtype=torch.int64, device=dev), out=out_i)
        if w is not None:
            torch.where(valid, w, torch.zeros((), dtype=torch.float32, device=dev), out=out_w)

    internode_dispatch = dispatch

    # ---------------------------------------------------------------- combine
    def combine(self, x: torch.Tensor, handle, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], None] = None,
                config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False, *,
                return_recv_hook: bool = False):
        """Sends every received row back to its source and sums there (no
        weights; topk_weights are summed alike). Collective. Returns
        (combined_x, combined_topk_weights, event), plus the receive hook with
        return_recv_hook=True."""
        config = self.get_combine_config(self.group_size) if config is None else config
        if not isinstance(config, Config):
            raise ValueError("config must be a nccl_moe.deep_ep.Config, got %s" % type(config).__name__)
        _check_bool(return_recv_hook, "return_recv_hook")
        if return_recv_hook and (async_finish or allocate_on_comm_stream):
            raise ValueError("return_recv_hook=True needs async_finish=False and allocate_on_comm_stream=False")
        if not isinstance(handle, _Handle) or handle.buffer is not self:
            raise ValueError("handle must be the handle of a dispatch of this Buffer")
        shared = self._shared
        if shared is None or handle.route.core is not shared.core:
            raise ValueError("handle comes from before this Buffer's communicator was rebuilt")
        core, comm, lib = self._core(shared)
        rows, H, K, T = handle.rows, handle.hidden, handle.topk, handle.num_tokens
        _check(x, "x", (torch.bfloat16,), (rows, H), self.device, "[received tokens, hidden]", align=_lib.ALIGN)
        if topk_weights is not None:
            _check(topk_weights, "topk_weights", (torch.float32,), (rows, K), self.device,
                   "[received tokens, num_topk]")
        if bias is None:
            biases = []
        elif isinstance(bias, torch.Tensor):
            biases = [bias]
        elif isinstance(bias, tuple) and len(bias) == 2:
            biases = [b for b in bias if b is not None]
        else:
            raise ValueError("bias must be None, a tensor, or a tuple of two tensors")
        for i, b in enumerate(biases):
            _check(b, "bias[%d]" % i, (torch.bfloat16,), (T, H), self.device, "[num_tokens, hidden]", align=_lib.ALIGN)
        call = _OnComm(self, previous_event, async_finish, allocate_on_comm_stream)
        with call.alloc() if not return_recv_hook else contextlib.nullcontext():
            out = torch.empty(T, H, dtype=torch.bfloat16, device=self.device)
            out_w = torch.empty(T, K, dtype=torch.float32, device=self.device) if topk_weights is not None else None
        a = _lib.CombineArgs()
        a.x = x.data_ptr() if x.numel() > 0 else comm.combine_ptr
        a.hidden = H
        a.topkWeights = None if topk_weights is None else (topk_weights.data_ptr() or core.dummy.data_ptr())
        a.out = out.data_ptr() or core.dummy.data_ptr()
        a.outTopkWeights = None if out_w is None else (out_w.data_ptr() or core.dummy.data_ptr())
        a.bias0 = biases[0].data_ptr() or None if len(biases) > 0 else None
        a.bias1 = biases[1].data_ptr() or None if len(biases) > 1 else None
        a.sendOnly = 1 if return_recv_hook else 0
        a.numSMs = config.num_sms
        with torch.cuda.device(self.device):
            if return_recv_hook:
                stream = call.compute
                if previous_event is not None:
                    call.compute.wait_event(previous_event.event)
            else:
                call.start()
                stream = call.comm
            lib.check(lib.ncclMoeCombine(comm.ptr, ctypes.byref(a), handle.route.ptr, stream.cuda_stream),
                      "ncclMoeCombine on rank %d" % self.rank)
            if return_recv_hook:
                keep = (x, topk_weights, biases, out, out_w, handle)

                def hook():
                    with torch.cuda.device(self.device):
                        s = torch.cuda.current_stream(self.device)
                        lib.check(lib.ncclMoeCombineRecv(comm.ptr, handle.route.ptr, s.cuda_stream),
                                  "ncclMoeCombineRecv on rank %d" % self.rank)

                hook.keep = keep  # alive as long as the hook
                return out, out_w, EventOverlap(None), hook
            event = call.finish([x, topk_weights] + biases, [out, out_w])
        return out, out_w, event

    internode_combine = combine

    # ---------------------------------------------------------------- low latency
    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Nothing to clean (nccl-moe's low-latency flags carry sequence
        numbers); checks the arguments."""
        M = check_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank")
        check_int(hidden, "hidden")
        check_int(num_experts, "num_experts")
        if not self.low_latency_mode:
            raise ValueError("clean_low_latency_buffer needs a Buffer created with low_latency_mode=True")
        if not 1 <= M <= _lib.LL_MAX_TOKENS:
            raise ValueError("num_max_dispatch_tokens_per_rank = %d: must be in [1, %d]" % (M, _lib.LL_MAX_TOKENS))

    def _ll_check(self, x, topk_idx, M, E):
        if not self.low_latency_mode:
            raise ValueError("low-latency calls need a Buffer created with low_latency_mode=True")
        M = check_int(M, "num_max_dispatch_tokens_per_rank")
        E = check_int(E, "num_experts")
        if not 1 <= M <= _lib.LL_MAX_TOKENS:
            raise ValueError("num_max_dispatch_tokens_per_rank = %d: must be in [1, %d]" % (M, _lib.LL_MAX_TOKENS))
        _check(x, "x", (torch.bfloat16,), (None, None), self.device, "[num_tokens, hidden]", align=_lib.ALIGN)
        T, H = x.shape
        if T > M:
            raise ValueError("x has %d tokens, more than num_max_dispatch_tokens_per_rank = %d" % (T, M))
        if H % 8 != 0:
            raise ValueError("x has hidden = %d: must be a multiple of 8 (16-byte rows)" % H)
        _check(topk_idx, "topk_idx", (torch.int64,), (T, None), self.device, "[num_tokens, num_topk]")
        K = topk_idx.shape[1]
        if not 1 <= K <= _lib.MAX_TOPK:
            raise ValueError("topk_idx has num_topk = %d: must be in [1, %d]" % (K, _lib.MAX_TOPK))
        return T, H, K, M, E

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False):
        """Decode-time dispatch: each token once to every distinct expert it
        chose. Collective, no host synchronization. Returns (recv_x,
        recv_count, handle, event, hook)."""
        if dispatch_wait_recv_cost_stats is not None:
            raise NotImplementedError("dispatch_wait_recv_cost_stats is not supported by nccl-moe")
        for v, n in ((use_fp8, "use_fp8"), (round_scale, "round_scale"), (use_ue8m0, "use_ue8m0"),
                     (async_finish, "async_finish"), (return_recv_hook, "return_recv_hook")):
            _check_bool(v, n)
        if use_ue8m0 and not round_scale:
            raise ValueError("use_ue8m0=True needs round_scale=True (as in DeepEP)")
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook cannot both be set (as in DeepEP)")
        T, H, K, M, E = self._ll_check(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts)
        if use_fp8 and H % _lib.FP8_BLOCK != 0:
            raise ValueError("x has hidden = %d: FP8 needs a multiple of %d" % (H, _lib.FP8_BLOCK))
        shared = self._ensure(H, E, M)
        stats = cumulative_local_expert_recv_stats
        if stats is not None:
            _check(stats, "cumulative_local_expert_recv_stats", (torch.int32, torch.int64), (E // self.group_size,),
                   self.device, "[num_local_experts]")
        core, comm, lib = self._core(shared)
        hook_mode = return_recv_hook
        call = _OnComm(self, None, async_finish, False)
        route = core.acquire(self._slot)
        a = _lib.LowLatencyDispatchArgs()
        a.x = x.data_ptr() or None
        a.numTokens, a.hidden, a.topk = T, H, K
        a.topkIdx = topk_idx.data_ptr() or None
        a.sendType = _lib.ncclFloat8e4m3 if use_fp8 else _lib.ncclBfloat16
        a.scaleFormat = (_lib.SCALE_UE8M0 if use_ue8m0 else _lib.SCALE_POW2 if round_scale else _lib.SCALE_FLOAT)
        a.cumulativeRecvCount = stats.data_ptr() if stats is not None and stats.dtype == torch.int64 else None
        a.cumulativeRecvCount32 = stats.data_ptr() if stats is not None and stats.dtype == torch.int32 else None
        a.sendOnly = 1 if hook_mode else 0
        a.scaleLayout = _lib.SCALE_COL_MAJOR if use_fp8 else _lib.SCALE_ROW_MAJOR
        res = _lib.LowLatencyDispatchResult()
        with torch.cuda.device(self.device):
            if hook_mode:
                stream = call.compute
            else:
                call.start()
                stream = call.comm
            lib.check(lib.ncclMoeLowLatencyDispatch(comm.ptr, ctypes.byref(a), route.ptr, ctypes.byref(res),
                                                    stream.cuda_stream),
                      "ncclMoeLowLatencyDispatch on rank %d" % self.rank)
            dev, S, Lr = self.device, res.expertStride, res.numLocalExperts
            if use_fp8:
                codes = as_fp8(_dlpack.wrap(res.recvX, (Lr, S, H), torch.uint8, dev, core))
                # Column-major, as written by the receive half: [L][columns][Tp],
                # shown as [L, S, columns] with the token dimension contiguous.
                sdt = torch.int32 if use_ue8m0 else torch.float32
                sc = _dlpack.wrap(res.recvScales, (Lr, res.scaleStride, res.scaleTokenStride), sdt, dev, core)
                recv_x = (codes, sc.transpose(1, 2)[:, :S, :])
            else:
                recv_x = _dlpack.wrap(res.recvX, (Lr, S, H), torch.bfloat16, dev, core)
            recv_count = _dlpack.wrap(res.recvCountPerExpert, (Lr,), torch.int32, dev, core)
            recv_source = _dlpack.wrap(res.recvSource, (Lr, S), torch.int32, dev, core)
            h = _LowLatencyHandle(self, route, (recv_source, recv_count), T, K, H, M, E, (x, topk_idx, stats))
            h.set_key = res.recvX
            hook = None
            if hook_mode:
                def hook():
                    with torch.cuda.device(self.device):
                        lib.check(lib.ncclMoeLowLatencyDispatchRecv(comm.ptr, route.ptr,
                                                                    torch.cuda.current_stream(self.device).cuda_stream),
                                  "ncclMoeLowLatencyDispatchRecv on rank %d" % self.rank)

                event = EventOverlap(None)
            elif async_finish:
                event = EventOverlap(torch.cuda.Event(), None)
                event.event.record(call.comm)
                # DeepEP's way (works in graph capture): the event keeps them.
                flat = list(recv_x) if isinstance(recv_x, tuple) else [recv_x]
                event.extra_tensors = tuple(t for t in [x, topk_idx, stats, recv_count, recv_source] + flat
                                            if t is not None)
            else:
                call.compute.wait_stream(call.comm)
                event = EventOverlap(None)
        return recv_x, recv_count, h, event, hook

    def get_next_low_latency_combine_buffer(self, handle) -> torch.Tensor:
        """A BF16 [num_local_experts, num_ranks * M, hidden] tensor that
        low_latency_combine(..., zero_copy=True) of this handle reads instead of
        x (one per buffer set, allocated on first use; fill it yourself)."""
        if not isinstance(handle, _LowLatencyHandle) or handle.buffer is not self:
            raise ValueError("handle must be the handle of a low-latency dispatch of this Buffer")
        L = handle.num_experts // self.group_size
        S = self.group_size * handle.num_max_dispatch_tokens_per_rank
        key = (handle.set_key, handle.hidden)
        t = self._ll_combine_buffers.get(key)
        if t is None:
            t = torch.empty(L, S, handle.hidden, dtype=torch.bfloat16, device=self.device)
            self._ll_combine_buffers[key] = t
        return t

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None):
        """Sends the expert outputs back and reduces them with the top-k
        weights. Collective. Returns (combined_x, event, hook)."""
        if combine_wait_recv_cost_stats is not None:
            raise NotImplementedError("combine_wait_recv_cost_stats is not supported by nccl-moe")
        for v, n in ((use_logfmt, "use_logfmt"), (zero_copy, "zero_copy"), (async_finish, "async_finish"),
                     (return_recv_hook, "return_recv_hook")):
            _check_bool(v, n)
        if use_logfmt:
            raise NotImplementedError("use_logfmt=True: nccl-moe combines in BF16 only")
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook cannot both be set (as in DeepEP)")
        if not isinstance(handle, _LowLatencyHandle) or handle.buffer is not self:
            raise ValueError("handle must be the handle of a low-latency dispatch of this Buffer")
        shared = self._shared
        if shared is None or handle.route.core is not shared.core:
            raise ValueError("handle comes from before this Buffer's communicator was rebuilt")
        core, comm, lib = self._core(shared)
        T, K, H = handle.num_tokens, handle.topk, handle.hidden
        L = handle.num_experts // self.group_size
        S = self.group_size * handle.num_max_dispatch_tokens_per_rank
        _check(x, "x", (torch.bfloat16,), (L, S, H), self.device, "[num_local_experts, num_ranks * M, hidden]",
               align=_lib.ALIGN)
        _check(topk_idx, "topk_idx", (torch.int64,), (T, K), self.device, "[num_tokens, num_topk] of the dispatch",
               contiguous=False)
        _check(topk_weights, "topk_weights", (torch.float32,), (T, K), self.device, "[num_tokens, num_topk]")
        src = x
        if zero_copy:
            src = self._ll_combine_buffers.get((handle.set_key, H))
            if src is None:
                raise ValueError("zero_copy=True but get_next_low_latency_combine_buffer(handle) was never called: "
                                 "fill that buffer, or pass zero_copy=False")
        call = _OnComm(self, None, async_finish, False)
        if out is None:
            out = torch.empty(T, H, dtype=torch.bfloat16, device=self.device)
        else:
            _check(out, "out", (torch.bfloat16,), (T, H), self.device, "[num_tokens, hidden]", align=_lib.ALIGN)
        a = _lib.LowLatencyCombineArgs()
        a.x = src.data_ptr()
        a.topkWeights = topk_weights.data_ptr() if topk_weights.numel() > 0 else None
        a.out = out.data_ptr() or core.dummy.data_ptr()
        a.sendOnly = 1 if return_recv_hook else 0
        with torch.cuda.device(self.device):
            if return_recv_hook:
                stream = call.compute
            else:
                call.start()
                stream = call.comm
            lib.check(lib.ncclMoeLowLatencyCombine(comm.ptr, ctypes.byref(a), handle.route.ptr, stream.cuda_stream),
                      "ncclMoeLowLatencyCombine on rank %d" % self.rank)
            keep = (x, src, topk_idx, topk_weights, out)
            hook = None
            if return_recv_hook:
                def hook():
                    with torch.cuda.device(self.device):
                        lib.check(lib.ncclMoeLowLatencyCombineRecv(
                            comm.ptr, handle.route.ptr, torch.cuda.current_stream(self.device).cuda_stream),
                            "ncclMoeLowLatencyCombineRecv on rank %d" % self.rank)

                hook.keep = keep  # alive as long as the hook
                event = EventOverlap(None)
            elif async_finish:
                event = EventOverlap(torch.cuda.Event(), keep)
                event.event.record(call.comm)
            else:
                call.compute.wait_stream(call.comm)
                event = EventOverlap(None)
        return out, event, hook

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False):
        raise NotImplementedError("rank masking (shrink mode) is not supported by nccl-moe")

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor):
        raise NotImplementedError("rank masking (shrink mode) is not supported by nccl-moe")

    def low_latency_clean_mask_buffer(self):
        raise NotImplementedError("rank masking (shrink mode) is not supported by nccl-moe")


# ------------------------------------------------------------------ virtual ranks
class VirtualBuffers(list):
    """N deep_ep Buffers, ranks 0..N-1 of one set of virtual-rank
    communicators on one GPU (see virtual_buffers). ``run(fn)`` calls
    ``fn(buffer)`` for every rank at once, each on its own host thread with
    its own current CUDA stream (``streams[r]``), and returns the results;
    an exception in any rank is raised after all have returned."""

    def __init__(self, owner, num_ranks, device, options, hidden, num_experts, ll_tokens, max_recv):
        super().__init__()
        self.owner = owner
        self.num_ranks = num_ranks
        self.device = device
        self.shared = _Shared(owner, hidden, num_experts, ll_tokens, max_recv)
        core = owner._core
        self.streams = list(core.streams)   # the ranks' compute streams
        self.comm_streams = _distinct_streams(num_ranks, device, self.streams)
        self._destroy_lock = threading.Lock()
        self._left = num_ranks
        for r in range(num_ranks):
            self.append(Buffer._virtual_rank(self, r, self.comm_streams[r], options))

    def run(self, fn: Callable[[Buffer], object]) -> List:
        core = self.owner._core
        core.check_alive()

        def job(r):
            def call():
                with torch.cuda.stream(self.streams[r]):
                    return fn(self[r])
            return call

        return core.threads.run([job(r) for r in range(self.num_ranks)])

    def _rank_destroyed(self):
        with self._destroy_lock:
            self._left -= 1
            last = self._left == 0
        if last:
            torch.cuda.synchronize(self.device)
            self.owner.destroy()

    def destroy(self) -> None:
        """Frees every rank's communicator (waits for the device)."""
        for b in self:
            b._destroyed = True
            b._shared = None
        if self.owner._core.alive:
            torch.cuda.synchronize(self.device)
            self.owner.destroy()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()
        return False


def virtual_buffers(num_ranks: int, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                    *, hidden: int, num_experts: int, num_max_dispatch_tokens_per_rank: int = 0,
                    explicitly_destroy: bool = True, device=None, timeout_ms: int = 0) -> VirtualBuffers:
    """N deep_ep Buffers on one GPU (ncclMoeCommInitVirtual): rank r is
    ``result[r]``; drive them with ``result.run(fn)``. The communicators are
    built now, for hidden <= `hidden`, `num_experts` experts and (with
    low_latency_mode) exactly `num_max_dispatch_tokens_per_rank` low-latency
    tokens per rank; the byte budgets mean what they mean for Buffer.

    Needs CUDA_DEVICE_MAX_CONNECTIONS >= 2 * num_ranks + 1 and
    CUDA_MODULE_LOADING=EAGER in the environment before CUDA starts."""
    from .buffer import VirtualBuffer as _NcclMoeVirtual

    n = check_int(num_ranks, "num_ranks")
    if not torch.cuda.is_available():
        raise RuntimeError("virtual_buffers needs a CUDA device, and torch sees none")
    want = 2 * n + 1
    try:
        have = int(os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "8"))
    except ValueError:
        have = 8
    if n > 1 and have < want:
        warnings.warn("nccl_moe.deep_ep: %d virtual ranks use %d streams and need CUDA_DEVICE_MAX_CONNECTIONS >= %d "
                      "(it is %d): ranks sharing a hardware queue can wait for each other until they time out"
                      % (n, 2 * n, want, have), RuntimeWarning, stacklevel=2)
    if n > 1 and os.environ.get("CUDA_MODULE_LOADING", "") != "EAGER":
        warnings.warn("nccl_moe.deep_ep: virtual ranks need CUDA_MODULE_LOADING=EAGER set before CUDA starts (a kernel "
                      "loaded on first use in one rank's thread can wait for the other ranks' kernels)",
                      RuntimeWarning, stacklevel=2)
    options = dict(num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes, low_latency_mode=low_latency_mode,
                   num_qps_per_rank=1, allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, use_fabric=False,
                   explicitly_destroy=explicitly_destroy, enable_shrink=False, comm=None, timeout_ms=timeout_ms)
    probe = Buffer.__new__(Buffer)
    probe._options(**options)  # the same checks as Buffer's
    hidden = check_int(hidden, "hidden")
    num_experts = check_int(num_experts, "num_experts")
    M = check_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank")
    if low_latency_mode:
        if not 1 <= M <= _lib.LL_MAX_TOKENS:
            raise ValueError("low_latency_mode needs num_max_dispatch_tokens_per_rank in [1, %d], got %d"
                             % (_lib.LL_MAX_TOKENS, M))
        need = _ll_size_hint(M, hidden, n, num_experts)
        if need > probe.num_rdma_bytes:
            raise ValueError("num_rdma_bytes = %d is too small: low-latency buffers of this shape need %d "
                             "(deep_ep.Buffer.get_low_latency_rdma_size_hint)" % (probe.num_rdma_bytes, need))
    else:
        M = 0
    kw, rows = _build_config_kwargs(n, probe.num_nvl_bytes, hidden, num_experts, M, probe.timeout_ms)
    owner = _NcclMoeVirtual(n, device=device, **kw)
    try:
        return VirtualBuffers(owner, n, owner.device, options, hidden, num_experts, M, rows)
    except BaseException:
        owner.destroy()
        raise


__all__ = ["Buffer", "Config", "EventOverlap", "VirtualBuffers", "normal_row_bytes", "topk_idx_t",
           "virtual_buffers"]
