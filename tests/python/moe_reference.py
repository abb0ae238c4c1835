# SPDX-License-Identifier: Apache-2.0
"""Plain torch (CPU) reference of dispatch, combine and layout, and the small
MoE layer the autograd tests differentiate, for the nccl_moe tests.

Receive order (the C API's): rows ordered by source rank, then by token index
at the source; a token goes once to every rank owning one of its experts.
Combine: out[t] = the fp32 sum, in ascending rank order starting from 0, of
the rows returned for t, rounded to BF16 once.
"""

import torch


def make_routing(gen, T, K, E, N, kind="uniform", drop=0.0):
    """int64 [T, K] of distinct expert ids per token, with a fraction `drop`
    of entries set to -1. kind: uniform | skewed (most picks among the first
    quarter of the experts: uneven loads) | one_rank (only rank 0's
    experts)."""
    if kind == "one_rank":
        L = E // N
        assert K <= L
        scores = torch.full((T, E), -1.0)
        scores[:, :L] = torch.rand(T, L, generator=gen)
    else:
        scores = torch.rand(T, E, generator=gen)
        if kind == "skewed":
            scores[:, : max(1, E // 4)] += 0.75
    idx = scores.topk(K, dim=1).indices if T > 0 else torch.empty(0, K, dtype=torch.int64)
    if drop > 0 and T > 0:
        idx[torch.rand(T, K, generator=gen) < drop] = -1
    return idx.to(torch.int64).contiguous()


class Routing:
    """Where every token of every rank lands. idxs: per source rank, CPU
    int64 [T_s, K]."""

    def __init__(self, idxs, N, E):
        self.N, self.E, self.L = N, E, E // N
        self.idxs = [i.cpu() for i in idxs]
        self.in_rank = []
        for idx in self.idxs:
            owner = torch.where(idx >= 0, idx // self.L, torch.full_like(idx, -1))
            self.in_rank.append(torch.stack([(owner == r).any(1) for r in range(N)], 1)
                                if idx.shape[0] else torch.zeros(0, N, dtype=torch.bool))
        # row[s][t, r]: row of token t of rank s at rank r, or -1.
        self.row = [torch.full((i.shape[0], N), -1, dtype=torch.int64) for i in self.idxs]
        self.sources = [[] for _ in range(N)]
        self.counts = []
        for r in range(N):
            base = 0
            for s in range(N):
                tok = self.in_rank[s][:, r].nonzero().flatten()
                self.row[s][tok, r] = base + torch.arange(tok.numel())
                self.sources[r].append((s, tok))
                base += tok.numel()
            self.counts.append(base)

    def layout(self, s):
        idx = self.idxs[s]
        per_rank = self.in_rank[s].sum(0).to(torch.int32)
        per_expert = torch.bincount(idx[idx >= 0], minlength=self.E).to(torch.int32)
        return per_rank, per_expert, self.in_rank[s].clone()

    def local_ids(self, idx, r):
        mine = (idx >= 0) & (idx // self.L == r)
        return torch.where(mine, idx - r * self.L, torch.full_like(idx, -1))

    def recv(self, r, rows_of):
        """Concatenation over sources of rows_of(s)[tokens of s sent to r]."""
        parts = [rows_of(s)[tok] for s, tok in self.sources[r]]
        return torch.cat(parts) if parts else None

    def recv_idx(self, r):
        return torch.cat([self.local_ids(self.idxs[s][tok], r) for s, tok in self.sources[r]])

    def recv_weights(self, r, ws):
        ids = self.recv_idx(r)
        w = self.recv(r, lambda s: ws[s].cpu())
        return torch.where(ids >= 0, w, torch.zeros_like(w))

    def tokens_per_expert(self, r, align=1):
        ids = self.recv_idx(r)
        counts = torch.stack([(ids == l).any(1).sum() for l in range(self.L)]).to(torch.int32)
        align = max(align, 1)
        return (counts + align - 1) // align * align

    def combine(self, ys, caps=None, dtype=torch.bfloat16):
        """ys[r]: CPU [rows_r, H] (BF16 or fp32 rows returned by rank r).
        caps[r]: rows rank r kept (capacity mode), None = all."""
        out = []
        for s in range(self.N):
            T = self.idxs[s].shape[0]
            H = ys[0].shape[1]
            acc = torch.zeros(T, H, dtype=torch.float32)
            for r in range(self.N):
                rr = self.row[s][:, r]
                m = rr >= 0
                if caps is not None:
                    m &= rr < caps[r]
                acc[m] += ys[r][rr[m]].float()
            out.append(acc.to(dtype))
        return out


def bf16_rows(gen, n, H, scale=1.0):
    return (torch.randn(n, H, generator=gen) * scale).to(torch.bfloat16)


# ------------------------------------------------------------- low latency
def ll_routing(idxs, N, E, ranks_per_node=None):
    """Low-latency receive order. rows[r][l]: the (source rank, token) pairs
    local expert l of rank r receives, in order (sources of r's node, then
    those of other nodes, each in source rank, then token order; a token once
    per distinct expert); at[(s, t, e)]: the row of token t of rank s at
    expert e."""
    L = E // N
    per_node = ranks_per_node or N
    rows = [[[] for _ in range(L)] for _ in range(N)]
    at = {}
    for same_node in (True, False):
        for s in range(N):
            for t in range(idxs[s].shape[0]):
                seen = set()
                for e in idxs[s][t].tolist():
                    if e < 0 or e in seen:
                        continue
                    seen.add(e)
                    if (s // per_node == (e // L) // per_node) != same_node:
                        continue
                    at[(s, t, e)] = len(rows[e // L][e % L])
                    rows[e // L][e % L].append((s, t))
    return rows, at


def ll_combine(idxs, ws, ys, at, N, E, s):
    """Low-latency combine of rank s: out[t] = the sum, over the valid k in
    order, of w[t, k] * y[expert][row] (one fp32 rounding per step, as fmaf;
    ws None = weight 1), rounded to BF16 once. ys[r]: [L, stride, H]."""
    L = E // N
    idx = idxs[s]
    T, K = idx.shape
    H = ys[0].shape[2]
    acc = torch.zeros(T, H, dtype=torch.float32)
    for t in range(T):
        for k in range(K):
            e = int(idx[t, k])
            if e < 0:
                continue
            w = float(ws[s][t, k]) if ws is not None else 1.0
            y = ys[e // L][e % L, at[(s, t, e)]].double()
            acc[t] = (w * y + acc[t].double()).float()
    return acc.to(torch.bfloat16)


# ------------------------------------------------------------- MoE layer
def router(x, gate, K, drop_mask=None):
    """Softmax router with top-k (weights renormalized). drop_mask [T, K]
    bool: entries to turn into -1 (weight 0)."""
    probs = torch.softmax(x.float() @ gate, dim=-1)
    w, idx = probs.topk(K, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    if drop_mask is not None:
        idx = torch.where(drop_mask, torch.full_like(idx, -1), idx)
        w = torch.where(drop_mask, torch.zeros_like(w), w)
    return idx.contiguous(), w.contiguous()


def expert_mlp(xf, w1, w2):
    return torch.relu(xf @ w1) @ w2


def local_experts(recv_xf, recv_idx, recv_w, w1, w2):
    """The rows of one rank's experts: row i = sum over k with a local expert
    l = recv_idx[i, k] of recv_w[i, k] * MLP_l(recv_x[i]), as BF16 for
    combine."""
    y = torch.zeros(recv_xf.shape[0], w2.shape[2], device=recv_xf.device)
    for l in range(w1.shape[0]):
        rows, ks = (recv_idx == l).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        y = y.index_add(0, rows, expert_mlp(recv_xf[rows], w1[l], w2[l]) * recv_w[rows, ks].unsqueeze(1))
    return y.to(torch.bfloat16)


def dense_moe(xf, idx, w, w1, w2):
    """The same layer without communication: every expert on every token."""
    out = torch.zeros(xf.shape[0], w2.shape[2], device=xf.device)
    for e in range(w1.shape[0]):
        rows, ks = (idx == e).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        out = out.index_add(0, rows, expert_mlp(xf[rows], w1[e], w2[e]) * w[rows, ks].unsqueeze(1))
    return out


def assert_close(got, want, what, rel=2e-2, abs_=1e-5):
    """max |got - want| <= rel * max |want| + abs_ (BF16 inputs and rows). A
    None gradient (autograd's "no path") counts as zeros."""
    if got is None and want is None:
        return
    got = torch.zeros_like(want) if got is None else got
    want = torch.zeros_like(got) if want is None else want
    got = got.detach().float().cpu()
    want = want.detach().float().cpu()
    assert got.shape == want.shape, "%s: shape %s, want %s" % (what, list(got.shape), list(want.shape))
    if want.numel() == 0:
        return
    err = (got - want).abs().max().item()
    bound = rel * want.abs().max().item() + abs_
    assert err <= bound, "%s: max |diff| %.3g > %.3g" % (what, err, bound)
