"""Sampling image codes from the generator: a pure function of model + context + parameters + RNG.

`generate` pre-allocates the KV cache, computes cross-attention keys/values once per prompt, and
feeds one token per step; with guidance, conditional and null rows run in one batch and the logits
are mixed as uncond + scale * (cond - uncond). `generate_naive` recomputes the whole prefix every
step: slow and obvious, kept so the fast path can be tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parti.errors import PartiError
from parti.generator import Generator


@dataclass(frozen=True)
class SamplingParams:
    guidance_scale: float = 3.0
    temperature: float = 1.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise PartiError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise PartiError(f"top_k must be >= 1 (or unset), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise PartiError(f"top_p must be in (0, 1] (or unset), got {self.top_p}")
        if self.guidance_scale < 0:
            raise PartiError(f"guidance_scale must be >= 0 (1 = no guidance), got {self.guidance_scale}")


def select_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, K) -> next tokens (B,). Top-k (exactly k tokens), then top-p (nucleus),
    then one draw per row by inverse CDF: one uniform number per row instead of torch.multinomial's K
    exponentials, which were 7% of a batch-16 sampling run on CPU. Same distribution, another stream."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    index = None  # vals[:, j] is token index[:, j] (None: token j)
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        # The draw below needs no order; top-p sorts what it keeps. Unsorted is 1.4x faster for 819 of 8192.
        logits, index = torch.topk(logits, params.top_k, dim=-1, sorted=False)
    if params.top_p is not None and params.top_p < 1.0:
        order = torch.sort(logits, dim=-1, descending=True)
        logits, index = order.values, (order.indices if index is None else index.gather(-1, order.indices))
        probs = logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        logits = logits.masked_fill(probs.cumsum(dim=-1) - probs >= params.top_p, float("-inf"))
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)  # (B, K'), non-decreasing; flat over dropped tokens
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    # The first position whose cdf exceeds u: a dropped token (zero mass) never exceeds its predecessor.
    pick = torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[-1] - 1)
    return (pick if index is None else index.gather(-1, pick)).squeeze(-1)


def _with_null(model: Generator, context: torch.Tensor, mask: torch.Tensor):
    """Stack the null condition under the conditional rows: (2B, L, D), (2B, L)."""
    null_x, null_mask = model.null_condition(context.shape[0], context.shape[1])
    return torch.cat([context, null_x.to(context.dtype)]), torch.cat([mask, null_mask])


def _guide(logits: torch.Tensor, batch: int, scale: float) -> torch.Tensor:
    cond, uncond = logits[:batch], logits[batch:]
    return uncond + scale * (cond - uncond)


def generate(model: Generator, context: torch.Tensor, context_mask: torch.Tensor, *,
             params: SamplingParams = SamplingParams(), generator: torch.Generator | None = None) -> torch.Tensor:
    """context (B, L, dim), mask (B, L) from `model.encode_condition` -> codes (B, T) long."""
    # inference_mode, not no_grad: no version counters or view tracking on the ~40 small ops of each of the
    # 6 x 256 layer steps (guided sampling 1.07x faster at batch 1, 1.03x at 4 and 16 on CPU). The codes are
    # copied out so that callers get an ordinary tensor they may modify in place.
    with torch.inference_mode():
        codes = _generate(model, context, context_mask, params, generator)
    return codes.clone()


def _generate(model: Generator, context: torch.Tensor, context_mask: torch.Tensor, params: SamplingParams,
              generator: torch.Generator | None) -> torch.Tensor:
    b, T = context.shape[0], model.config.seq_len
    guided = params.guidance_scale != 1.0
    # With guidance the null rows run below the conditional ones; their cross-attention output is a
    # constant per layer (`Generator.null_cross_outputs`), so only the conditional rows attend to text.
    rows = 2 * b if guided else b
    null_outs = model.null_cross_outputs() if guided else None
    cache = model.new_cache(rows)
    ctx_kv = model.context_kv(context)
    out = torch.empty(b, T, dtype=torch.long, device=context.device)
    token = torch.full((rows, 1), model.bos, dtype=torch.long, device=context.device)
    with model.packed_for_decoding(rows, context_rows=b):
        for pos in range(T):
            logits = model.decode(token, pos=pos, cache=cache, ctx_kv=ctx_kv, ctx_mask=context_mask,
                                  null_outs=null_outs)[:, -1]
            if guided:
                logits = _guide(logits, b, params.guidance_scale)
            nxt = select_next(logits, params, generator)
            out[:, pos] = nxt
            token = (torch.cat([nxt, nxt]) if guided else nxt)[:, None]
    return out


@torch.no_grad()
def generate_naive(model: Generator, context: torch.Tensor, context_mask: torch.Tensor, *,
                   params: SamplingParams = SamplingParams(), generator: torch.Generator | None = None) -> torch.Tensor:
    """Same contract as `generate`, recomputing the full sequence at every step (no cache)."""
    b, T = context.shape[0], model.config.seq_len
    guided = params.guidance_scale != 1.0
    if guided:
        context, context_mask = _with_null(model, context, context_mask)
    codes = torch.zeros(context.shape[0], T, dtype=torch.long, device=context.device)
    for pos in range(T):
        # forward shifts in BOS, so logits[:, pos] sees codes[:, :pos] only.
        logits = model(codes[:, :pos + 1], context, context_mask)[:, pos]
        if guided:
            logits = _guide(logits, b, params.guidance_scale)
        nxt = select_next(logits, params, generator)
        codes[:b, pos] = nxt
        if guided:
            codes[b:, pos] = nxt
    return codes[:b]
