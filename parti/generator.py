"""Stage 2: the autoregressive transformer that predicts image codes from text states.

text states (B, L, text_dim) -> linear (+ optional trainable layers) -> context (B, L, dim)
codes (B, T=g*g) -> [BOS, c_0 .. c_{T-2}] + row/column embeddings of the target position
  -> depth x [causal self-attention, cross-attention to the context, MLP] (pre-norm)
  -> final norm -> fp32 logits (B, T, num_codes): logits[:, i] predicts c_i from c_<i.

Classifier-free guidance: a learned null context replaces a row's text with probability
`cond_drop_prob` during training; sampling runs conditional and null rows in one batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from parti.checkpoint import check_folder, config_from_dict, load_model_weights, save_model
from parti.errors import PartiError
from parti.layers import MLP, Attention, Block, init_weights
from parti.validate import block_params, check_model_config, divides, values_of


@dataclass(frozen=True)
class GeneratorConfig:
    num_codes: int = 8192  # tokenizer codebook size
    grid_size: int = 16  # tokenizer grid: T = grid_size ** 2 image tokens
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    text_dim: int = 1024  # width of the text encoder's states (t5-large: 1024)
    text_layers: int = 0  # trainable bidirectional layers over the (frozen) text states
    cond_drop_prob: float = 0.1  # classifier-free guidance: share of rows trained with the null context
    dropout: float = 0.0


    # field -> (low, high) inclusive; a float range given as (low, high, "open") excludes `high` (parti.validate).
    BOUNDS: ClassVar[dict[str, tuple]] = {
        "num_codes": (2, 65536), "grid_size": (1, 256), "dim": (1, 16384), "depth": (1, 256), "heads": (1, 256),
        "mlp_ratio": (0.0, 64.0), "text_dim": (1, 16384), "text_layers": (0, 256),
        "cond_drop_prob": (0.0, 1.0, "open"), "dropout": (0.0, 1.0, "open"),
    }

    def __post_init__(self):
        check_model_config(type(self), dataclasses.asdict(self), what="generator config")

    @staticmethod
    def relations(v: dict[str, Any], *, what: str) -> int:
        """Check the fields' relations in `v` (defaults where missing); return the estimated parameter count."""
        dim, heads, grid, codes, ratio, depth, text_layers, text_dim = values_of(
            v, GeneratorConfig, "dim", "heads", "grid_size", "num_codes", "mlp_ratio", "depth", "text_layers",
            "text_dim")
        divides(what, "heads", heads, "dim", dim)
        layer = block_params(dim, ratio) + 4 * dim * dim  # + cross-attention
        return (depth * layer + text_layers * block_params(dim, ratio) + 2 * codes * dim + 2 * grid * dim
                + text_dim * dim)

    @property
    def seq_len(self) -> int:
        return self.grid_size ** 2


GENERATOR_PRESETS: dict[str, GeneratorConfig] = {
    "tiny": GeneratorConfig(num_codes=256, grid_size=8, dim=64, depth=2, heads=2, text_dim=64),
    "demo": GeneratorConfig(num_codes=512, grid_size=8, dim=96, depth=4, heads=2, text_dim=64),
    # The benchmark reference: dim 512, depth 6, 8 heads, 8192 codes, 16x16 tokens, 768-wide text.
    "bench": GeneratorConfig(dim=512, depth=6, heads=8, text_dim=768),
    # FFHQ on one Colab GPU (~125M + T5); "large" is nearer Parti-350M's width.
    "ffhq": GeneratorConfig(dim=768, depth=12, heads=12, text_dim=1024, text_layers=2),
    "large": GeneratorConfig(dim=1024, depth=16, heads=16, text_dim=1024, text_layers=4),
}


class DecoderLayer(nn.Module):
    def __init__(self, c: GeneratorConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.dim)
        self.self_attn = Attention(c.dim, c.heads, dropout=c.dropout)
        self.norm2 = nn.LayerNorm(c.dim)
        self.cross_attn = Attention(c.dim, c.heads, dropout=c.dropout)
        self.norm3 = nn.LayerNorm(c.dim)
        self.mlp = MLP(c.dim, int(c.dim * c.mlp_ratio), c.dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        """x (B, t, dim), context (B, L, dim), context_mask (B, 1, 1, L) bool -> (B, t, dim)."""
        x = x + self.self_attn(self.norm1(x), causal=True)
        x = x + self.cross_attn(self.norm2(x), context, mask=context_mask)
        return x + self.mlp(self.norm3(x))


class Generator(nn.Module):
    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = c = config
        self.bos = c.num_codes  # the extra input token that starts every sequence
        self.token_emb = nn.Embedding(c.num_codes + 1, c.dim)
        # Factorised 2-D positions: row + column embeddings of the code each position predicts.
        self.row_emb = nn.Embedding(c.grid_size, c.dim)
        self.col_emb = nn.Embedding(c.grid_size, c.dim)
        self.text_proj = nn.Linear(c.text_dim, c.dim)
        self.text_blocks = nn.ModuleList(Block(c.dim, c.heads, c.mlp_ratio, c.dropout) for _ in range(c.text_layers))
        self.text_norm = nn.LayerNorm(c.dim)
        self.null_context = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)  # Parti's extra final norm
        self.head = nn.Linear(c.dim, c.num_codes, bias=False)
        init_weights(self)
        nn.init.trunc_normal_(self.null_context, std=0.02)
        # GPT-2: scale residual output projections by 1/sqrt(2 * depth).
        for layer in self.layers:
            for proj in (layer.self_attn.out, layer.cross_attn.out, layer.mlp.fc2):
                nn.init.trunc_normal_(proj.weight, std=0.02 / (2 * c.depth) ** 0.5, a=-0.04, b=0.04)
        pos = torch.arange(c.seq_len)
        self.register_buffer("rows", pos // c.grid_size, persistent=False)
        self.register_buffer("cols", pos % c.grid_size, persistent=False)

    # ---- conditioning --------------------------------------------------------------------------
    def encode_condition(self, text_states: torch.Tensor, text_mask: torch.Tensor, *,
                         drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, text_dim), (B, L) bool -> context (B, L, dim), mask (B, L). Rows where `drop` is
        True get the null context: the learned vector at position 0, the rest masked out."""
        if text_states.shape[-1] != self.config.text_dim:
            raise PartiError(f"text states have width {text_states.shape[-1]} but the generator expects "
                             f"{self.config.text_dim}; use the text encoder it was trained with")
        mask = text_mask.bool()
        x = self.text_proj(text_states.to(self.text_proj.weight.dtype))
        attn_mask = mask[:, None, None, :]
        for block in self.text_blocks:
            x = block(x, mask=attn_mask)
        x = self.text_norm(x)
        if drop is not None:  # no `drop.any()` test: a host read (a GPU sync) at every training step
            null_x, null_mask = self.null_condition(x.shape[0], x.shape[1])
            x = torch.where(drop[:, None, None], null_x, x)
            mask = torch.where(drop[:, None], null_mask, mask)
        return x, mask

    def null_condition(self, batch: int, length: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.zeros(batch, length, self.config.dim, dtype=self.null_context.dtype, device=self.null_context.device)
        x = x + F.pad(self.null_context, (0, 0, 0, length - 1))
        mask = torch.zeros(batch, length, dtype=torch.bool, device=x.device)
        mask[:, 0] = True
        return x, mask

    # ---- the network ---------------------------------------------------------------------------
    def forward(self, codes: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        """Teacher forcing. codes (B, t<=T) long -> logits (B, t, num_codes) fp32, where
        logits[:, i] depends on codes[:, :i] only. Cached decoding: `parti.decoding` (eager), `parti.compiled`."""
        t = codes.shape[1]
        inputs = torch.cat([torch.full_like(codes[:, :1], self.bos), codes[:, :-1]], dim=1)
        x = self.token_emb(inputs) + self.row_emb(self.rows[:t]) + self.col_emb(self.cols[:t])
        mask = context_mask.bool()[:, None, None, :]  # (B, 1, 1, L): broadcast over heads and queries
        for layer in self.layers:
            x = layer(x, context, mask)
        x = self.norm(x)
        # Logits in fp32 even under autocast: softmax over 8192 codes is sensitive to bf16 rounding.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.head.weight.float())


def build_generator(preset: str | GeneratorConfig = "ffhq", **overrides: Any) -> Generator:
    if isinstance(preset, GeneratorConfig):
        config = preset
    elif preset in GENERATOR_PRESETS:
        config = GENERATOR_PRESETS[preset]
    else:
        raise PartiError(f"unknown generator preset {preset!r}; choose one of {sorted(GENERATOR_PRESETS)}")
    if overrides:
        config = config_from_dict(GeneratorConfig, {**dataclasses.asdict(config), **overrides}, what="generator")
    return Generator(config)


def save_generator(model: Generator, folder: str | Path, *, extra: dict[str, Any]) -> Path:
    """`extra` records what the generator was trained with (tokenizer fingerprint, text encoder)."""
    return save_model(folder, "generator", model.config, model, extra=extra)


def load_generator(folder: str | Path, *, device: str | torch.device = "cpu") -> tuple[Generator, dict[str, Any]]:
    """Rebuild a generator from its folder strictly; returns (model in eval mode, its config.json). The config
    is bounded and the weights' header checked against it before anything is allocated; the recorded
    fingerprint is checked against the weights."""
    data = check_folder(folder, "generator")
    config = config_from_dict(GeneratorConfig, data.get("config", {}), what=f"{folder}/config.json")
    model = load_model_weights(folder, lambda: Generator(config), fingerprint=data.get("fingerprint"))
    return model.to(device).eval(), data
