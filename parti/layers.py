"""Transformer pieces shared by the tokenizer (ViT encoder/decoder) and the generator."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) that can run from a copy of its weight packed for the
    CPU's GEMM while `packed_for_rows` is active: decoding multiplies the same weights by a few rows 256
    times. fp32 weights use MKL's packed GEMM (fp32 sampling 1.15-1.2x faster at 8-32 rows), bf16 weights
    oneDNN's (AMX where the CPU has it; without packing, bf16 products of a few rows ran at half the
    bandwidth of fp32 ones). Figures in docs/benchmarks.md."""

    packed: tuple[torch.Tensor, int, str] | None = None  # (packed weight, rows it was packed for, "mkl"/"onednn")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and not torch.is_grad_enabled():
            weight, rows, kind = self.packed
            if kind == "onednn":  # any number of rows runs on the packed copy
                return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")
            # Any number of rows is correct, but only `rows` rows use MKL's packed copy: other counts run
            # the plain GEMM on self.weight (so pack each layer for the rows it will see).
            return torch.ops.mkl._mkl_linear(x, weight, self.weight, self.bias, rows)
        return F.linear(x, self.weight, self.bias)


def mkl_packing_available() -> bool:
    try:
        return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


def onednn_bf16_packing_available() -> bool:
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    except (AttributeError, RuntimeError):
        return False


# Below this many rows an fp32 decoding step is bound by reading the weights, and packing them (a copy
# per call of `generate`) cost more than it saved: batch 1 with guidance (2 rows) ran 5% slower packed.
# bf16 packs at any row count: there the packed product is the one that reads at full bandwidth.
MIN_PACKED_ROWS = 4


@contextmanager
def packed_for_rows(linears: Iterable[Linear], rows: int) -> Iterator[None]:
    """Inside the block, CPU `Linear`s without autograd multiply by weights packed for `rows` rows: fp32
    through MKL from MIN_PACKED_ROWS rows up, bf16 through oneDNN. A no-op where neither library is built
    in (e.g. ARM), on GPUs and for other dtypes. The copies are freed on exit."""
    linears = [m for m in linears if m.weight.device.type == "cpu"]
    kinds = {}
    if linears and rows >= MIN_PACKED_ROWS and mkl_packing_available():
        kinds[torch.float32] = "mkl"
    if linears and onednn_bf16_packing_available():
        kinds[torch.bfloat16] = "onednn"
    chosen = [(m, kinds[m.weight.dtype]) for m in linears if m.weight.dtype in kinds]
    try:
        for m, kind in chosen:
            w = m.weight.detach()
            packed = (torch.ops.mkl._mkl_reorder_linear_weight(w, rows) if kind == "mkl"
                      else torch.ops.mkldnn._reorder_linear_weight(w, rows))
            m.packed = packed, rows, kind
        yield
    finally:
        for m, _ in chosen:
            m.packed = None


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # tanh-approximated GELU: what ViT-VQGAN and GPT-2 use, and cheaper than erf on CPU.
        h = self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
        return self.dropout(h) if self.dropout.p > 0 else h


class Attention(nn.Module):
    """Multi-head attention through SDPA. Self-attention when `context` is None, else cross-attention."""

    def __init__(self, dim: int, heads: int, *, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.q = Linear(dim, dim)
        self.kv = Linear(context_dim or dim, 2 * dim)
        self.out = Linear(dim, dim)
        self.dropout = dropout

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, L, D) -> two (B, H, L, D/H); views and transposes, not einops: this runs at every decoding step
        b, n, _ = context.shape
        kv = self.kv(context).view(b, n, 2, self.heads, -1)
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, -1).transpose(1, 2)  # (B, H, t, D/H)
        drop = self.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=drop)
        return self.out(o.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        k, v = self.project_kv(x if context is None else context)
        return self.attend(x, k, v, mask=mask, causal=causal)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)); x + mlp(norm(x)). Bidirectional unless masked."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal linear/embedding init (ViT, GPT-2). Small, normal-range values also keep
    CPU training clear of subnormal floats, which make matmuls many times slower."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
