# SPDX-License-Identifier: Apache-2.0
"""What Buffer and VirtualBuffer share: one object driving the native
communicators of the ranks this process runs (one rank of a process group,
or N virtual ranks on one GPU), argument checks, and the raw dispatch /
combine calls that return views into communicator memory.

Every collective takes per-rank lists. With one rank the call runs inline on
the caller's current CUDA stream. With virtual ranks each rank runs on its own
host thread and its own CUDA stream: exact-mode dispatch blocks its thread
until the rank's peers have arrived on the GPU, so the ranks must be driven
concurrently; and ranks sharing a stream would wait for each other forever.
Everything a call allocates is allocated before the rank threads start: a
cudaMalloc or cudaFree while some ranks' kernels spin would serialize the
device and starve the ranks not launched yet.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import operator
import queue
import threading

import torch

from . import _dlpack, _lib
from .fp8 import FP8_DTYPE, as_fp8

FP8_INPUT_DTYPES = (torch.uint8,) + ((FP8_DTYPE,) if FP8_DTYPE is not None else ())
SCALE_FORMATS = {"float": _lib.SCALE_FLOAT, "pow2": _lib.SCALE_POW2}


# ------------------------------------------------------------- checks
def check_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError("%s must be an integer, got a bool" % name)
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError("%s must be an integer, got %s" % (name, type(value).__name__)) from None


def _dtype_name(d) -> str:
    return str(d).replace("torch.", "")


def check_tensor(t, what: str, dtypes, shape, dims: str, device: torch.device, align: int) -> torch.Tensor:
    """A ValueError naming `what` unless `t` is a dense tensor of one of
    `dtypes`, of `shape` (None = any size), on `device`, `align`-byte
    aligned."""
    if not isinstance(t, torch.Tensor):
        raise ValueError("%s must be a torch.Tensor, got %s" % (what, type(t).__name__))
    if t.dtype not in dtypes:
        raise ValueError("%s must be %s, got %s" % (what, " or ".join(_dtype_name(d) for d in dtypes),
                                                     _dtype_name(t.dtype)))
    if t.dim() != len(shape) or any(w is not None and g != w for g, w in zip(t.shape, shape)):
        want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        raise ValueError("%s must have shape %s = %s, got %s" % (what, dims, want, list(t.shape)))
    if t.device != device:
        raise ValueError("%s is on %s, but this rank's communicator is on %s" % (what, t.device, device))
    if not t.is_contiguous():
        raise ValueError("%s must be contiguous (the library reads dense rows): call .contiguous() first" % what)
    if t.numel() > 0 and t.data_ptr() % align != 0:
        raise ValueError("%s is not %d-byte aligned (a view at an odd offset?): pass a copy (.clone())"
                         % (what, align))
    return t


def merge_errors(errors):
    """One exception for the failures of several ranks [(rank, exc)]."""
    if len(errors) == 1:
        return errors[0][1]
    first = errors[0][1]
    text = "; ".join("rank %d: %s" % (r, e) for r, e in errors)
    if isinstance(first, _lib.NcclMoeError):
        merged = type(first)(first.result, text)
    else:
        merged = RuntimeError(text)
    merged.__cause__ = first
    return merged


# ------------------------------------------------------------- config
class Config:
    """The communicator's configuration: the C struct and the resolved
    values the argument checks need (the C defaults applied)."""

    def __init__(self, n_ranks, max_tokens_per_rank, hidden, num_experts, max_topk=0, max_recv_tokens=0,
                 num_sms=0, timeout_ms=0, ll_max_tokens_per_rank=0):
        n_ranks = check_int(n_ranks, "number of ranks")
        self.max_tokens_per_rank = check_int(max_tokens_per_rank, "max_tokens_per_rank")
        self.hidden = check_int(hidden, "hidden")
        self.num_experts = check_int(num_experts, "num_experts")
        max_topk = check_int(max_topk, "max_topk")
        max_recv_tokens = check_int(max_recv_tokens, "max_recv_tokens")
        num_sms = check_int(num_sms, "num_sms")
        timeout_ms = check_int(timeout_ms, "timeout_ms")
        self.ll_max_tokens_per_rank = check_int(ll_max_tokens_per_rank, "ll_max_tokens_per_rank")
        if not 1 <= n_ranks <= _lib.MAX_RANKS:
            raise ValueError("%d ranks: between 1 and %d are supported" % (n_ranks, _lib.MAX_RANKS))
        if not 1 <= self.max_tokens_per_rank <= _lib.MAX_TOKENS_PER_RANK:
            raise ValueError("max_tokens_per_rank = %d: must be in [1, %d]"
                             % (self.max_tokens_per_rank, _lib.MAX_TOKENS_PER_RANK))
        if not (8 <= self.hidden <= _lib.MAX_HIDDEN and self.hidden % 8 == 0):
            raise ValueError("hidden = %d: must be a multiple of 8 in [8, %d]" % (self.hidden, _lib.MAX_HIDDEN))
        if not (n_ranks <= self.num_experts <= _lib.MAX_EXPERTS and self.num_experts % n_ranks == 0):
            raise ValueError("num_experts = %d: must be a multiple of the %d ranks, at most %d"
                             % (self.num_experts, n_ranks, _lib.MAX_EXPERTS))
        if not 0 <= max_topk <= _lib.MAX_TOPK:
            raise ValueError("max_topk = %d: must be in [1, %d] (0 = %d)" % (max_topk, _lib.MAX_TOPK,
                                                                            _lib.DEFAULT_TOPK))
        if not 0 <= self.ll_max_tokens_per_rank <= _lib.LL_MAX_TOKENS:
            raise ValueError("ll_max_tokens_per_rank = %d: must be in [0, %d] (0: no low-latency buffers)"
                             % (self.ll_max_tokens_per_rank, _lib.LL_MAX_TOKENS))
        if max_recv_tokens < 0 or num_sms < 0 or timeout_ms < 0:
            raise ValueError("max_recv_tokens, num_sms and timeout_ms must be >= 0 (0 = default)")
        self.n_ranks = n_ranks
        self.max_topk = max_topk or _lib.DEFAULT_TOPK
        self.max_recv_tokens = max_recv_tokens or min(n_ranks * self.max_tokens_per_rank, _lib.INT_MAX)
        self.num_local_experts = self.num_experts // n_ranks
        s = _lib.config_initializer()
        s.maxTokensPerRank = self.max_tokens_per_rank
        s.hidden = self.hidden
        s.numExperts = self.num_experts
        s.maxTopk = max_topk
        s.maxRecvTokens = max_recv_tokens
        s.numSMs = num_sms
        s.timeoutMs = timeout_ms
        s.llMaxTokensPerRank = self.ll_max_tokens_per_rank
        self.struct = s


# ------------------------------------------------------------- natives
class Comm:
    """One native rank (ncclMoeComm_t) and its pool of native handles."""

    __slots__ = ("ptr", "rank", "free", "created", "async_reported", "combine_ptr", "combine_bytes")

    def __init__(self, ptr, rank):
        self.ptr = ptr
        self.rank = rank
        self.free = []      # native handles no Route holds
        self.created = []   # every native handle, destroyed with the comm
        self.async_reported = False
        self.combine_ptr = 0
        self.combine_bytes = 0


class Route:
    """A native handle (ncclMoeHandle_t) with the routing of the dispatch that
    filled it. Dropping the last reference gives the native handle back to its
    communicator's pool: handles cost a cudaMalloc (and cudaFree synchronizes
    the device), so they are recycled instead of freed, and a handle is never
    reused while anything (a result, a view of its counts, an autograd
    node) still holds it."""

    __slots__ = ("core", "comm", "slot", "ptr", "filled", "num_tokens", "hidden", "topk", "capacity",
                 "num_recv", "topk_idx", "__weakref__")

    def __init__(self, core, slot, ptr):
        self.core = core
        self.comm = core.comms[slot]
        self.slot = slot
        self.ptr = ptr
        self.filled = False
        self.num_tokens = self.hidden = self.topk = self.capacity = 0
        self.num_recv = None
        self.topk_idx = None

    @property
    def rows(self) -> int:
        """Rows of the receive side: the received count (exact mode) or the
        capacity."""
        return self.capacity if self.capacity > 0 else self.num_recv

    def __del__(self):
        core = self.core
        if core is not None and core.alive:
            self.comm.free.append(self.ptr)


class RankThreads:
    """One host thread per virtual rank, alive as long as the buffer. Rank r's
    work always runs on thread r."""

    def __init__(self, n, device_index):
        self._inbox = [queue.SimpleQueue() for _ in range(n)]
        for r in range(n):
            t = threading.Thread(target=self._serve, args=(r, device_index), name="nccl-moe-rank-%d" % r,
                                 daemon=True)
            t.start()

    def _serve(self, r, device_index):
        start_error = None
        try:
            # Makes the device's context current on this thread, for torch and
            # for the CUDA runtime inside our library alike.
            torch.cuda.set_device(device_index)
        except BaseException as e:  # noqa: BLE001 - reported with each job
            start_error = e
        inbox = self._inbox[r]
        while True:
            job = inbox.get()
            if job is None:
                return
            fn, box, done = job
            try:
                if start_error is not None:
                    raise start_error
                box.append((True, fn()))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box.append((False, e))
            done.release()

    def run(self, fns):
        """fns[r]() on thread r, all at once; returns their results, or raises
        (after every rank finished) what failed."""
        done = threading.Semaphore(0)
        boxes = [[] for _ in fns]
        for r, fn in enumerate(fns):
            self._inbox[r].put((fn, boxes[r], done))
        for _ in fns:
            done.acquire()
        errors = [(r, b[0][1]) for r, b in enumerate(boxes) if not b[0][0]]
        if errors:
            raise merge_errors(errors)
        return [b[0][1] for b in boxes]

    def close(self):
        # No join: close() may run from a finalizer on any thread.
        for q in self._inbox:
            q.put(None)


class Spec:
    """One rank's checked dispatch input."""

    __slots__ = ("x", "scales", "idx", "w", "T", "H", "K", "fp8_in", "fp8_send")


class RawDispatch:
    """One rank's dispatch output: views into communicator memory."""

    __slots__ = ("route", "recv_x", "recv_scales", "recv_idx", "recv_w", "recv_count", "recv_tpe",
                 "num_recv", "host_tpe")


# ---------------------------------------------------------------- core
class Core:
    """The native communicators of the ranks this process drives."""

    def __init__(self, lib, comm_ptrs, ranks, n_ranks, config, device, virtual):
        self.lib = lib
        self.comms = [Comm(p, r) for p, r in zip(comm_ptrs, ranks)]
        self.n_ranks = n_ranks
        self.config = config
        self.device = device
        self.virtual = virtual
        self.alive = True
        self.lock = threading.RLock()
        self.threads = None
        self.streams = None
        try:
            for c in self.comms:
                p = ctypes.c_void_p()
                n = ctypes.c_size_t()
                lib.check(lib.ncclMoeGetCombineBuffer(c.ptr, ctypes.byref(p), ctypes.byref(n)),
                          "ncclMoeGetCombineBuffer")
                c.combine_ptr, c.combine_bytes = p.value, n.value
            # A valid, aligned device pointer for arguments that are empty on
            # this rank but must not be NULL (the C API reads NULL as "not
            # given", and e.g. weights must be given on every rank or none).
            self.dummy = torch.zeros(_lib.ALIGN, dtype=torch.float32, device=device)
            if virtual:
                self.streams = self._make_streams(len(self.comms))
                self.threads = RankThreads(len(self.comms), device.index)
        except BaseException:
            self.destroy()
            raise

    @classmethod
    def unbacked(cls, n_ranks, config, device, virtual):
        """A core without native communicators, for tests of the argument
        checks on any machine (CPU tensors included): every check runs, and a
        call that passes them fails in the library (NULL communicator)."""
        self = cls.__new__(cls)
        self.lib = _lib.get_library()
        self.comms = [Comm(None, r) for r in range(n_ranks if virtual else 1)]
        self.n_ranks = n_ranks
        self.config = config
        self.device = device
        self.virtual = virtual
        self.alive = True
        self.lock = threading.RLock()
        self.threads = None
        self.streams = None
        self.dummy = torch.zeros(_lib.ALIGN, dtype=torch.float32, device=device)
        return self

    def _make_streams(self, n):
        # torch hands out streams round-robin from a small pool: make sure no
        # two ranks share one (they would wait for each other forever).
        streams, seen = [], set()
        for _ in range(4 * n + 64):
            s = torch.cuda.Stream(device=self.device)
            if s.cuda_stream not in seen:
                seen.add(s.cuda_stream)
                streams.append(s)
                if len(streams) == n:
                    return streams
        raise RuntimeError("could not get %d distinct CUDA streams from torch for the virtual ranks" % n)

    def on_device(self):
        """The communicator's device made current (a no-op for the CPU
        devices of argument-check tests)."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.cuda.device(self.device)

    @property
    def n_local(self) -> int:
        return len(self.comms)

    # --------------------------------------------------------- lifetime
    def check_alive(self):
        if not self.alive:
            raise RuntimeError("this nccl_moe buffer was destroyed")

    def destroy(self, abort=False):
        """Frees the handles and communicators (waits for the device).
        abort: end the communicators with ncclMoeCommAbort instead (no wait
        for any peer; see Buffer.abort)."""
        if not getattr(self, "alive", False):
            return
        self.alive = False
        if self.threads is not None:
            self.threads.close()
        lib = self.lib
        errors = []
        if not any(c.ptr for c in self.comms):
            return
        with self.on_device():
            for c in self.comms:
                for h in c.created:
                    lib.ncclMoeHandleDestroy(h)
                c.created, c.free = [], []
            end = lib.ncclMoeCommAbort if abort and lib.ncclMoeCommAbort is not None else lib.ncclMoeCommDestroy
            for c in self.comms:
                if c.ptr:
                    res = end(c.ptr)
                    if res != _lib.ncclSuccess:
                        errors.append((c.rank, _lib.make_error(res, end.__name__, lib.last_error())))
                    c.ptr = None
        if errors:
            raise merge_errors(errors)

    def __del__(self):
        try:
            self.destroy()
        except Exception:  # noqa: BLE001 - nothing to report to at collection time
            pass

    def acquire(self, slot) -> Route:
        """A native handle of rank slot `slot` for a new dispatch."""
        comm = self.comms[slot]
        try:
            ptr = comm.free.pop()
        except IndexError:
            h = ctypes.c_void_p()
            with self.on_device():
                self.lib.check(self.lib.ncclMoeHandleCreate(comm.ptr, ctypes.byref(h)), "ncclMoeHandleCreate")
            comm.created.append(h.value)
            ptr = h.value
        return Route(self, slot, ptr)

    # --------------------------------------------------------- running
    def run(self, calls):
        """calls[i](stream) for every local rank, concurrently; returns the
        results. One rank: inline, on the current stream. Virtual ranks: each
        on its own thread and stream, ordered after the caller's current
        stream, and the current stream ordered after them."""
        if not self.virtual:
            return [calls[0](torch.cuda.current_stream(self.device).cuda_stream)]
        current = torch.cuda.current_stream(self.device)
        for s in self.streams:
            s.wait_stream(current)
        try:
            return self.threads.run([functools.partial(c, s.cuda_stream) for c, s in zip(calls, self.streams)])
        finally:
            for s in self.streams:
                current.wait_stream(s)

    def async_errors(self, only_new: bool):
        """Raises the errors kernels recorded (ncclMoeCommGetAsyncError).
        only_new: each comm's (sticky) error only the first time it is
        seen."""
        errors = []
        for c in self.comms:
            e = ctypes.c_int(0)
            self.lib.check(self.lib.ncclMoeCommGetAsyncError(c.ptr, ctypes.byref(e)), "ncclMoeCommGetAsyncError")
            if e.value == _lib.ncclSuccess or (only_new and c.async_reported):
                continue
            c.async_reported = True
            errors.append((c.rank, _lib.make_error(e.value, "rank %d: asynchronous error" % c.rank,
                                                   self.lib.last_error())))
        if errors:
            raise merge_errors(errors)

    def check_list(self, value, name):
        if not isinstance(value, (list, tuple)) or len(value) != self.n_local:
            got = ("%d items" % len(value)) if isinstance(value, (list, tuple)) else type(value).__name__
            raise ValueError("%s must be a list with one entry per virtual rank (%d), got %s"
                             % (name, self.n_local, got))
        return list(value)

    def prefix(self, slot) -> str:
        return ("rank %d: " % self.comms[slot].rank) if self.virtual else ""

    # --------------------------------------------------------- layout
    def layout(self, idxs):
        """ncclMoeGetDispatchLayout of every local rank (not collective)."""
        cfg = self.config
        with self.lock:
            self.check_alive()
            out = []
            for i, idx in enumerate(idxs):
                p = self.prefix(i)
                check_tensor(idx, p + "topk_idx", (torch.int64,), (None, None), "[numTokens, topk]", self.device, 8)
                T, K = idx.shape
                if T > cfg.max_tokens_per_rank:
                    raise ValueError("%stopk_idx has %d tokens, more than max_tokens_per_rank = %d"
                                     % (p, T, cfg.max_tokens_per_rank))
                if not 1 <= K <= cfg.max_topk:
                    raise ValueError("%stopk_idx has topk = %d: must be in [1, max_topk = %d]" % (p, K, cfg.max_topk))
                per_rank = torch.empty(self.n_ranks, dtype=torch.int32, device=self.device)
                per_expert = torch.empty(cfg.num_experts, dtype=torch.int32, device=self.device)
                in_rank = torch.empty(T, self.n_ranks, dtype=torch.bool, device=self.device)
                out.append((idx, per_rank, per_expert, in_rank))
            with self.on_device():
                stream = torch.cuda.current_stream(self.device).cuda_stream
                for i, (idx, per_rank, per_expert, in_rank) in enumerate(out):
                    T, K = idx.shape
                    self.lib.check(self.lib.ncclMoeGetDispatchLayout(
                        self.comms[i].ptr, idx.data_ptr() or None, T, K, per_rank.data_ptr(),
                        per_expert.data_ptr(), in_rank.data_ptr() or None, stream),
                        "ncclMoeGetDispatchLayout")
            return [(a, b, c) for _, a, b, c in out]

    # --------------------------------------------------------- dispatch
    def dispatch_spec(self, slot, x, idx, w, send_fp8) -> Spec:
        """Checks one rank's dispatch inputs as the C API will, so that no
        rank fails in C after its peers started waiting for it."""
        cfg, dev, p = self.config, self.device, self.prefix(slot)
        s = Spec()
        if send_fp8 is not None and not isinstance(send_fp8, bool):
            raise ValueError("send_fp8 must be None, True or False, got %r" % (send_fp8,))
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise ValueError("%sFP8 x is a pair (codes, scales), got %d items" % (p, len(x)))
            codes, scales = x
            check_tensor(codes, p + "x[0] (FP8 codes)", FP8_INPUT_DTYPES, (None, None), "[numTokens, hidden]", dev,
                         _lib.ALIGN)
            T, H = codes.shape
            if H % _lib.FP8_BLOCK != 0:
                raise ValueError("%sFP8 x has hidden = %d: must be a multiple of %d" % (p, H, _lib.FP8_BLOCK))
            check_tensor(scales, p + "x[1] (scales)", (torch.float32,), (T, H // _lib.FP8_BLOCK),
                         "[numTokens, hidden / %d]" % _lib.FP8_BLOCK, dev, 4)
            if send_fp8 is False:
                raise ValueError("%sFP8 x must be sent as FP8: drop send_fp8=False" % p)
            s.x, s.scales, s.fp8_in, s.fp8_send = codes, scales, True, True
        else:
            check_tensor(x, p + "x", (torch.bfloat16,), (None, None), "[numTokens, hidden]", dev, _lib.ALIGN)
            T, H = x.shape
            s.x, s.scales, s.fp8_in, s.fp8_send = x, None, False, bool(send_fp8)
        if T > cfg.max_tokens_per_rank:
            raise ValueError("%sx has %d tokens, more than max_tokens_per_rank = %d of this buffer"
                             % (p, T, cfg.max_tokens_per_rank))
        if not 1 <= H <= cfg.hidden:
            raise ValueError("%sx has hidden = %d: must be in [1, %d] (the buffer's hidden)" % (p, H, cfg.hidden))
        if H % 8 != 0:
            raise ValueError("%sx has hidden = %d: rows must be a multiple of 8 channels (16 bytes)" % (p, H))
        if s.fp8_send and H % _lib.FP8_BLOCK != 0:
            raise ValueError("%sx has hidden = %d: FP8 needs a multiple of %d" % (p, H, _lib.FP8_BLOCK))
        check_tensor(idx, p + "topk_idx", (torch.int64,), (T, None), "[numTokens, topk]", dev, 8)
        K = idx.shape[1]
        if not 1 <= K <= cfg.max_topk:
            raise ValueError("%stopk_idx has topk = %d: must be in [1, max_topk = %d]" % (p, K, cfg.max_topk))
        if w is not None:
            check_tensor(w, p + "topk_weights", (torch.float32,), (T, K), "[numTokens, topk]", dev, 4)
        s.idx, s.w, s.T, s.H, s.K = idx, w, T, H, K
        return s

    def check_same(self, specs):
        """Virtual ranks of one call must agree (the kernels would record an
        async error and drop the batch otherwise)."""
        a = specs[0]
        for i, b in enumerate(specs[1:], 1):
            if (b.H, b.K, b.fp8_in, b.w is None) != (a.H, a.K, a.fp8_in, a.w is None):
                raise ValueError(
                    "rank %d dispatches hidden=%d topk=%d %s input %s weights, rank 0 hidden=%d topk=%d %s input "
                    "%s weights: every rank of one dispatch must agree"
                    % (self.comms[i].rank, b.H, b.K, "FP8" if b.fp8_in else "BF16",
                       "without" if b.w is None else "with", a.H, a.K, "FP8" if a.fp8_in else "BF16",
                       "without" if a.w is None else "with"))

    def check_options(self, scale_format, capacity, expert_alignment):
        if scale_format not in SCALE_FORMATS:
            raise ValueError("scale_format must be one of %s, got %r" % (sorted(SCALE_FORMATS), scale_format))
        capacity = check_int(capacity, "capacity")
        if not 0 <= capacity <= self.config.max_recv_tokens:
            raise ValueError("capacity = %d: must be 0 (exact mode) or in [1, max_recv_tokens = %d]"
                             % (capacity, self.config.max_recv_tokens))
        expert_alignment = check_int(expert_alignment, "expert_alignment")
        if not 0 <= expert_alignment <= _lib.MAX_EXPERT_ALIGNMENT:
            raise ValueError("expert_alignment = %d: must be in [0, %d]" % (expert_alignment,
                                                                          _lib.MAX_EXPERT_ALIGNMENT))
        return SCALE_FORMATS[scale_format], capacity, expert_alignment

    def check_route_owner(self, route, slot, what):
        if not isinstance(route, Route) or route.core is not self or route.slot != slot:
            raise ValueError("%s%s comes from another buffer or rank" % (self.prefix(slot), what))

    def check_route(self, route, slot, what):
        self.check_route_owner(route, slot, what)
        if not route.filled:
            raise ValueError("%s%s holds no routing (its dispatch failed)" % (self.prefix(slot), what))

    def dispatch_raw(self, specs, scale_format, capacity, expert_alignment, reuse=None):
        """ncclMoeDispatch on every local rank; [RawDispatch] of views.
        reuse: the Routes of an earlier dispatch with the same routing."""
        with self.lock:
            self.check_alive()
            if reuse is not None:
                for i, (sp, r) in enumerate(zip(specs, reuse)):
                    self.check_route(r, i, "handle")
                    if (r.num_tokens, r.capacity, r.hidden, r.topk) != (sp.T, capacity, sp.H, sp.K):
                        raise ValueError(
                            "%sreusing a handle needs the numTokens, capacity, hidden and topk of the dispatch that "
                            "filled it (%d, %d, %d, %d), got (%d, %d, %d, %d)"
                            % (self.prefix(i), r.num_tokens, r.capacity, r.hidden, r.topk, sp.T, capacity, sp.H, sp.K))
                routes = list(reuse)
            else:
                routes = [self.acquire(i) for i in range(len(specs))]
            args, results = [], []
            for sp in specs:
                a = _lib.DispatchArgs()
                a.x = sp.x.data_ptr() or None
                a.xType = _lib.ncclFloat8e4m3 if sp.fp8_in else _lib.ncclBfloat16
                a.xScales = sp.scales.data_ptr() or None if sp.scales is not None else None
                a.sendType = _lib.ncclFloat8e4m3 if sp.fp8_send else _lib.ncclBfloat16
                a.scaleFormat = scale_format
                a.numTokens = sp.T
                a.hidden = sp.H
                a.topk = sp.K
                a.topkIdx = sp.idx.data_ptr() or None
                # Weights given but empty here: still non-NULL, or this rank
                # would get no receive-weights pointer for its peers' tokens.
                a.topkWeights = None if sp.w is None else (sp.w.data_ptr() or self.dummy.data_ptr())
                a.capacity = capacity
                a.expertAlignment = expert_alignment
                a.reuseHandle = 1 if reuse is not None else 0
                args.append(a)
                results.append(_lib.DispatchResult())
            lib = self.lib

            def call(i, stream):
                lib.check(lib.ncclMoeDispatch(self.comms[i].ptr, ctypes.byref(args[i]), routes[i].ptr,
                                              ctypes.byref(results[i]), stream),
                          "ncclMoeDispatch on rank %d" % self.comms[i].rank)

            with self.on_device():
                self.run([functools.partial(call, i) for i in range(len(specs))])
            for sp, r, res in zip(specs, routes, results):
                r.num_recv = res.numRecv if capacity == 0 else None
                if reuse is None:  # a reusing dispatch leaves the routing as it was
                    r.filled = True
                    r.num_tokens, r.capacity, r.hidden, r.topk = sp.T, capacity, sp.H, sp.K
                    r.topk_idx = sp.idx
            if capacity == 0:
                # The host already waited for this dispatch's notify step:
                # report what the kernels recorded (a sticky error once).
                self.async_errors(only_new=True)
            return [self._views(sp, r, res, capacity) for sp, r, res in zip(specs, routes, results)]

    def _views(self, sp, route, res, capacity) -> RawDispatch:
        dev, H, K, L = self.device, sp.H, sp.K, self.config.num_local_experts
        rows = capacity if capacity > 0 else res.numRecv
        out = RawDispatch()
        out.route = route
        if sp.fp8_send:
            out.recv_x = as_fp8(_dlpack.wrap(res.recvX, (rows, H), torch.uint8, dev, self))
            out.recv_scales = _dlpack.wrap(res.recvScales, (rows, H // _lib.FP8_BLOCK), torch.float32, dev, self)
        else:
            out.recv_x = _dlpack.wrap(res.recvX, (rows, H), torch.bfloat16, dev, self)
            out.recv_scales = None
        out.recv_idx = _dlpack.wrap(res.recvTopkIdx, (rows, K), torch.int64, dev, self)
        out.recv_w = (_dlpack.wrap(res.recvTopkWeights, (rows, K), torch.float32, dev, self)
                      if sp.w is not None else None)
        # Counts live in the handle's memory: the views keep the handle.
        out.recv_count = _dlpack.wrap(res.recvCount, (1,), torch.int32, dev, route)
        out.recv_tpe = _dlpack.wrap(res.recvTokensPerExpert, (L,), torch.int32, dev, route)
        if capacity == 0:
            out.num_recv = res.numRecv
            host = ctypes.cast(res.hostRecvTokensPerExpert, ctypes.POINTER(ctypes.c_int))
            out.host_tpe = [host[i] for i in range(L)]
        else:
            out.num_recv = None
            out.host_tpe = None
        return out

    # --------------------------------------------------------- combine
    def combine_raw(self, xs, routes, ws, outs=None):
        """ncclMoeCombine on every local rank; [(out, out_topk_weights)].
        xs[i] None: combine what the combine buffer holds (used where only the
        weights matter)."""
        with self.lock:
            self.check_alive()
            dev = self.device
            for i, r in enumerate(routes):
                self.check_route(r, i, "handle")
            if self.virtual and len({w is None for w in ws}) > 1:
                raise ValueError("topk_weights must be given for every virtual rank or for none")
            args, keep = [], []
            for i, (x, r, w) in enumerate(zip(xs, routes, ws)):
                p, comm = self.prefix(i), self.comms[i]
                rows = r.rows
                if x is not None:
                    check_tensor(x, p + "x", (torch.bfloat16,), (rows, r.hidden), "[received rows, hidden]", dev,
                                 _lib.ALIGN)
                if w is not None:
                    check_tensor(w, p + "topk_weights", (torch.float32,), (rows, r.topk), "[received rows, topk]",
                                 dev, 4)
                if outs is not None and outs[i] is not None:
                    out = check_tensor(outs[i], p + "out", (torch.bfloat16,), (r.num_tokens, r.hidden),
                                       "[numTokens, hidden]", dev, _lib.ALIGN)
                else:
                    out = torch.empty(r.num_tokens, r.hidden, dtype=torch.bfloat16, device=dev)
                out_w = (torch.empty(r.num_tokens, r.topk, dtype=torch.float32, device=dev)
                         if w is not None else None)
                a = _lib.CombineArgs()
                # An empty or absent x: the combine buffer itself (zero-copy,
                # nothing to stage).
                a.x = x.data_ptr() if x is not None and x.numel() > 0 else comm.combine_ptr
                a.hidden = r.hidden
                a.topkWeights = None if w is None else (w.data_ptr() or self.dummy.data_ptr())
                a.out = out.data_ptr() or self.dummy.data_ptr()
                a.outTopkWeights = None if w is None else (out_w.data_ptr() or self.dummy.data_ptr())
                args.append(a)
                keep.append((x, w, out, out_w))
            lib = self.lib

            def call(i, stream):
                lib.check(lib.ncclMoeCombine(self.comms[i].ptr, ctypes.byref(args[i]), routes[i].ptr, stream),
                          "ncclMoeCombine on rank %d" % self.comms[i].rank)

            with self.on_device():
                self.run([functools.partial(call, i) for i in range(len(routes))])
            return [(k[2], k[3]) for k in keep]

    def combine_buffer(self, slot, route=None) -> torch.Tensor:
        """The communicator's combine buffer as BF16 rows: [rows, hidden] of
        `route`, or all of it ([max_recv_tokens, config hidden])."""
        self.check_alive()
        c = self.comms[slot]
        if route is None:
            shape = (self.config.max_recv_tokens, self.config.hidden)
        else:
            self.check_route(route, slot, "handle")
            shape = (route.rows, route.hidden)
        return _dlpack.wrap(c.combine_ptr, shape, torch.bfloat16, self.device, self)

    def buffer_bytes(self):
        out = []
        for c in self.comms:
            n = ctypes.c_size_t()
            self.lib.check(self.lib.ncclMoeCommBufferBytes(c.ptr, ctypes.byref(n)), "ncclMoeCommBufferBytes")
            out.append(n.value)
        return out


class LLSpec:
    """One rank's checked low-latency dispatch input."""

    __slots__ = ("x", "idx", "cumulative", "T", "H", "K")


LL_SCALE_FORMATS = {"float": _lib.SCALE_FLOAT, "pow2": _lib.SCALE_POW2, "ue8m0": _lib.SCALE_UE8M0}


class LowLatency:
    """The low-latency calls of a Core (ncclMoeLowLatency*). Kept apart from
    the normal mode: other buffers, other handles' state, other rules (see
    the header: two buffer sets used in turn, no host synchronization)."""

    def __init__(self, core: Core):
        self.core = core

    def check_available(self):
        core = self.core
        core.check_alive()
        if not core.lib.has_low_latency:
            raise RuntimeError("%s has no low-latency API (built without NCCL_MOE_HAS_LOW_LATENCY)" % core.lib.path)
        if core.config.ll_max_tokens_per_rank == 0:
            raise ValueError("this buffer has no low-latency buffers: create it with ll_max_tokens_per_rank > 0")

    def spec(self, slot, x, idx, send_fp8, cumulative) -> LLSpec:
        core = self.core
        cfg, dev, p = core.config, core.device, core.prefix(slot)
        check_tensor(x, p + "x", (torch.bfloat16,), (None, None), "[numTokens, hidden]", dev, _lib.ALIGN)
        T, H = x.shape
        if T > cfg.ll_max_tokens_per_rank:
            raise ValueError("%sx has %d tokens, more than ll_max_tokens_per_rank = %d of this buffer"
                             % (p, T, cfg.ll_max_tokens_per_rank))
        if not 1 <= H <= cfg.hidden:
            raise ValueError("%sx has hidden = %d: must be in [1, %d] (the buffer's hidden)" % (p, H, cfg.hidden))
        if H % 8 != 0:
            raise ValueError("%sx has hidden = %d: rows must be a multiple of 8 channels (16 bytes)" % (p, H))
        if send_fp8 and H % _lib.FP8_BLOCK != 0:
            raise ValueError("%sx has hidden = %d: FP8 needs a multiple of %d" % (p, H, _lib.FP8_BLOCK))
        check_tensor(idx, p + "topk_idx", (torch.int64,), (T, None), "[numTokens, topk]", dev, 8)
        K = idx.shape[1]
        if not 1 <= K <= cfg.max_topk:
            raise ValueError("%stopk_idx has topk = %d: must be in [1, max_topk = %d]" % (p, K, cfg.max_topk))
        if cumulative is not None:
            check_tensor(cumulative, p + "cumulative_recv_count", (torch.int64,), (cfg.num_local_experts,),
                         "[num_local_experts]", dev, 8)
        s = LLSpec()
        s.x, s.idx, s.cumulative, s.T, s.H, s.K = x, idx, cumulative, T, H, K
        return s

    def dispatch(self, specs, send_fp8, scale_format, send_only):
        """ncclMoeLowLatencyDispatch on every local rank: [(Route, views)]."""
        core = self.core
        if scale_format not in LL_SCALE_FORMATS:
            raise ValueError("scale_format must be one of %s, got %r" % (sorted(LL_SCALE_FORMATS), scale_format))
        if core.virtual and len({s.H for s in specs}) > 1:
            raise ValueError("every rank of one low-latency dispatch must use the same hidden, got %s"
                             % [s.H for s in specs])
        with core.lock:
            core.check_alive()
            routes = [core.acquire(i) for i in range(len(specs))]
            args, results = [], []
            for sp in specs:
                a = _lib.LowLatencyDispatchArgs()
                a.x = sp.x.data_ptr() or None
                a.numTokens, a.hidden, a.topk = sp.T, sp.H, sp.K
                a.topkIdx = sp.idx.data_ptr() or None
                a.sendType = _lib.ncclFloat8e4m3 if send_fp8 else _lib.ncclBfloat16
                a.scaleFormat = LL_SCALE_FORMATS[scale_format]
                a.cumulativeRecvCount = sp.cumulative.data_ptr() if sp.cumulative is not None else None
                a.sendOnly = 1 if send_only else 0
                args.append(a)
                results.append(_lib.LowLatencyDispatchResult())
            lib = core.lib

            def call(i, stream):
                lib.check(lib.ncclMoeLowLatencyDispatch(core.comms[i].ptr, ctypes.byref(args[i]), routes[i].ptr,
                                                        ctypes.byref(results[i]), stream),
                          "ncclMoeLowLatencyDispatch on rank %d" % core.comms[i].rank)

            with core.on_device():
                core.run([functools.partial(call, i) for i in range(len(specs))])
            return [(r, self._views(sp, res, send_fp8, scale_format)) for sp, r, res in zip(specs, routes, results)]

    def _views(self, sp, res, send_fp8, scale_format):
        core = self.core
        dev, L, S, H = core.device, res.numLocalExperts, res.expertStride, sp.H
        v = {"expert_stride": S, "num_local_experts": L}
        if send_fp8:
            codes = as_fp8(_dlpack.wrap(res.recvX, (L, S, H), torch.uint8, dev, core))
            # UE8M0 scales are packed uint32 words: shown as int32 (same bits).
            sdt = torch.int32 if scale_format == "ue8m0" else torch.float32
            v["recv_x"] = (codes, _dlpack.wrap(res.recvScales, (L, S, res.scaleStride), sdt, dev, core))
        else:
            v["recv_x"] = _dlpack.wrap(res.recvX, (L, S, H), torch.bfloat16, dev, core)
        v["recv_count_per_expert"] = _dlpack.wrap(res.recvCountPerExpert, (L,), torch.int32, dev, core)
        v["recv_source"] = _dlpack.wrap(res.recvSource, (L, S), torch.int32, dev, core)
        return v

    def recv(self, routes, name):
        """The receive half (ncclMoeLowLatencyDispatchRecv / ...CombineRecv)
        of every local rank."""
        core = self.core
        with core.lock:
            core.check_alive()
            lib = core.lib
            fn = getattr(lib, name)

            def call(i, stream):
                lib.check(fn(core.comms[i].ptr, routes[i].ptr, stream), "%s on rank %d" % (name, core.comms[i].rank))

            with core.on_device():
                core.run([functools.partial(call, i) for i in range(len(routes))])

    def combine(self, xs, metas, ws, outs, send_only):
        """ncclMoeLowLatencyCombine on every local rank. metas[i]: (route,
        num_tokens, hidden, topk, expert_stride). Returns the outputs."""
        core = self.core
        dev, L = core.device, core.config.num_local_experts
        if core.virtual and len({w is None for w in ws}) > 1:
            raise ValueError("topk_weights must be given for every virtual rank or for none")
        with core.lock:
            core.check_alive()
            args, keep = [], []
            for i, (x, (route, T, H, K, S), w) in enumerate(zip(xs, metas, ws)):
                p = core.prefix(i)
                check_tensor(x, p + "x", (torch.bfloat16,), (L, S, H), "[num_local_experts, expert_stride, hidden]",
                             dev, _lib.ALIGN)
                if w is not None:
                    check_tensor(w, p + "topk_weights", (torch.float32,), (T, K), "[numTokens, topk]", dev, 4)
                if outs is not None and outs[i] is not None:
                    out = check_tensor(outs[i], p + "out", (torch.bfloat16,), (T, H), "[numTokens, hidden]", dev,
                                       _lib.ALIGN)
                else:
                    out = torch.empty(T, H, dtype=torch.bfloat16, device=dev)
                a = _lib.LowLatencyCombineArgs()
                a.x = x.data_ptr()
                a.topkWeights = w.data_ptr() if w is not None and w.numel() > 0 else None
                a.out = out.data_ptr() or core.dummy.data_ptr()
                a.sendOnly = 1 if send_only else 0
                args.append(a)
                keep.append((x, w, out))
            lib = core.lib

            def call(i, stream):
                lib.check(lib.ncclMoeLowLatencyCombine(core.comms[i].ptr, ctypes.byref(args[i]), metas[i][0].ptr,
                                                       stream),
                          "ncclMoeLowLatencyCombine on rank %d" % core.comms[i].rank)

            with core.on_device():
                core.run([functools.partial(call, i) for i in range(len(xs))])
            return keep

    def buffer_bytes(self):
        core = self.core
        out = []
        for c in core.comms:
            n = ctypes.c_size_t()
            core.lib.check(core.lib.ncclMoeLowLatencyBufferBytes(c.ptr, ctypes.byref(n)),
                           "ncclMoeLowLatencyBufferBytes")
            out.append(n.value)
        return out


def own_copy(raw: RawDispatch, capacity: int, device) -> RawDispatch:
    """Private copies of a dispatch's received tensors (autograd keeps them
    past the next dispatch, which overwrites the communicator's buffers). In
    capacity mode rows past the received count hold stale data: they become
    zeros (weights 0, ids -1), so computing on them adds nothing to outputs or
    gradients."""
    out = RawDispatch()
    out.route, out.recv_count, out.recv_tpe = raw.route, raw.recv_count, raw.recv_tpe
    out.num_recv, out.host_tpe = raw.num_recv, raw.host_tpe
    if capacity > 0:
        valid = (torch.arange(capacity, device=device) < raw.recv_count.to(torch.int64).clamp(max=capacity))
        valid = valid.unsqueeze(1)

        def keep(t, fill):
            return torch.where(valid, t, torch.full((), fill, dtype=t.dtype, device=device))
    else:
        def keep(t, fill):
            return t.clone()
    if raw.recv_scales is not None:
        codes = raw.recv_x.view(torch.uint8) if raw.recv_x.dtype != torch.uint8 else raw.recv_x
        out.recv_x = as_fp8(keep(codes, 0))
        out.recv_scales = keep(raw.recv_scales, 0.0)
    else:
        out.recv_x = keep(raw.recv_x, 0.0)
        out.recv_scales = None
    out.recv_idx = keep(raw.recv_idx, -1)
    out.recv_w = keep(raw.recv_w, 0.0) if raw.recv_w is not None else None
    return out
