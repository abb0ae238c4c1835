# SPDX-License-Identifier: Apache-2.0
"""Autograd for dispatch and combine.

dispatch sends row t of x to every rank owning one of its experts, and the
weights topk_weights[t, k] to the owner of expert k (0 elsewhere). Its
gradient is therefore a combine: grad_x[t] = sum over the ranks t went to of
the gradient of its received row; grad_topk_weights[t, k] = the gradient of
the received weight at the owner of expert k (the other ranks' entries were
constant zeros, so their gradients are masked out before the combine sums
them).

combine sums, for each token, the rows the ranks return for it. Its gradient
is a dispatch with the same routing (the handle is reused: no layout, no
notify): every rank that returned a row for token t gets grad_out[t].

Which inputs get gradients: x (BF16 dispatch) and topk_weights of dispatch;
x of combine. Not: topk_idx (integers), FP8 inputs or FP8 sends (no gradient
through a quantization), and combine's topk_weights (its summed weights are a
bookkeeping output, returned without gradient).

Both directions are collectives: every rank must run the backward of the same
dispatches and combines, in the same order. The graph guarantees that when
all ranks run the same model: a recorded dispatch gives its handle a scalar
"token" output that the matching combine takes as an input, so the combine's
backward always leads to the dispatch's backward, even on a rank whose
experts did not use the received rows.
"""

from __future__ import annotations

import torch

from ._core import own_copy


class DispatchCall:
    """What forward needs besides tensors, and what it hands back besides
    its differentiable outputs."""

    def __init__(self, specs, scale_format, capacity, expert_alignment, reuse):
        self.specs = specs
        self.scale_format = scale_format
        self.capacity = capacity
        self.expert_alignment = expert_alignment
        self.reuse = reuse
        self.raws = None


class DispatchFn(torch.autograd.Function):
    """Inputs: core, call, then per rank (x or FP8 codes, scales, topk_idx,
    topk_weights). Outputs per rank: (received x, received weights or an
    empty placeholder, token)."""

    @staticmethod
    def forward(ctx, core, call, *flat):
        raws = core.dispatch_raw(call.specs, call.scale_format, call.capacity, call.expert_alignment, call.reuse)
        raws = [own_copy(r, call.capacity, core.device) for r in raws]
        call.raws = raws
        outputs, frozen = [], []
        for raw in raws:
            w = raw.recv_w if raw.recv_w is not None else torch.empty(0, device=core.device)
            token = torch.zeros((), device=core.device)
            outputs += [raw.recv_x, w, token]
            if raw.recv_scales is not None:
                frozen.append(raw.recv_x)
            if raw.recv_w is None:
                frozen.append(w)
        if frozen:
            ctx.mark_non_differentiable(*frozen)
        ctx.core = core
        ctx.routes = [r.route for r in raws]
        # Received ids, to mask the weight gradients of experts owned
        # elsewhere; plain tensors (no grad_fn), safe to keep on ctx.
        ctx.recv_idx = [r.recv_idx for r in raws]
        ctx.fp8 = [r.recv_scales is not None for r in raws]
        ctx.with_weights = [s.w is not None for s in call.specs]
        return tuple(outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        core = ctx.core
        xs, ws = [], []
        for i, route in enumerate(ctx.routes):
            g_x, g_w = grads[3 * i], grads[3 * i + 1]
            if ctx.fp8[i] or g_x is None:
                xs.append(None)  # nothing flows back to x: combine whatever, discard
            else:
                xs.append(g_x.to(torch.bfloat16).contiguous())
            if ctx.with_weights[i]:
                if g_w is None:
                    g_w = torch.zeros(route.rows, route.topk, dtype=torch.float32, device=core.device)
                local = ctx.recv_idx[i] >= 0
                ws.append(torch.where(local, g_w.to(torch.float32), torch.zeros((), device=core.device)).contiguous())
            else:
                ws.append(None)
        combined = core.combine_raw(xs, ctx.routes, ws)
        out = [None, None]
        for i, (g_x, g_w) in enumerate(combined):
            need_x = ctx.needs_input_grad[2 + 4 * i] and xs[i] is not None
            need_w = ctx.needs_input_grad[2 + 4 * i + 3]
            out += [g_x if need_x else None, None, None, g_w if need_w else None]
        return tuple(out)


class CombineCall:
    def __init__(self, routes, outs):
        self.routes = routes
        self.outs = outs
        self.out_weights = None


class CombineFn(torch.autograd.Function):
    """Inputs: core, call, then per rank (x, topk_weights, token of the
    dispatch or None). Outputs: per rank the combined tokens."""

    @staticmethod
    def forward(ctx, core, call, *flat):
        xs = list(flat[0::3])
        ws = list(flat[1::3])
        combined = core.combine_raw(xs, call.routes, ws, call.outs)
        call.out_weights = [w for _, w in combined]
        ctx.core = core
        ctx.routes = call.routes
        ctx.has_token = [t is not None for t in flat[2::3]]
        return tuple(o for o, _ in combined)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        core = ctx.core
        specs = []
        for i, (route, g) in enumerate(zip(ctx.routes, grads)):
            if g is None:
                g = torch.zeros(route.num_tokens, route.hidden, dtype=torch.bfloat16, device=core.device)
            specs.append(core.dispatch_spec(i, g.to(torch.bfloat16).contiguous(), route.topk_idx, None, False))
        capacity = ctx.routes[0].capacity
        raws = core.dispatch_raw(specs, 0, capacity, 0, reuse=ctx.routes)
        raws = [own_copy(r, capacity, core.device) for r in raws]
        out = [None, None]
        for i, raw in enumerate(raws):
            need_x = ctx.needs_input_grad[2 + 3 * i]
            token_grad = torch.zeros((), device=core.device) if ctx.has_token[i] else None
            out += [raw.recv_x if need_x else None, None, token_grad]
        return tuple(out)
