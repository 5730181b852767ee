"""Sampling image codes from the generator: a pure function of model + context + parameters + RNG.

`generate` feeds one token per step through a `parti.decoding.Decoder` (pre-allocated KV cache,
cross-attention keys/values once per prompt; eager, or compiled by `parti.compiled`); with guidance,
conditional and null rows run in one batch and the logits are mixed as uncond + scale * (cond - uncond).
`generate_naive` recomputes the whole prefix every step: slow and obvious, kept so the fast path can be
tested against it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from parti.compiled import decoder_for
from parti.errors import PartiError
from parti.settings import setting
from parti.generator import Generator


def _number(name: str, value, rule: str) -> float:
    """A finite real number (not a bool), else a one-line PartiError that names `rule`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise PartiError(f"{name} must be a finite number {rule}, got {value!r}")
    return float(value)


SJD_INITS = ("left", "random")  # how speculative decoding makes a new draft (parti.speculative)


@dataclass(frozen=True)
class SamplingParams:
    """How codes are drawn: the distribution, and whether speculative Jacobi decoding (`parti.speculative`,
    the same distribution in fewer forward passes) draws them (seed, batch and compilation are the caller's)."""

    guidance_scale: float = setting(3.0, "classifier-free guidance: uncond + scale * (cond - uncond); 1: none")
    temperature: float = setting(1.0, "softmax temperature; 0 is greedy")
    top_k: int | None = setting(None, "keep the k most likely codes (default: all)")
    top_p: float | None = setting(None, "keep the smallest set of codes whose mass reaches p (default: all)")
    sjd_window: int | None = setting(None, "speculative Jacobi decoding: tokens each forward pass verifies; 1 is "
                                     "plain sampling (default: as measured per device and precision: 8 for one "
                                     "prompt at a time on a CPU in fp32 or int8, else 1)")
    sjd_init: str = setting("left", "speculative Jacobi decoding: a new draft copies its left neighbour in the grid, "
                            "or is random", choices=SJD_INITS)
    sjd_coupled: bool = setting(False, "speculative Jacobi decoding: keep each later draft through a coupled test "
                                "instead of drawing it anew (same distribution)")

    def __post_init__(self):
        if _number("temperature", self.temperature, ">= 0 (0 is greedy)") < 0:
            raise PartiError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if _number("guidance_scale", self.guidance_scale, ">= 0 (1 = no guidance)") < 0:
            raise PartiError(f"guidance_scale must be >= 0 (1 = no guidance), got {self.guidance_scale}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral)):
            raise PartiError(f"top_k must be a whole number >= 1 (or unset), got {self.top_k!r}")
        if self.top_k is not None and self.top_k < 1:
            raise PartiError(f"top_k must be >= 1 (or unset), got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < _number("top_p", self.top_p, "in (0, 1] (or unset)") <= 1.0:
            raise PartiError(f"top_p must be in (0, 1] (or unset), got {self.top_p}")
        if self.sjd_window is not None and (isinstance(self.sjd_window, bool)
                                            or not isinstance(self.sjd_window, numbers.Integral) or self.sjd_window < 1):
            raise PartiError(f"sjd_window must be a whole number >= 1 (or unset), got {self.sjd_window!r}")
        if self.sjd_init not in SJD_INITS:
            raise PartiError(f"sjd_init must be one of {', '.join(SJD_INITS)}; got {self.sjd_init!r}")
        if not isinstance(self.sjd_coupled, bool):
            raise PartiError(f"sjd_coupled must be true or false, got {self.sjd_coupled!r}")


def select_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, K) -> next tokens (B,). Top-k (exactly k tokens), then top-p (nucleus),
    then one draw per row by inverse CDF: one uniform number per row instead of torch.multinomial's K
    exponentials per row (a visible share of a decoding step). Same distribution, another stream."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits, index = filter_logits(logits, params)
    u = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device)
    return draw(logits, index, u)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits (B, K), temperature > 0 -> (vals (B, K'), index (B, K') or None): the tempered logits of the
    tokens top-k keeps, those top-p drops set to -inf; vals[:, j] is token index[:, j] (None: token j).
    softmax(vals) is the distribution `select_next` draws from (`parti.speculative` tests drafts against it)."""
    logits = logits.float() / params.temperature
    index = None
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        # The draw below needs no order and top-p sorts what it keeps, so skip topk's sort.
        logits, index = torch.topk(logits, params.top_k, dim=-1, sorted=False)
    if params.top_p is not None and params.top_p < 1.0:
        order = torch.sort(logits, dim=-1, descending=True)
        logits, index = order.values, (order.indices if index is None else index.gather(-1, order.indices))
        probs = logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        logits = logits.masked_fill(probs.cumsum(dim=-1) - probs >= params.top_p, float("-inf"))
    return logits, index


def draw(vals: torch.Tensor, index: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """One token per row of `filter_logits`'s (vals, index) by inverse CDF of softmax(vals) at u (B, 1) in
    [0, 1) -> (B,)."""
    cdf = vals.softmax(dim=-1).cumsum(dim=-1)  # (B, K'), non-decreasing; flat over dropped tokens
    # The first position whose cdf exceeds u: a dropped token (zero mass) never exceeds its predecessor.
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max(cdf.shape[-1] - 1)
    return (pick if index is None else index.gather(-1, pick)).squeeze(-1)


def _with_null(model: Generator, context: torch.Tensor, mask: torch.Tensor):
    """Stack the null condition under the conditional rows: (2B, L, D), (2B, L)."""
    null_x, null_mask = model.null_condition(context.shape[0], context.shape[1])
    return torch.cat([context, null_x.to(context.dtype)]), torch.cat([mask, null_mask])


def guide(logits: torch.Tensor, batch: int, scale: float) -> torch.Tensor:
    """Classifier-free guidance: logits (2B, ...), conditional rows over null ones -> (B, ...)."""
    cond, uncond = logits[:batch], logits[batch:]
    return uncond + scale * (cond - uncond)


def generate(model: Generator, context: torch.Tensor, context_mask: torch.Tensor, *,
             params: SamplingParams = SamplingParams(), generator: torch.Generator | None = None,
             compile: bool | str = False) -> torch.Tensor:
    """context (B, L, dim), mask (B, L) from `model.encode_condition` -> codes (B, T) long.

    compile: True, False or "auto": run each step through the compiled, static-shape step of
    `parti.compiled` (compiled once per process and shape; eager where compilation is unavailable)."""
    # inference_mode, not no_grad: no version counters or view tracking on the many small ops of each
    # step. The codes are copied out so that callers get an ordinary tensor they may modify in place.
    with torch.inference_mode():
        codes = _generate(model, context, context_mask, params, generator, compile)
    return codes.clone()


def _generate(model: Generator, context: torch.Tensor, context_mask: torch.Tensor, params: SamplingParams,
              generator: torch.Generator | None, compile: bool | str) -> torch.Tensor:
    b, T = context.shape[0], model.config.seq_len
    guided = params.guidance_scale != 1.0
    # With guidance the step runs 2B rows, the null ones below the conditional ones.
    decoder = decoder_for(model, batch=b, guided=guided, context_len=context.shape[1], compile=compile)
    decoder.start(context, context_mask, model)
    out = torch.empty(b, T, dtype=torch.long, device=context.device)
    token = torch.full((decoder.rows, 1), model.bos, dtype=torch.long, device=context.device)
    for pos in range(T):
        logits = decoder.step(token, pos)  # (rows, K) fp32
        if guided:
            logits = guide(logits, b, params.guidance_scale)
        nxt = select_next(logits, params, generator)  # (B,)
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
            logits = guide(logits, b, params.guidance_scale)
        nxt = select_next(logits, params, generator)
        codes[:b, pos] = nxt
        if guided:
            codes[b:, pos] = nxt
    return codes[:b]
