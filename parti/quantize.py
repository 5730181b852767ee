"""Weight-only int8 for CPU decoding: fewer bytes read per token where reading the weights bounds a step.

`quantize_int8(generator)` replaces every linear of the decoder's layers with an `Int8Linear`: the weight
stored int8 with one scale per output channel (symmetric, max |w| / 127), multiplied by PyTorch's own
kernel `torch._weight_int8pack_mm` with bf16 activations (the kernel is several times slower with fp32
ones), and the bias added in fp32. Everything else stays as it was: embeddings, norms, attention, the KV
cache and the output head in fp32, so the logits are fp32 and the head, which decides them most directly,
is exact. The text layers (run once per prompt) are not quantized.

`load_int8(generator)` is the load-time guard: it quantizes, then compares the logits of fixed inputs with
the fp32 ones computed just before, and refuses (a one-line PartiError) when their relative error is over
`MAX_INT8_ERROR`. Measured speed and error: docs/benchmarks.md ("Speculative Jacobi decoding and int8
weights").
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from parti.errors import PartiError
from parti.generator import Generator

log = logging.getLogger(__name__)

# Relative L2 error of the logits (int8 vs fp32) on `fixed_inputs` above which int8 weights are refused.
# Per-channel int8 gives about 2% on random `bench` and `ffhq` generators (docs/benchmarks.md); a corrupted
# scale or a broken kernel gives tens of percent or more.
MAX_INT8_ERROR = 0.05


def int8_available() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """`nn.Linear` with its weight stored int8 per output channel: W ~= weight * scale[:, None]. CPU only.
    x (..., in) of any float dtype -> (..., out) of that dtype, the product taken with bf16 activations."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (out,)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))  # the kernel takes scales in the activations' dtype
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(flat, self.weight, self.scale).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: Generator) -> Generator:
    """Replace the linears of `model`'s decoder layers by `Int8Linear`s, in place; -> model. No guard: see
    `load_int8`."""
    p = next(model.layers.parameters())
    if p.device.type != "cpu":
        raise PartiError(f"int8 weights are for CPU decoding (the generator is on {p.device}); use --dtype auto")
    if not int8_available():
        raise PartiError(f"this torch ({torch.__version__}) has no torch._weight_int8pack_mm; use --dtype fp32")
    for module in list(model.layers.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, Int8Linear(child))
    return model


def fixed_inputs(model: Generator, *, batch: int = 2, text_len: int = 8, seed: int = 0):
    """Inputs of a deterministic check: codes (B, T), a context (B, text_len, dim) of unit-scale states as
    `encode_condition` gives them (layer-normed), its mask (B, text_len)."""
    c, g = model.config, torch.Generator().manual_seed(seed)
    p = next(model.layers.parameters())
    codes = torch.randint(c.num_codes, (batch, c.seq_len), generator=g)
    context = torch.randn(batch, text_len, c.dim, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[1:, text_len // 2:] = False  # one shorter prompt
    return codes.to(p.device), context.to(p.device, p.dtype), mask.to(p.device)


def logits_error(model: Generator, reference: torch.Tensor) -> float:
    """Relative L2 error of `model`'s logits on `fixed_inputs` against `reference` (the fp32 model's)."""
    with torch.inference_mode():
        logits = model(*fixed_inputs(model))
    return float((logits - reference).norm() / reference.norm().clamp_min(1e-12))


def check_int8(model: Generator, reference: torch.Tensor) -> float:
    """The guard: -> the logits' relative error, or a one-line PartiError when it is over MAX_INT8_ERROR (or not
    a number)."""
    err = logits_error(model, reference)
    if not err <= MAX_INT8_ERROR:
        raise PartiError(f"int8 weights change this generator's logits by {err:.2%} (relative, on fixed inputs), "
                         f"more than the {MAX_INT8_ERROR:.0%} allowed; sample with --dtype fp32")
    return err


def load_int8(model: Generator) -> Generator:
    """`model` (fp32, CPU) with int8 decoder linears, checked against its fp32 logits; refuses with a PartiError."""
    with torch.inference_mode():
        reference = model(*fixed_inputs(model))
    quantize_int8(model)
    log.info("int8 decoder weights: the logits' relative error on fixed inputs is %.3f%%",
             100 * check_int8(model, reference))
    return model
