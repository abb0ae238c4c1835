# SPDX-License-Identifier: Apache-2.0
"""Buffer (one rank of a torch.distributed process group of any backend, or
of a raw NCCL communicator) and VirtualBuffer (N ranks in this process on
one GPU): expert-parallel dispatch and combine on torch tensors, over
libnccl-net-moe.so.

Memory: the received rows a dispatch returns are VIEWS INTO COMMUNICATOR
MEMORY, as in the C API: peers write them directly, no copy is made, and they
are overwritten by this rank's next dispatch (use them, or copy them, before
that; `copy=True` returns private copies). A dispatch that autograd records
always returns private copies, because autograd keeps its tensors until the
backward pass. Views keep the communicator alive; destroy() frees it
regardless, after which the views must not be used.

Streams: Buffer runs on the current CUDA stream. VirtualBuffer runs each rank
on a stream of its own, ordered after the current stream, and orders the
current stream after them: from the caller's side it behaves like work on the
current stream too.
"""

from __future__ import annotations

import ctypes
import os
from typing import List, NamedTuple, Optional

import torch

from . import _lib, _version
from ._autograd import CombineCall, CombineFn, DispatchCall, DispatchFn
from ._core import Config, Core, LowLatency, Route, check_int, own_copy


class Layout(NamedTuple):
    """Routing summary of one batch (get_dispatch_layout)."""

    num_tokens_per_rank: torch.Tensor   # int32 [num_ranks]: a token counts once per rank
    num_tokens_per_expert: torch.Tensor  # int32 [num_experts]
    is_token_in_rank: torch.Tensor      # bool [num_tokens, num_ranks]


class Handle:
    """The routing of one dispatch on one rank. Pass it to combine to send the
    rows back, or to a later dispatch with the same routing (handle=...) to
    skip layout and notify."""

    __slots__ = ("_route", "_token")

    def __init__(self, route: Route, token: Optional[torch.Tensor] = None):
        self._route = route
        self._token = token

    @property
    def num_tokens(self) -> int:
        """Tokens this rank dispatched."""
        return self._route.num_tokens

    @property
    def hidden(self) -> int:
        return self._route.hidden

    @property
    def topk(self) -> int:
        return self._route.topk

    @property
    def capacity(self) -> int:
        """0 for an exact-mode dispatch."""
        return self._route.capacity

    @property
    def num_recv(self) -> Optional[int]:
        """Rows received (exact mode); None in capacity mode."""
        return self._route.num_recv

    @property
    def rows(self) -> int:
        """Rows combine takes: num_recv (exact) or capacity."""
        return self._route.rows

    def __repr__(self):
        return "Handle(rank=%d, num_tokens=%d, hidden=%d, topk=%d, rows=%d%s)" % (
            self._route.comm.rank, self.num_tokens, self.hidden, self.topk, self.rows,
            ", capacity" if self.capacity else "")


class DispatchResult:
    """What one rank received from a dispatch.

    recv_x: BF16 [rows, hidden], or for an FP8 send the pair (codes
        float8_e4m3fn [rows, hidden] (uint8 on a torch without FP8 types),
        scales fp32 [rows, hidden / 128]). Rows are ordered by source rank,
        then by token index at the source.
    recv_topk_idx: int64 [rows, topk], the token's experts as this rank's
        local expert ids (0 .. num_local_experts - 1), -1 where the expert
        belongs to another rank or was -1.
    recv_topk_weights: fp32 [rows, topk], 0 where recv_topk_idx is -1; None
        when no weights were dispatched.
    recv_count: int32 [1] on the device: rows received (capacity mode: before
        clamping, so a value above capacity reveals an overflow).
    recv_tokens_per_expert: int32 [num_local_experts] on the device, rounded
        up to expert_alignment.
    num_recv: int rows received (exact mode); None in capacity mode.
    num_recv_tokens_per_expert: list of int (exact mode); None in capacity
        mode.
    handle: the Handle for combine.

    rows = num_recv in exact mode, capacity in capacity mode (rows past
    recv_count then hold stale data, or zeros/-1 in copies).
    """

    __slots__ = ("recv_x", "recv_topk_idx", "recv_topk_weights", "recv_count", "recv_tokens_per_expert",
                 "num_recv", "num_recv_tokens_per_expert", "handle")

    def __init__(self, raw, recv_x, recv_w, handle):
        self.recv_x = recv_x
        self.recv_topk_idx = raw.recv_idx
        self.recv_topk_weights = recv_w
        self.recv_count = raw.recv_count
        self.recv_tokens_per_expert = raw.recv_tpe
        self.num_recv = raw.num_recv
        self.num_recv_tokens_per_expert = raw.host_tpe
        self.handle = handle

    def __repr__(self):
        x = self.recv_x[0] if isinstance(self.recv_x, tuple) else self.recv_x
        return "DispatchResult(recv_x=%s %s, num_recv=%s, weights=%s)" % (
            x.dtype, list(x.shape), self.num_recv, self.recv_topk_weights is not None)


class LowLatencyHandle:
    """One rank's low-latency dispatch: pass it to low_latency_dispatch_recv
    (after a send_only dispatch), low_latency_combine and
    low_latency_combine_recv."""

    __slots__ = ("_route", "num_tokens", "hidden", "topk", "expert_stride", "_keep", "_combined")

    def __init__(self, route, spec, expert_stride):
        self._route = route
        self.num_tokens, self.hidden, self.topk = spec.T, spec.H, spec.K
        self.expert_stride = expert_stride
        # What the library reads or writes after the call returns (until the
        # receive half ran): kept alive here.
        self._keep = (spec.x, spec.idx, spec.cumulative)
        self._combined = None  # (x, topk_weights, out) of the last combine

    def __repr__(self):
        return "LowLatencyHandle(rank=%d, num_tokens=%d, hidden=%d, topk=%d)" % (
            self._route.comm.rank, self.num_tokens, self.hidden, self.topk)


class LowLatencyDispatchResult:
    """What one rank received from a low-latency dispatch: VIEWS INTO ONE OF
    THE COMMUNICATOR'S TWO LOW-LATENCY BUFFER SETS, filled once the receive
    half has run, valid until the dispatch two calls later (which reuses the
    set). Expert-major: local expert l owns rows [l, :expert_stride], of
    which the first recv_count_per_expert[l] are valid, ordered by source
    rank, then token index.

    recv_x: BF16 [num_local_experts, expert_stride, hidden], or for an FP8
        send (codes float8_e4m3fn (uint8 on an old torch) [L, stride, hidden],
        scales): fp32 [L, stride, hidden / 128] for "float" / "pow2" scales,
        int32 [L, stride, ceil(hidden / 512)] holding the packed UE8M0 words
        for "ue8m0" (see ncclMoeScaleUE8M0 in the header).
    recv_count_per_expert: int32 [num_local_experts] (device).
    recv_source: int32 [num_local_experts, expert_stride] (device): source
        rank * ll_max_tokens_per_rank + token index at the source.
    expert_stride: rows per local expert (num_ranks * ll_max_tokens_per_rank).
    handle: the LowLatencyHandle.
    """

    __slots__ = ("recv_x", "recv_count_per_expert", "recv_source", "expert_stride", "num_local_experts", "handle")

    def __init__(self, views, handle):
        for k, v in views.items():
            setattr(self, k, v)
        self.handle = handle


# ----------------------------------------------------------------- the ops
def _dispatch(core: Core, xs, idxs, ws, send_fp8, scale_format, capacity, expert_alignment, handles, copy):
    specs = [core.dispatch_spec(i, x, idx, w, send_fp8) for i, (x, idx, w) in enumerate(zip(xs, idxs, ws))]
    core.check_same(specs)
    scale_format, capacity, expert_alignment = core.check_options(scale_format, capacity, expert_alignment)
    reuse = None
    if handles is not None:
        for i, h in enumerate(handles):
            if not isinstance(h, Handle):
                raise ValueError("%shandle must be a Handle from an earlier dispatch, got %s"
                                 % (core.prefix(i), type(h).__name__))
        reuse = [h._route for h in handles]
    record = torch.is_grad_enabled() and any(
        (s.x.requires_grad and not s.fp8_in) or (s.w is not None and s.w.requires_grad) for s in specs)
    if not record:
        raws = core.dispatch_raw(specs, scale_format, capacity, expert_alignment, reuse)
        if copy:
            raws = [own_copy(r, capacity, core.device) for r in raws]
        out = []
        for r in raws:
            recv_x = (r.recv_x, r.recv_scales) if r.recv_scales is not None else r.recv_x
            out.append(DispatchResult(r, recv_x, r.recv_w, Handle(r.route)))
        return out
    for i, s in enumerate(specs):
        if s.fp8_send and s.x.requires_grad:
            raise ValueError("%sx requires grad but is sent as FP8: gradients do not flow through the FP8 cast; "
                             "dispatch BF16 (send_fp8=False) or detach x" % core.prefix(i))
    call = DispatchCall(specs, scale_format, capacity, expert_alignment, reuse)
    flat = []
    for s in specs:
        flat += [s.x, s.scales, s.idx, s.w]
    outputs = DispatchFn.apply(core, call, *flat)
    out = []
    for i, r in enumerate(call.raws):
        recv_x, recv_w, token = outputs[3 * i: 3 * i + 3]
        if r.recv_scales is not None:
            recv_x = (recv_x, r.recv_scales)
        out.append(DispatchResult(r, recv_x, recv_w if r.recv_w is not None else None, Handle(r.route, token)))
    return out


def _combine(core: Core, xs, handles, ws, outs):
    routes = []
    for i, h in enumerate(handles):
        if not isinstance(h, Handle):
            raise ValueError("%shandle must be the Handle of a dispatch, got %s" % (core.prefix(i), type(h).__name__))
        routes.append(h._route)
    for i, x in enumerate(xs):
        if x is None:
            raise ValueError("%sx is None: pass the expert outputs, one BF16 row per received row" % core.prefix(i))
    tokens = [h._token for h in handles]
    record = torch.is_grad_enabled() and (
        any(isinstance(x, torch.Tensor) and x.requires_grad for x in xs)
        or any(t is not None and t.requires_grad for t in tokens))
    if not record:
        return core.combine_raw(xs, routes, ws, outs)
    if outs is not None and any(o is not None for o in outs):
        raise ValueError("out= cannot be used when autograd records the combine (inputs require grad)")
    call = CombineCall(routes, None)
    flat = []
    for x, w, t in zip(xs, ws, tokens):
        flat += [x, w, t if t is not None and t.requires_grad else None]
    results = CombineFn.apply(core, call, *flat)
    if isinstance(results, torch.Tensor):  # one output comes back bare
        results = (results,)
    return list(zip(results, call.out_weights))


def _ll_dispatch(core: Core, xs, idxs, cumulatives, send_fp8, scale_format, send_only):
    ll = LowLatency(core)
    ll.check_available()
    if not isinstance(send_fp8, bool) or not isinstance(send_only, bool):
        raise ValueError("send_fp8 and send_only must be True or False")
    specs = [ll.spec(i, x, idx, send_fp8, c) for i, (x, idx, c) in enumerate(zip(xs, idxs, cumulatives))]
    out = []
    for sp, (route, views) in zip(specs, ll.dispatch(specs, send_fp8, scale_format, send_only)):
        out.append(LowLatencyDispatchResult(views, LowLatencyHandle(route, sp, views["expert_stride"])))
    return out


def _ll_handles(core: Core, handles):
    routes = []
    for i, h in enumerate(handles):
        if not isinstance(h, LowLatencyHandle):
            raise ValueError("%shandle must be the LowLatencyHandle of a low-latency dispatch, got %s"
                             % (core.prefix(i), type(h).__name__))
        core.check_route_owner(h._route, i, "handle")
        routes.append(h._route)
    return routes


def _ll_recv(core: Core, handles, name):
    ll = LowLatency(core)
    ll.check_available()
    ll.recv(_ll_handles(core, handles), name)


def _ll_combine(core: Core, xs, handles, ws, outs, send_only):
    ll = LowLatency(core)
    ll.check_available()
    if not isinstance(send_only, bool):
        raise ValueError("send_only must be True or False")
    routes = _ll_handles(core, handles)
    metas = [(r, h.num_tokens, h.hidden, h.topk, h.expert_stride) for r, h in zip(routes, handles)]
    kept = ll.combine(xs, metas, ws, outs, send_only)
    for h, k in zip(handles, kept):
        h._combined = k  # weights and out are used by the receive half
    return [k[2] for k in kept]


def _ll_combine_recv(core: Core, handles):
    for i, h in enumerate(handles):
        if isinstance(h, LowLatencyHandle) and h._combined is None:
            raise ValueError("%sno low-latency combine was sent with this handle" % core.prefix(i))
    _ll_recv(core, handles, "ncclMoeLowLatencyCombineRecv")
    return [h._combined[2] for h in handles]


# CUDA gives a device at most this many hardware queues
# (CUDA_DEVICE_MAX_CONNECTIONS), 8 unless the variable says otherwise.
CUDA_MAX_CONNECTIONS = 32
CUDA_DEFAULT_CONNECTIONS = 8


def check_virtual_environment(n_ranks: int, environ=os.environ) -> None:
    """Raises RuntimeError when the environment would let N virtual ranks on
    one GPU wait for each other until they time out (see
    ncclMoeCommInitVirtual in nccl_moe.h): every rank runs on its own stream
    beside the caller's, so n_ranks + 1 streams need as many hardware queues
    (CUDA_DEVICE_MAX_CONNECTIONS), and a kernel loaded on first use while the
    ranks wait can block them (CUDA_MODULE_LOADING=EAGER loads all at start).
    CUDA reads both once, when it starts: they must be in the environment
    before the process first uses CUDA. This package never sets them."""
    if n_ranks <= 1:
        return
    want = n_ranks + 1
    if want > CUDA_MAX_CONNECTIONS:
        raise ValueError("%d virtual ranks: at most %d fit on one GPU (each rank's stream needs a hardware queue of "
                         "its own, and CUDA has %d)" % (n_ranks, CUDA_MAX_CONNECTIONS - 1, CUDA_MAX_CONNECTIONS))
    missing = []
    value = environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "")
    try:
        have = int(value) if value else CUDA_DEFAULT_CONNECTIONS
    except ValueError:
        have = -1
    if have < want:
        missing.append("CUDA_DEVICE_MAX_CONNECTIONS >= %d (it is %s), so that no two ranks share a hardware queue"
                       % (want, repr(value) if value else "unset: CUDA's default is %d" % CUDA_DEFAULT_CONNECTIONS))
    loading = environ.get("CUDA_MODULE_LOADING", "")
    if loading != "EAGER":
        missing.append("CUDA_MODULE_LOADING=EAGER (it is %s), so that no kernel is loaded while the ranks wait"
                       % (repr(loading) if loading else "unset: lazy loading"))
    if missing:
        raise RuntimeError(
            "%d virtual ranks on one GPU wait for each other on the GPU and need %s. Set %s in the environment "
            "before the process first uses CUDA, e.g. CUDA_DEVICE_MAX_CONNECTIONS=%d CUDA_MODULE_LOADING=EAGER "
            "python ..., or os.environ[...] at the very top of the script: CUDA reads them once, when it starts, "
            "so a later change has no effect. (Buffer, one rank per process, needs neither.)"
            % (n_ranks, "; and ".join(missing), "them" if len(missing) > 1 else "it", CUDA_MAX_CONNECTIONS))


def _device_index(device) -> int:
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    d = torch.device(device)
    if d.type != "cuda":
        raise ValueError("device must be a CUDA device, got %s" % d)
    return d.index if d.index is not None else torch.cuda.current_device()


# ------------------------------------------------------------ process group
def _torch_needed() -> str:
    return ("nccl_moe.Buffer needs PyTorch %s or newer (tested: %s), whose ProcessGroupNCCL exposes its NCCL "
            "communicator (_comm_ptr()); this is torch %s. nccl_moe.VirtualBuffer works without a process group"
            % (_version.TORCH_MIN_VERSION, _version.TORCH_TESTED_VERSIONS, getattr(torch, "__version__", "?")))


def nccl_comm_pointer(group) -> int:
    """The ncclComm_t (as an int) of a torch ProcessGroup's NCCL backend,
    found by feature (ProcessGroup._get_backend, then the backend's
    _comm_ptr), not by torch version."""
    if not hasattr(group, "_get_backend"):
        raise RuntimeError("%s has no _get_backend(): %s" % (type(group).__name__, _torch_needed()))
    try:
        backend = group._get_backend(torch.device("cuda"))
    except Exception as e:  # noqa: BLE001 - torch raises various types here
        raise RuntimeError("the process group has no NCCL backend for CUDA tensors (%s): create it with "
                           "backend='nccl'" % e) from e
    if not hasattr(backend, "_comm_ptr"):
        raise RuntimeError("the group's CUDA backend %s has no _comm_ptr(): either it is not NCCL (create the group "
                           "with backend='nccl'), or %s" % (type(backend).__name__, _torch_needed()))
    try:
        ptr = int(backend._comm_ptr())
    except Exception:  # noqa: BLE001 - some versions raise instead of returning 0
        ptr = 0
    if ptr == 0:
        raise RuntimeError(
            "the process group has not created its NCCL communicator yet (torch creates it lazily). Pass "
            "device_id=torch.device('cuda', local_rank) to torch.distributed.init_process_group (eager init), or "
            "run one collective on the group first, e.g. torch.distributed.all_reduce(torch.zeros(1, "
            "device='cuda'), group=group)")
    return ptr


def _comm_query(lib, comm):
    """(rank, n_ranks, device) of an MoE communicator (ncclMoeCommQuery)."""
    rank, n_ranks, device = ctypes.c_int(-1), ctypes.c_int(0), ctypes.c_int(-1)
    lib.check(lib.ncclMoeCommQuery(comm, ctypes.byref(rank), ctypes.byref(n_ranks), ctypes.byref(device), None, None),
              "ncclMoeCommQuery")
    return rank.value, n_ranks.value, device.value


def _is_nccl_group(group) -> bool:
    """Whether torch reaches CUDA tensors of `group` through NCCL (the group's
    own communicator can then bootstrap the comm)."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "nccl" not in backend:
        return False
    # "cpu:gloo,cuda:nccl" and the like: NCCL is the CUDA backend.
    return all(not part.startswith("cuda:") or part.endswith("nccl") for part in backend.split(","))


class _GroupAllGather:
    """ncclMoeCommInitOob's all-gather over a torch.distributed group of any
    backend (gloo, NCCL, mixed): all_gather_object of the bytes. The library
    calls it synchronously on the calling thread during the init call (ctypes
    takes the GIL back for it); a Python exception is kept and turned into the
    init call's error, never let through the C frames."""

    def __init__(self, group):
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.size = dist.get_world_size(group)
        self.error = None
        self.calls = 0
        self.fn = _lib.AllGatherFn(self._call)  # keep a reference while the library may call it

    def _call(self, send, recv, nbytes, ctx):
        try:
            self.calls += 1
            data = ctypes.string_at(send, nbytes) if nbytes else b""
            out = [None] * self.size
            self.dist.all_gather_object(out, data, group=self.group)
            for r, b in enumerate(out):
                if not isinstance(b, bytes) or len(b) != nbytes:
                    raise RuntimeError("rank %d of the group sent %s to the bootstrap all-gather, expected %d bytes (do "
                                       "all ranks create the buffer together, with equal arguments?)"
                                       % (r, ("%d bytes" % len(b)) if isinstance(b, bytes) else type(b).__name__,
                                          nbytes))
                if nbytes:
                    ctypes.memmove(recv + r * nbytes, b, nbytes)
            return 0
        except BaseException as e:  # noqa: BLE001 - nothing may unwind through the library's frames
            self.error = e
            return -1


def _init_oob(lib, group, config, device_index):
    """ncclMoeCommInitOob for this rank of `group` on device_index; returns
    the native comm."""
    import torch.distributed as dist

    if lib.ncclMoeCommInitOob is None:
        raise RuntimeError("%s has no ncclMoeCommInitOob: a process group without NCCL needs a newer nccl-moe "
                           "library" % lib.path)
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    gather = _GroupAllGather(group)
    out = ctypes.c_void_p()
    with torch.cuda.device(device_index):
        # The library takes the device current on this thread: make its
        # context current (an allocation does), torch's current device is
        # restored on the way out.
        torch.zeros(1, device=torch.device("cuda", device_index))
        res = lib.ncclMoeCommInitOob(rank, size, gather.fn, None, ctypes.byref(config.struct), ctypes.byref(out))
    if res != _lib.ncclSuccess:
        err = _lib.make_error(res, "ncclMoeCommInitOob (rank %d of %d)" % (rank, size), lib.last_error())
        raise err from gather.error
    got_rank, got_size, got_device = _comm_query(lib, out.value)
    if (got_rank, got_size, got_device) != (rank, size, device_index):
        lib.ncclMoeCommDestroy(out.value)
        raise RuntimeError("the communicator is rank %d of %d on device %d, expected rank %d of %d on device %d (the "
                           "library did not see this thread's current CUDA device)"
                           % (got_rank, got_size, got_device, rank, size, device_index))
    return out.value


# ------------------------------------------------------------ public classes
class _Base:
    _core: Core

    def _live(self) -> Core:
        core = getattr(self, "_core", None)
        if core is None:
            raise RuntimeError("this nccl_moe buffer was not initialized")
        core.check_alive()
        return core

    @property
    def num_ranks(self) -> int:
        return self._core.n_ranks

    @property
    def device(self) -> torch.device:
        return self._core.device

    @property
    def num_experts(self) -> int:
        return self._core.config.num_experts

    @property
    def num_local_experts(self) -> int:
        return self._core.config.num_local_experts

    @property
    def hidden(self) -> int:
        """Largest hidden size a call may use."""
        return self._core.config.hidden

    @property
    def max_tokens_per_rank(self) -> int:
        return self._core.config.max_tokens_per_rank

    @property
    def max_topk(self) -> int:
        return self._core.config.max_topk

    @property
    def max_recv_tokens(self) -> int:
        return self._core.config.max_recv_tokens

    @property
    def has_low_latency(self) -> bool:
        """Whether the loaded library has the low-latency API (the buffer
        also needs ll_max_tokens_per_rank > 0 to use it)."""
        return self._core.lib.has_low_latency

    @property
    def ll_max_tokens_per_rank(self) -> int:
        return self._core.config.ll_max_tokens_per_rank

    def check_async_error(self) -> None:
        """Raises the error a kernel of this buffer recorded, if any
        (ncclMoeCommGetAsyncError: a timeout waiting for a peer, an expert id
        out of range, a receive capacity exceeded, ranks disagreeing on
        hidden/topk/send type). Does not synchronize: call it after the work
        you care about finished (e.g. after torch.cuda.synchronize() or a
        .item()). Exact-mode dispatch checks by itself (it waits for the
        counts anyway) and raises the first time an error shows; capacity mode
        never waits, so check here. The error is sticky: it is raised on every
        call."""
        self._live().async_errors(only_new=False)

    def destroy(self) -> None:
        """Frees the communicator(s) and handles now (otherwise when the
        buffer, its handles and its views are all gone). Waits for the device.
        Views from this buffer must not be used afterwards. With a process
        group, destroy every rank's buffer together (peers still using this
        rank's memory would time out)."""
        core = getattr(self, "_core", None)
        if core is not None:
            core.destroy()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()
        return False


class Buffer(_Base):
    """Expert-parallel dispatch/combine for one rank of a torch.distributed
    process group, or of a raw NCCL communicator (Buffer.from_nccl_comm).

    Collective: every rank of the group creates it with equal arguments, and
    calls dispatch and combine in the same order. Which ranks the library can
    connect (one host, or several through its network transport) is
    documented at ncclMoeCommInit in include/nccl_moe.h.

    group: any process group (default: the world). With an NCCL backend for
        CUDA tensors the library uses the group's own communicator
        (ncclMoeCommInit); with another backend (gloo) it bootstraps through
        an all-gather on the group (ncclMoeCommInitOob), so ranks may even
        share a GPU (processes on one GPU run side by side only under MPS).
    bootstrap: "auto" (as above), "nccl" or "oob" to force one way.
    device: the CUDA device of this rank for the out-of-band bootstrap
        (default: the current device); an NCCL group's communicator names
        its own.
    max_tokens_per_rank: most tokens any rank passes to one dispatch.
    hidden: largest hidden size (channels per token).
    num_experts: experts over all ranks; rank r owns experts
        [r * L, (r + 1) * L), L = num_experts / num_ranks.
    max_topk: largest top-k (default 8). max_recv_tokens: rows of the receive
        buffers (default num_ranks * max_tokens_per_rank). num_sms: thread
        blocks per kernel (0 = automatic). timeout_ms: bound on every wait for
        a peer (0 = NCCL_MOE_TIMEOUT_MS or 60 s). ll_max_tokens_per_rank:
        most tokens of one low-latency dispatch (0 = no low-latency buffers).

    Buffer.virtual(n_ranks, ...) makes N ranks on one GPU instead (no process
    group), see VirtualBuffer.
    """

    def __init__(self, group=None, *, max_tokens_per_rank: int, hidden: int, num_experts: int, max_topk: int = 0,
                 max_recv_tokens: int = 0, num_sms: int = 0, timeout_ms: int = 0, ll_max_tokens_per_rank: int = 0,
                 bootstrap: str = "auto", device=None):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group("
                               "'nccl', device_id=...) (or 'gloo') first, use Buffer.from_nccl_comm for a raw NCCL "
                               "communicator, or nccl_moe.VirtualBuffer (Buffer.virtual) for N virtual ranks on one "
                               "GPU")
        if bootstrap not in ("auto", "nccl", "oob"):
            raise ValueError("bootstrap = %r: must be 'auto', 'nccl' or 'oob'" % (bootstrap,))
        if group is None:
            group = dist.group.WORLD
        lib = _lib.get_library()
        rank = dist.get_rank(group)
        size = dist.get_world_size(group)
        config = Config(size, max_tokens_per_rank, hidden, num_experts, max_topk, max_recv_tokens, num_sms,
                        timeout_ms, ll_max_tokens_per_rank)
        use_nccl = bootstrap == "nccl" or (bootstrap == "auto" and _is_nccl_group(group))
        if use_nccl:
            comm = nccl_comm_pointer(group)
            out = ctypes.c_void_p()
            # The library calls the NCCL already in this process (torch's): it
            # reads rank, size and device from the communicator itself.
            lib.check(lib.ncclMoeCommInit(comm, ctypes.byref(config.struct), ctypes.byref(out)),
                      "ncclMoeCommInit (rank %d of %d)" % (rank, size))
            ptr = out.value
            nccl_rank, nccl_size, device_index = _comm_query(lib, ptr)
            if nccl_rank != rank or nccl_size != size:
                lib.ncclMoeCommDestroy(ptr)
                raise RuntimeError("the group's NCCL communicator is rank %d of %d, but torch says rank %d of %d"
                                   % (nccl_rank, nccl_size, rank, size))
        else:
            device_index = _device_index(device)
            ptr = _init_oob(lib, group, config, device_index)
        self._group = group
        self._nccl_group = use_nccl
        self._core = Core(lib, [ptr], [rank], size, config, torch.device("cuda", device_index), virtual=False)

    @classmethod
    def from_nccl_comm(cls, comm, *, max_tokens_per_rank: int, hidden: int, num_experts: int, max_topk: int = 0,
                       max_recv_tokens: int = 0, num_sms: int = 0, timeout_ms: int = 0,
                       ll_max_tokens_per_rank: int = 0, group=None) -> "Buffer":
        """A Buffer over a raw ncclComm_t: what engines that drive NCCL
        themselves (pynccl) hold. comm: the communicator's address, as an int
        or a ctypes.c_void_p. Collective over the communicator's ranks (an
        ncclAllGather on it), which must belong to the NCCL loaded in this
        process (torch's, or one loaded with RTLD_GLOBAL) and outlive the
        buffer. Rank, size and device come from the communicator. group: an
        optional process group of the same ranks for destroy()'s barrier;
        without one, destroy() does not wait for the peers (end every rank's
        work first)."""
        if isinstance(comm, ctypes.c_void_p):
            comm = comm.value
        if not isinstance(comm, int) or comm == 0:
            raise ValueError("comm must be a non-NULL ncclComm_t address (an int or ctypes.c_void_p), got %r" % (comm,))
        lib = _lib.get_library()
        # The struct does not depend on the number of ranks; the library checks
        # the values against the communicator's size, then the Python checks
        # are built for that size.
        probe = Config(1, max_tokens_per_rank, hidden, num_experts, max_topk, max_recv_tokens, num_sms, timeout_ms,
                       ll_max_tokens_per_rank)
        out = ctypes.c_void_p()
        lib.check(lib.ncclMoeCommInit(comm, ctypes.byref(probe.struct), ctypes.byref(out)), "ncclMoeCommInit")
        rank, size, device_index = _comm_query(lib, out.value)
        try:
            config = Config(size, max_tokens_per_rank, hidden, num_experts, max_topk, max_recv_tokens, num_sms,
                            timeout_ms, ll_max_tokens_per_rank)
        except BaseException:
            lib.ncclMoeCommDestroy(out.value)
            raise
        self = cls.__new__(cls)
        self._group = group
        self._nccl_group = False
        self._core = Core(lib, [out.value], [rank], size, config, torch.device("cuda", device_index), virtual=False)
        return self

    @classmethod
    def _unbacked(cls, n_ranks, device="cpu", **config):
        """Rank 0 of n_ranks, for tests of the argument checks without a GPU
        (see Core.unbacked)."""
        self = cls.__new__(cls)
        self._group = None
        self._nccl_group = False
        self._core = Core.unbacked(n_ranks, Config(n_ranks, **config), torch.device(device), virtual=False)
        return self

    @staticmethod
    def virtual(n_ranks: int, **kwargs) -> "VirtualBuffer":
        """N virtual ranks on one GPU, without a process group:
        VirtualBuffer(n_ranks, **kwargs)."""
        return VirtualBuffer(n_ranks, **kwargs)

    def destroy(self, barrier: bool = True) -> None:
        """Frees the communicator and handles now (otherwise when the buffer,
        its handles and its views are all gone). Views from this buffer must
        not be used afterwards.

        Collective by default: peers read this rank's memory during a combine,
        so every rank first waits until all ranks' work is done (this rank's
        device synchronized, then a barrier of the group: an all-reduce on
        an NCCL group, dist.barrier on another). barrier=False skips that
        (e.g. when a peer failed: better, abort()). A buffer from
        from_nccl_comm without a group never waits for its peers."""
        core = getattr(self, "_core", None)
        if core is None or not core.alive:
            return
        if barrier and self._group is not None:
            import torch.distributed as dist

            with core.on_device():
                if getattr(self, "_nccl_group", False):
                    dist.all_reduce(torch.zeros(1, device=core.device), group=self._group)
                    torch.cuda.synchronize(core.device)
                else:
                    torch.cuda.synchronize(core.device)
                    dist.barrier(group=self._group)
        core.destroy()

    def abort(self) -> None:
        """Ends the communicator without waiting for any peer
        (ncclMoeCommAbort): after check_async_error raised a timeout or a
        network failure (a peer process died or stopped). The kernels' waits
        end, the network proxies stop, the memory is freed once this rank's
        kernels are done (at most the comm's timeout plus a second). Views
        from this buffer must not be used afterwards. Not collective."""
        core = getattr(self, "_core", None)
        if core is not None:
            core.destroy(abort=True)

    def __exit__(self, exc_type, *exc):
        # After an exception a peer may never reach the barrier.
        self.destroy(barrier=exc_type is None)
        return False

    @property
    def rank(self) -> int:
        return self._core.comms[0].rank

    @property
    def group(self):
        return self._group

    @property
    def buffer_bytes(self) -> int:
        """Device memory this rank's communicator allocated."""
        return self._live().buffer_bytes()[0]

    def get_dispatch_layout(self, topk_idx: torch.Tensor) -> Layout:
        """Routing summary of topk_idx (int64 [num_tokens, topk], ids in
        [0, num_experts) or -1), on the current stream. Not collective."""
        return Layout(*self._live().layout([topk_idx])[0])

    def dispatch(self, x, topk_idx: torch.Tensor, topk_weights: Optional[torch.Tensor] = None, *,
                 send_fp8: Optional[bool] = None, scale_format: str = "float", capacity: int = 0,
                 expert_alignment: int = 0, handle: Optional[Handle] = None, copy: bool = False) -> DispatchResult:
        """Sends each token to every rank owning one of its experts (once per
        rank). Collective.

        x: BF16 [num_tokens, hidden], or a pair (codes float8_e4m3fn or uint8
            [num_tokens, hidden], scales fp32 [num_tokens, hidden / 128]).
        topk_idx: int64 [num_tokens, topk], ids in [0, num_experts) or -1.
        topk_weights: fp32 [num_tokens, topk] or None.
        send_fp8: True casts BF16 x to FP8 in the kernel (scale_format "float":
            amax / 448, "pow2": rounded up to a power of two); FP8 x is always
            sent as FP8.
        capacity: 0 = exact mode (waits for the received count: one stream
            synchronization); > 0 = receive at most that many rows without
            any host synchronization (CUDA-graph capturable); overflows are an
            async error (check_async_error).
        expert_alignment: round per-expert counts up to a multiple of this.
        handle: a Handle from an earlier dispatch with the same topk_idx,
            num_tokens and capacity: reuse its routing (skips layout and
            notify).
        copy: return private copies instead of views into communicator
            memory.

        Autograd records the call when x (BF16) or topk_weights requires grad;
        the backward is a combine of the gradients (see nccl_moe._autograd).
        """
        return _dispatch(self._live(), [x], [topk_idx], [topk_weights], send_fp8, scale_format, capacity,
                         expert_alignment, None if handle is None else [handle], copy)[0]

    def combine(self, x: torch.Tensor, handle: Handle, topk_weights: Optional[torch.Tensor] = None, *,
                out: Optional[torch.Tensor] = None):
        """Sends every received row back to its source and sums there.
        Collective.

        x: BF16 [handle.rows, hidden], one row per received row (the expert
            outputs; write them into get_combine_buffer(handle) to skip a
            copy).
        topk_weights: fp32 [handle.rows, topk] or None: summed per token like
            x.
        out: optional BF16 [num_tokens, hidden] to write into.
        Returns (out BF16 [num_tokens, hidden], out_topk_weights fp32
        [num_tokens, topk] or None). out[t] is the fp32 sum, in rank order, of
        the rows returned for token t (zeros for a token sent nowhere).
        Autograd: the backward is a dispatch of the output gradient with the
        same routing; x gets a gradient, topk_weights does not.
        """
        return _combine(self._live(), [x], [handle], [topk_weights], None if out is None else [out])[0]

    def get_combine_buffer(self, handle: Optional[Handle] = None) -> torch.Tensor:
        """The communicator's combine buffer, BF16: [handle.rows, hidden] for
        a handle, else all of it. Expert outputs written here make combine
        zero-copy. Its content is overwritten by every combine that is not
        zero-copy."""
        return self._live().combine_buffer(0, None if handle is None else handle._route)

    # ------------------------------------------------------------ low latency
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, *, send_fp8: bool = False,
                             scale_format: str = "float", cumulative_recv_count: Optional[torch.Tensor] = None,
                             send_only: bool = False) -> LowLatencyDispatchResult:
        """Decode-time dispatch (ncclMoeLowLatencyDispatch): each token goes
        once to every distinct expert it chose, into fixed expert-major slots;
        no host synchronization, CUDA-graph capturable. Collective.

        x: BF16 [num_tokens <= ll_max_tokens_per_rank, hidden]; topk_idx:
        int64 [num_tokens, topk]. send_fp8: cast to FP8 in the kernel with
        scale_format "float", "pow2" or "ue8m0". cumulative_recv_count: int64
        [num_local_experts] the receive half adds this step's per-expert row
        counts to. send_only: enqueue only the send half; call
        low_latency_dispatch_recv(handle) later (the result is filled then).

        The two buffer sets are used in turn: a result stays valid until the
        dispatch two calls later, and its combine must be enqueued before
        that dispatch (the header states the rules)."""
        return _ll_dispatch(self._live(), [x], [topk_idx], [cumulative_recv_count], send_fp8, scale_format,
                            send_only)[0]

    def low_latency_dispatch_recv(self, handle: LowLatencyHandle) -> None:
        """The receive half of a send_only low-latency dispatch."""
        _ll_recv(self._live(), [handle], "ncclMoeLowLatencyDispatchRecv")

    def low_latency_combine(self, x: torch.Tensor, handle: LowLatencyHandle,
                            topk_weights: Optional[torch.Tensor] = None, *, out: Optional[torch.Tensor] = None,
                            send_only: bool = False) -> torch.Tensor:
        """Sends the expert outputs back and reduces them
        (ncclMoeLowLatencyCombine). Collective.

        x: BF16 [num_local_experts, expert_stride, hidden], row i of expert l
        the output for row i of the dispatch's recv_x (rows past the expert's
        count are not read). topk_weights: fp32 [num_tokens, topk] of the
        dispatch, or None for weight 1. Returns out BF16 [num_tokens, hidden]
        (given or allocated): out[t] = sum over the valid k, in k order, of
        topk_weights[t, k] * the output of expert topk_idx[t, k] for t,
        accumulated in fp32. With send_only the output is written by
        low_latency_combine_recv(handle)."""
        return _ll_combine(self._live(), [x], [handle], [topk_weights], None if out is None else [out],
                           send_only)[0]

    def low_latency_combine_recv(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The receive half of a send_only low-latency combine; returns its
        output tensor."""
        return _ll_combine_recv(self._live(), [handle])[0]

    @property
    def low_latency_buffer_bytes(self) -> int:
        """Device memory of this rank's low-latency buffers (both sets)."""
        core = self._live()
        LowLatency(core).check_available()
        return LowLatency(core).buffer_bytes()[0]


class VirtualBuffer(_Base):
    """N ranks in this process on one GPU (ncclMoeCommInitVirtual): the same
    kernels and peer-table path as ranks of separate processes, for
    single-GPU development and tests.

    Methods take and return per-rank lists (entry r is rank r). Each rank
    runs on its own host thread and CUDA stream; see the module notes.
    The process must start with CUDA_DEVICE_MAX_CONNECTIONS >= n_ranks + 1
    and CUDA_MODULE_LOADING=EAGER in its environment, else the constructor
    raises (see check_virtual_environment; the package never sets them).
    Arguments as for Buffer, plus device (default: the current device) and
    ranks_per_node: split the ranks into "virtual nodes" of that many
    consecutive ranks that reach each other only through the network
    transport (ncclMoeCommInitVirtualNodes; for developing the internode
    path on one GPU).
    """

    def __init__(self, n_ranks: int, *, max_tokens_per_rank: int, hidden: int, num_experts: int,
                 max_topk: int = 0, max_recv_tokens: int = 0, num_sms: int = 0, timeout_ms: int = 0,
                 ll_max_tokens_per_rank: int = 0, device=None, ranks_per_node: Optional[int] = None):
        n_ranks = check_int(n_ranks, "n_ranks")
        config = Config(n_ranks, max_tokens_per_rank, hidden, num_experts, max_topk, max_recv_tokens, num_sms,
                        timeout_ms, ll_max_tokens_per_rank)
        if ranks_per_node is not None:
            ranks_per_node = check_int(ranks_per_node, "ranks_per_node")
            if not (1 <= ranks_per_node <= n_ranks and n_ranks % ranks_per_node == 0):
                raise ValueError("ranks_per_node = %d: must divide the %d ranks" % (ranks_per_node, n_ranks))
        check_virtual_environment(n_ranks)
        if not torch.cuda.is_available():
            raise RuntimeError("VirtualBuffer needs a CUDA device, and torch sees none")
        index = _device_index(device)
        lib = _lib.get_library()
        comms = (ctypes.c_void_p * n_ranks)()
        with torch.cuda.device(index):
            if ranks_per_node is None or ranks_per_node == n_ranks:
                lib.check(lib.ncclMoeCommInitVirtual(n_ranks, index, ctypes.byref(config.struct), comms),
                          "ncclMoeCommInitVirtual (%d ranks on device %d)" % (n_ranks, index))
            elif lib.ncclMoeCommInitVirtualNodes is None:
                raise RuntimeError("%s has no ncclMoeCommInitVirtualNodes (virtual nodes)" % lib.path)
            else:
                lib.check(lib.ncclMoeCommInitVirtualNodes(n_ranks, ranks_per_node, index,
                                                          ctypes.byref(config.struct), comms),
                          "ncclMoeCommInitVirtualNodes (%d ranks, %d per node, on device %d)"
                          % (n_ranks, ranks_per_node, index))
        self._core = Core(lib, [comms[r] for r in range(n_ranks)], list(range(n_ranks)), n_ranks, config,
                          torch.device("cuda", index), virtual=True)

    @classmethod
    def _unbacked(cls, n_ranks, device="cpu", **config):
        """For tests of the argument checks without a GPU (see
        Core.unbacked)."""
        self = cls.__new__(cls)
        self._core = Core.unbacked(n_ranks, Config(n_ranks, **config), torch.device(device), virtual=True)
        return self

    @property
    def buffer_bytes(self) -> List[int]:
        """Device memory each rank's communicator allocated."""
        return self._live().buffer_bytes()

    def get_dispatch_layout(self, topk_idx: List[torch.Tensor]) -> List[Layout]:
        core = self._live()
        return [Layout(*t) for t in core.layout(core.check_list(topk_idx, "topk_idx"))]

    def dispatch(self, x: list, topk_idx: List[torch.Tensor], topk_weights: Optional[list] = None, *,
                 send_fp8: Optional[bool] = None, scale_format: str = "float", capacity: int = 0,
                 expert_alignment: int = 0, handle: Optional[List[Handle]] = None,
                 copy: bool = False) -> List[DispatchResult]:
        """Buffer.dispatch for every rank: x, topk_idx, topk_weights (or None)
        and handle (or None) are per-rank lists; the options apply to all
        ranks. Returns one DispatchResult per rank."""
        core = self._live()
        xs = core.check_list(x, "x")
        idxs = core.check_list(topk_idx, "topk_idx")
        ws = core.check_list(topk_weights, "topk_weights") if topk_weights is not None else [None] * core.n_local
        hs = core.check_list(handle, "handle") if handle is not None else None
        return _dispatch(core, xs, idxs, ws, send_fp8, scale_format, capacity, expert_alignment, hs, copy)

    def combine(self, x: List[torch.Tensor], handle: List[Handle], topk_weights: Optional[list] = None, *,
                out: Optional[list] = None):
        """Buffer.combine for every rank; returns [(out, out_topk_weights)]
        per rank."""
        core = self._live()
        xs = core.check_list(x, "x")
        hs = core.check_list(handle, "handle")
        ws = core.check_list(topk_weights, "topk_weights") if topk_weights is not None else [None] * core.n_local
        outs = core.check_list(out, "out") if out is not None else None
        return _combine(core, xs, hs, ws, outs)

    def get_combine_buffer(self, rank: int, handle: Optional[Handle] = None) -> torch.Tensor:
        """Rank `rank`'s combine buffer (see Buffer.get_combine_buffer)."""
        core = self._live()
        rank = check_int(rank, "rank")
        if not 0 <= rank < core.n_local:
            raise ValueError("rank = %d: this buffer has %d virtual ranks" % (rank, core.n_local))
        return core.combine_buffer(rank, None if handle is None else handle._route)

    # ------------------------------------------------------------ low latency
    def low_latency_dispatch(self, x: List[torch.Tensor], topk_idx: List[torch.Tensor], *, send_fp8: bool = False,
                             scale_format: str = "float", cumulative_recv_count: Optional[list] = None,
                             send_only: bool = False) -> List[LowLatencyDispatchResult]:
        """Buffer.low_latency_dispatch for every rank (per-rank lists)."""
        core = self._live()
        xs = core.check_list(x, "x")
        idxs = core.check_list(topk_idx, "topk_idx")
        cs = (core.check_list(cumulative_recv_count, "cumulative_recv_count") if cumulative_recv_count is not None
              else [None] * core.n_local)
        return _ll_dispatch(core, xs, idxs, cs, send_fp8, scale_format, send_only)

    def low_latency_dispatch_recv(self, handle: List[LowLatencyHandle]) -> None:
        core = self._live()
        _ll_recv(core, core.check_list(handle, "handle"), "ncclMoeLowLatencyDispatchRecv")

    def low_latency_combine(self, x: List[torch.Tensor], handle: List[LowLatencyHandle],
                            topk_weights: Optional[list] = None, *, out: Optional[list] = None,
                            send_only: bool = False) -> List[torch.Tensor]:
        """Buffer.low_latency_combine for every rank; returns the outputs."""
        core = self._live()
        xs = core.check_list(x, "x")
        hs = core.check_list(handle, "handle")
        ws = core.check_list(topk_weights, "topk_weights") if topk_weights is not None else [None] * core.n_local
        outs = core.check_list(out, "out") if out is not None else None
        return _ll_combine(core, xs, hs, ws, outs, send_only)

    def low_latency_combine_recv(self, handle: List[LowLatencyHandle]) -> List[torch.Tensor]:
        core = self._live()
        return _ll_combine_recv(core, core.check_list(handle, "handle"))

    @property
    def low_latency_buffer_bytes(self) -> List[int]:
        core = self._live()
        LowLatency(core).check_available()
        return LowLatency(core).buffer_bytes()
