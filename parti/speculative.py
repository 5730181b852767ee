"""Speculative Jacobi decoding (SJD): plain sampling's distribution in fewer forward passes.

Each forward pass reads a window of L tokens per row: the last committed one, then L - 1 drafts, and so
gives the distribution p of the L positions after the committed prefix (`WindowDecoder`: a pre-allocated
KV cache with absolute positions, so undoing rejected drafts is resetting a row's length). Draft i was drawn
from q_i; it is accepted with probability min(1, p_i(d_i) / q_i(d_i)). At the first rejection a token is
drawn from norm(max(0, p - q)) (nothing applied to it after it is formed); when the drafts run out, from
the last p. So each pass commits 1 to L tokens, each distributed as plain sampling's `p`: guided, tempered,
top-k and top-p filtered (`parti.sampling.filter_logits`); greedy stays greedy.

Drafts: a new one is copied from its left neighbour in the grid (the one above for the first column) or
random. Its q is one-hot at itself: then test and residual together are one draw x ~ p, accepted when
x equals the draft (the same law as min(1, p(d)) and norm(p - onehot(d)), with plain sampling's one uniform
per token, so a window of 1 is plain sampling token for token). Drafts past the first rejection are Jacobi
iterates: drawn anew from this pass's p (plain SJD), or kept through the same test against it, with its
residual on failure (`coupled`, MC-SJD): either way the new draft is distributed as this p, its new q.
Each row of a batch has its own commit pointer (ragged acceptance); a row's accepted tokens are committed
at once, never tested again.

References: Teng et al., "Accelerating auto-regressive text-to-image generation with training-free
speculative Jacobi decoding" (ICLR 2025); So et al., speculative coupled decoding (ICML 2026).
`tests/test_speculative.py` checks the distribution exactly against enumeration on a toy model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from parti.decoding import PackedLinear, context_kv, null_cross_outputs
from parti.errors import PartiError
from parti.generator import Generator
from parti.sampling import SamplingParams, draw, filter_logits, guide

# The window when `sjd_window` is unset: (device type, weight dtype) -> (window, the largest batch it is used
# for); other pairs and larger batches get 1 (plain sampling). On CPU in fp32 (int8 weights included) a window
# of 8 was faster at batch 1 on the trained demo generator and on the `bench` preset, and not at batch 4, where
# the window's rows cost more than the passes it saves (benchmarks/bench_speculative.py; docs/benchmarks.md,
# "Speculative Jacobi decoding and int8 weights").
AUTO_WINDOW: dict[tuple[str, torch.dtype], tuple[int, int]] = {("cpu", torch.float32): (8, 1)}


def auto_window(device: torch.device, dtype: torch.dtype, batch: int) -> int:
    window, max_batch = AUTO_WINDOW.get((torch.device(device).type, dtype), (1, 0))
    return window if batch <= max_batch else 1


def sjd_window(params: SamplingParams, model: Generator, batch: int) -> int:
    """The window `params` asks for, for `batch` prompts on `model`'s device and precision (1: plain
    sampling), at most T."""
    p = next(model.layers.parameters())
    window = params.sjd_window if params.sjd_window is not None else auto_window(p.device, p.dtype, batch)
    return min(window, model.config.seq_len)


@dataclass
class SpeculativeResult:
    codes: torch.Tensor  # (B, T) long
    forwards: torch.Tensor  # (B,) long: forward passes each image took (plain sampling: T)
    accepted: torch.Tensor  # (L,) long: forward passes (over rows) that accepted 0, 1, ..., L - 1 drafts
    logits: torch.Tensor | None  # (rows, T, K) fp32: the raw logits each code was drawn from (record_logits)

    @property
    def tokens_per_forward(self) -> float:
        return self.codes.numel() / max(int(self.forwards.sum()), 1)


def _linear(m: nn.Module, rows: int):
    """Plain float linears through `PackedLinear`; other modules (int8 ones, `parti.quantize`) as they are."""
    return PackedLinear(m, rows) if type(m) is nn.Linear else m


class WindowDecoder:
    """Cached decoding of `model` for `batch` prompts, `window` tokens per row and forward pass, each row
    at its own position. With `guided`, 2 * batch rows: the conditional ones, then the null ones.

    The KV cache holds T + window - 1 positions per row (a window past the last code writes into the slack),
    and a pass at `start` writes positions start..start + L - 1: what was written after a row's commit
    pointer is simply overwritten by its next pass, and masked out before that."""

    def __init__(self, model: Generator, *, batch: int, guided: bool, context_len: int, window: int):
        c = model.config
        self.model, self.batch, self.guided, self.window = model, batch, guided, window
        self.seq_len, self.grid_size, self.num_codes, self.bos = c.seq_len, c.grid_size, c.num_codes, model.bos
        self.rows, self.heads = (2 * batch if guided else batch), c.heads
        p = next(model.layers.parameters())
        self.device, kw = p.device, {"dtype": p.dtype, "device": p.device}
        shape = (self.rows, c.heads, c.seq_len + window - 1, c.dim // c.heads)
        self.cache = [(torch.zeros(shape, **kw), torch.zeros(shape, **kw)) for _ in range(c.depth)]
        self.ctx_kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (B, H, L', d), set by `start`
        self.ctx_mask = torch.zeros(batch, 1, 1, context_len, **kw)  # additive
        self.null_outs = [o.reshape(1, 1, -1) for o in null_cross_outputs(model)] if guided else []
        rows, conds = self.rows * window, batch * window  # rows of each linear's product
        self.linears = [{**{k: _linear(m, rows) for k, m in (("q", layer.self_attn.q), ("kv", layer.self_attn.kv),
                                                              ("out", layer.self_attn.out), ("fc1", layer.mlp.fc1),
                                                              ("fc2", layer.mlp.fc2))},
                         "cq": _linear(layer.cross_attn.q, conds), "cout": _linear(layer.cross_attn.out, conds)}
                        for layer in model.layers]
        self.head = _linear(model.head, rows) if model.head.weight.dtype == torch.float32 else None

    def start(self, context: torch.Tensor, context_mask: torch.Tensor) -> None:
        """A new batch of prompts: context (B, L', dim), mask (B, L') bool. The cache needs no clearing:
        every position is written before a query may read it."""
        if context.shape[0] != self.batch or context.shape[1] > self.ctx_mask.shape[-1]:
            raise ValueError(f"a context of {tuple(context.shape[:2])} for a decoder of {self.batch} rows x "
                             f"{self.ctx_mask.shape[-1]} tokens")
        self.ctx_kv = context_kv(self.model, context)
        self.ctx_mask = torch.zeros_like(self.ctx_mask[..., :context.shape[1]])
        self.ctx_mask.masked_fill_(~context_mask.bool()[:, None, None, :], torch.finfo(self.ctx_mask.dtype).min)

    def __call__(self, tokens: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """tokens (rows, L): the inputs at positions start..start + L - 1 per row (BOS at 0), start (rows,)
        long -> fp32 logits (rows, L, K); logits[r, i] predicts the code at position start[r] + i."""
        m, R, L, b, H = self.model, self.rows, tokens.shape[1], self.batch, self.heads
        pos = start[:, None] + torch.arange(L, device=start.device)  # (R, L) absolute positions
        at = pos.clamp_max(self.seq_len - 1)  # past the last code: any embedding (their logits are unused)
        x = m.token_emb(tokens) + m.row_emb(m.rows[at]) + m.col_emb(m.cols[at])  # (R, L, D)
        n = int(pos.max()) + 1  # keys up to the furthest query
        causal = (torch.arange(n, device=pos.device) <= pos[:, :, None])[:, None]  # (R, 1, L, n)
        rows = torch.arange(R, device=pos.device)[:, None]
        for i, layer in enumerate(m.layers):
            lin, (k_cache, v_cache) = self.linears[i], self.cache[i]  # (R, H, T + L - 1, d)
            h = layer.norm1(x)
            kv = lin["kv"](h).view(R, L, 2, H, -1)
            k_cache.transpose(1, 2)[rows, pos] = kv[:, :, 0]  # (R, L, H, d) written at each row's positions
            v_cache.transpose(1, 2)[rows, pos] = kv[:, :, 1]
            q = lin["q"](h).view(R, L, H, -1).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k_cache[:, :, :n], v_cache[:, :, :n], attn_mask=causal)
            x = x + lin["out"](o.transpose(1, 2).reshape(R, L, -1))
            # Cross-attention of the conditional rows; null rows (guided) add their constant output.
            x_c = x[:b]
            q = lin["cq"](layer.norm2(x_c)).view(b, L, H, -1).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, *self.ctx_kv[i], attn_mask=self.ctx_mask)
            x_c = x_c + lin["cout"](o.transpose(1, 2).reshape(b, L, -1))
            x = torch.cat([x_c, x[b:] + self.null_outs[i]]) if self.guided else x_c
            x = x + lin["fc2"](F.gelu(lin["fc1"](layer.norm3(x)), approximate="tanh"))
        x = m.norm(x).float()
        with torch.autocast(device_type=x.device.type, enabled=False):  # fp32 logits, as in training
            return self.head(x) if self.head is not None else F.linear(x, m.head.weight.float())


@dataclass
class _Window:
    """A batch's state between passes. buf (B, 1 + T + 2L) long: BOS, then the code at each position:
    committed before n, the drafts of the window n..n + L - 1 after it (slack past T). q (B, L, K): the
    distribution each window slot's draft was drawn from, unused where `fresh` (B, L) (one-hot at it)."""

    buf: torch.Tensor
    n: torch.Tensor  # (B,) long: the commit pointer
    q: torch.Tensor
    fresh: torch.Tensor


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """What a rejected draft's token is drawn from, unnormalised: max(0, p - q), (N, K)."""
    return (p - q).clamp_min(0.0)


def _judge(logits: torch.Tensor, w: _Window, drafts: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None):
    """Test every slot's draft against this pass's guided logits (B, L, K) -> (accept, outcome, sample, p):
    accept (B, L) bool; outcome (B, L): the draft where accepted, else the residual's token (a draw from p
    for a fresh draft): distributed as p whatever the draft; sample (B, L): a fresh draw from p; p (B, L, K).
    Uniforms: one per slot for the draws, plus one per slot for the tests of Jacobi drafts when L > 1."""
    B, L, K = logits.shape
    flat, d = logits.reshape(B * L, K), drafts.reshape(B * L, 1)
    if params.temperature == 0:  # p one-hot at the argmax: a draft is accepted when it is the argmax
        x = flat.argmax(dim=-1)
        return (x == d[:, 0]).view(B, L), x.view(B, L), x.view(B, L), F.one_hot(x, K).float().view(B, L, K)
    vals, index = filter_logits(flat, params)
    u = torch.rand(B * L, 1, generator=generator, device=flat.device)
    x = draw(vals, index, u)  # (N,) x ~ p, as `select_next` draws
    probs = vals.softmax(dim=-1)
    p = probs if index is None else torch.zeros_like(flat).scatter_(1, index, probs)  # (N, K)
    accept, outcome = x == d[:, 0], x  # a fresh draft: accepted when the draw from p is it
    if L > 1:
        q = w.q.reshape(B * L, K)
        ratio_u = torch.rand(B * L, 1, generator=generator, device=flat.device)
        tested = (ratio_u * q.gather(1, d) < p.gather(1, d))[:, 0]  # with probability min(1, p(d) / q(d))
        cdf = _residual(p, q).cumsum(dim=-1)
        r = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max(K - 1)[:, 0]
        r = torch.where(cdf[:, -1] > 0, r, x)  # no residual mass: p <= q, so p = q and no rejection
        fresh = w.fresh.reshape(B * L)
        accept = torch.where(fresh, accept, tested)
        outcome = torch.where(fresh, x, torch.where(tested, d[:, 0], r))
    return accept.view(B, L), outcome.view(B, L), x.view(B, L), p.view(B, L, K)


def _fill_fresh(w: _Window, first: torch.Tensor, init: str, grid: int, num_codes: int,
                generator: torch.Generator | None) -> None:
    """New drafts at positions first..first + L - 1 of each row: copies of the left neighbour in the grid (the
    one above in the first column; code 0 at position 0), or uniform codes. Only the first `c` of them are
    in the window; the rest are rewritten before they enter it."""
    L = w.q.shape[1]
    if init == "random":
        codes = torch.randint(num_codes, (w.n.shape[0], L), generator=generator, device=w.n.device)
        w.buf.scatter_(1, 1 + first[:, None] + torch.arange(L, device=w.n.device), codes)
        return
    for k in range(L):  # in order: a draft may copy the one just made
        pos = first + k
        src = torch.where(pos % grid > 0, pos - 1, pos - grid)
        code = torch.where(src >= 0, w.buf.gather(1, (1 + src).clamp_min(0)[:, None])[:, 0], 0)
        w.buf.scatter_(1, 1 + pos[:, None], code[:, None])


def _slide(w: _Window, c: torch.Tensor, outcome: torch.Tensor, jacobi: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Commit the first c[r] slots of each row's window (their outcomes) and keep the later slots' Jacobi
    drafts, whose q is now this pass's p. -> the first position past the old window: new drafts go there."""
    L = p.shape[1]
    slots = torch.arange(L, device=c.device)
    w.buf.scatter_(1, 1 + w.n[:, None] + slots, torch.where(slots < c[:, None], outcome, jacobi))
    shift = slots + c[:, None]  # (B, L): new slot j is old slot j + c
    w.q = p.gather(1, shift.clamp_max(L - 1)[..., None].expand(-1, -1, p.shape[-1]))
    w.fresh = shift >= L
    first = w.n + L
    w.n = w.n + c
    return first


@torch.inference_mode()
def speculative_sample(step, params: SamplingParams, *, generator: torch.Generator | None = None,
                       record_logits: bool = False) -> SpeculativeResult:
    """Draw `step.batch` code sequences with SJD. `step(tokens (rows, L), start (rows,)) -> logits (rows, L, K)`
    is a KV-cached window step (`WindowDecoder`, or a test's toy model) with attributes batch, guided,
    window, seq_len, grid_size, num_codes and bos; rows are 2 * batch with guidance (null rows below)."""
    B, L, T, K = step.batch, step.window, step.seq_len, step.num_codes
    device = step.device
    w = _Window(buf=torch.full((B, 1 + T + 2 * L), step.bos, dtype=torch.long, device=device),
                n=torch.zeros(B, dtype=torch.long, device=device),
                q=torch.zeros(B, L, K, device=device), fresh=torch.ones(B, L, dtype=torch.bool, device=device))
    if L > 1:
        _fill_fresh(w, w.n, params.sjd_init, step.grid_size, K, generator)
    slots = torch.arange(L, device=device)
    forwards = torch.zeros(B, dtype=torch.long, device=device)
    accepted = torch.zeros(L, dtype=torch.long, device=device)
    record = torch.zeros(step.rows, T + L, K, device=device) if record_logits else None
    while bool((active := w.n < T).any()):
        inputs = w.buf.gather(1, w.n[:, None] + slots)  # (B, L): the last committed code (or BOS), drafts
        drafts = w.buf.gather(1, 1 + w.n[:, None] + slots)  # (B, L): the draft at each slot's position
        start = w.n.clamp_max(T - 1)  # a finished row's window stays in the cache (its output is unused)
        start = torch.cat([start, start]) if step.guided else start
        logits = step(torch.cat([inputs, inputs]) if step.guided else inputs, start)  # (rows, L, K)
        if record is not None:  # active rows; a committed position is not written again
            at = (torch.arange(step.rows, device=device)[:, None], start[:, None] + slots)
            live = torch.cat([active, active]) if step.guided else active
            record[at] = torch.where(live[:, None, None], logits, record[at])
        if step.guided:
            logits = guide(logits, B, params.guidance_scale)
        accept, outcome, sample, p = _judge(logits, w, drafts, params, generator)
        # A slot's test counts while a later position is in the window and in the image: the last slot's
        # draft is never an input, and its outcome (distributed as p) is committed either way.
        counts = (slots < L - 1) & (w.n[:, None] + slots < T - 1)
        a = (accept & counts).long().cumprod(dim=-1).sum(dim=-1)  # (B,) accepted drafts
        c = torch.where(active, a + 1, 0)  # committed this pass
        forwards += active.long()
        accepted += torch.bincount(a[active], minlength=L)
        first = _slide(w, c, outcome, outcome if params.sjd_coupled else sample, p)
        if L > 1:
            _fill_fresh(w, first, params.sjd_init, step.grid_size, K, generator)
    return SpeculativeResult(codes=w.buf[:, 1:T + 1].clone(), forwards=forwards, accepted=accepted,
                             logits=None if record is None else record[:, :T].clone())


def generate_speculative(model: Generator, context: torch.Tensor, context_mask: torch.Tensor, *,
                         params: SamplingParams = SamplingParams(), generator: torch.Generator | None = None,
                         record_logits: bool = False) -> SpeculativeResult:
    """`parti.sampling.generate`'s contract and distribution, drawn with SJD in a window of
    `sjd_window(params, model, B)` tokens; -> the codes (B, T) and the passes they took."""
    if context.shape[0] < 1:
        raise PartiError("no prompts to sample for")
    window = sjd_window(params, model, context.shape[0])
    guided = params.guidance_scale != 1.0
    with torch.inference_mode():
        step = WindowDecoder(model, batch=context.shape[0], guided=guided, context_len=context.shape[1],
                             window=window)
        step.start(context, context_mask)
        result = speculative_sample(step, params, generator=generator, record_logits=record_logits)
    result.codes = result.codes.clone()  # an ordinary tensor, as `generate` returns
    return result
