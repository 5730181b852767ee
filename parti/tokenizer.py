"""Stage 1: the ViT-VQGAN image tokenizer (Yu et al. 2021, used by Parti).

images (B, 3, S, S) in [-1, 1]
  -> patch embedding (patch P) -> ViT encoder -> linear to the lookup dim (factorised codes)
  -> l2-normalised nearest code                -> codes (B, S/P, S/P) long
  -> code embedding -> linear up -> ViT decoder -> linear to P*P*3 pixels -> images

The quantiser is written here rather than taken from vector-quantize-pytorch: the l2-normalised,
factorised lookup is ~60 lines, we control its buffers (usage statistics live in the state dict, so a
resumed run is bit-identical), dead-code restarts are synchronised across ranks, and there is no
dependency whose defaults change under us.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from parti.checkpoint import check_folder, config_from_dict, fingerprint_state, load_model_weights, save_model
from parti.errors import PartiError
from parti.hub import resolve_checkpoint
from parti.layers import Block, init_weights
from parti.validate import MAX_TOKENS, block_params, check_model_config, divides, values_of


@dataclass(frozen=True)
class TokenizerConfig:
    image_size: int = 128
    patch_size: int = 8
    dim: int = 512
    encoder_depth: int = 8
    decoder_depth: int = 8
    heads: int = 8
    mlp_ratio: float = 4.0
    codebook_size: int = 8192
    codebook_dim: int = 32  # factorised lookup dim (ViT-VQGAN: 32 beats 256 for usage)
    beta: float = 0.25  # commitment weight
    dead_code_threshold: float = 0.03  # restart codes whose EMA usage falls below this (per batch)
    usage_decay: float = 0.99


    # field -> (low, high) inclusive; a float range given as (low, high, "open") excludes `high` (parti.validate).
    BOUNDS: ClassVar[dict[str, tuple]] = {
        "image_size": (8, 4096), "patch_size": (1, 256), "dim": (1, 16384), "encoder_depth": (0, 256),
        "decoder_depth": (0, 256), "heads": (1, 256), "mlp_ratio": (0.0, 64.0), "codebook_size": (2, 65536),
        "codebook_dim": (1, 16384), "beta": (0.0, 1e3), "dead_code_threshold": (0.0, 1e6),
        "usage_decay": (0.0, 1.0, "open"),
    }

    def __post_init__(self):
        check_model_config(type(self), dataclasses.asdict(self), what="tokenizer config")

    @staticmethod
    def relations(v: dict[str, Any], *, what: str) -> int:
        """Check the fields' relations in `v` (defaults where missing); return the estimated parameter count."""
        size, patch, dim, heads, enc, dec, ratio, book, book_dim = values_of(
            v, TokenizerConfig, "image_size", "patch_size", "dim", "heads", "encoder_depth", "decoder_depth",
            "mlp_ratio", "codebook_size", "codebook_dim")
        divides(what, "patch_size", patch, "image_size", size)
        divides(what, "heads", heads, "dim", dim)
        tokens = (size // patch) ** 2
        if tokens > MAX_TOKENS:
            raise PartiError(f"{what}: image_size {size} / patch_size {patch} gives {tokens} tokens, above {MAX_TOKENS}")
        return (enc + dec) * block_params(dim, ratio) + 2 * tokens * dim + 6 * patch * patch * dim + book * book_dim

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


TOKENIZER_PRESETS: dict[str, TokenizerConfig] = {
    # CPU tests: seconds.
    "tiny": TokenizerConfig(image_size=32, patch_size=4, dim=64, encoder_depth=1, decoder_depth=1, heads=2,
                            mlp_ratio=2.0, codebook_size=256, codebook_dim=8),
    # The CPU demo on synthetic faces: 64 px, an 8x8 grid of codes. One layer each way: better and faster than
    # two in the demo's steps (docs/benchmarks.md, "Figures behind the code's design choices").
    "demo": TokenizerConfig(image_size=64, patch_size=8, dim=128, encoder_depth=1, decoder_depth=1, heads=4,
                            mlp_ratio=4.0, codebook_size=512, codebook_dim=16),
    # The benchmark reference size (dim 256, patch 8, 128 px); a quick FFHQ run on one GPU.
    "base": TokenizerConfig(image_size=128, patch_size=8, dim=256, encoder_depth=4, decoder_depth=4, heads=4),
    # FFHQ default: ViT-VQGAN-Small widths at 128 px -> 16x16 codes from 8192.
    "ffhq128": TokenizerConfig(),
}


@dataclass
class TokenizerOutput:
    reconstruction: torch.Tensor  # (B, 3, S, S)
    codes: torch.Tensor  # (B, h, w) long
    commit_loss: torch.Tensor  # scalar: codebook + beta * commitment


class Quantizer(nn.Module):
    """Factorised, l2-normalised codebook: nearest neighbour by cosine in a low lookup dim."""

    def __init__(self, size: int, dim: int, *, beta: float, threshold: float, decay: float):
        super().__init__()
        self.size, self.beta, self.threshold, self.decay = size, beta, threshold, decay
        self.embedding = nn.Embedding(size, dim)
        # EMA of how often each code is chosen per batch; drives dead-code restarts.
        self.register_buffer("usage_ema", torch.ones(size))
        self.register_buffer("initialised", torch.tensor(False))

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=-1)  # (K, d)

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, d) l2-normalised -> indices (N,). Max cosine = min l2 distance on the sphere."""
        return (z @ self.codebook().t()).argmax(dim=-1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (N, d) -> (quantised with straight-through gradients (N, d), indices (N,), loss)."""
        z = F.normalize(z, dim=-1)
        if self.training:
            # Restart before the lookup, so this step's graph only sees the codebook it used.
            if not bool(self.initialised):
                self._restart(torch.arange(self.size, device=z.device), z.detach())
                self.initialised.fill_(True)
            dead = (self.usage_ema < self.threshold).nonzero().squeeze(-1)
            if dead.numel():
                self._restart(dead, z.detach())
        idx = self.lookup(z.detach())
        zq = self.codebook()[idx]
        loss = F.mse_loss(zq, z.detach()) + self.beta * F.mse_loss(z, zq.detach())
        if self.training:
            with torch.no_grad():
                counts = torch.bincount(idx, minlength=self.size).float()
                if dist.is_available() and dist.is_initialized():
                    dist.all_reduce(counts)
                self.usage_ema.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        return z + (zq - z).detach(), idx, loss

    @torch.no_grad()
    def _restart(self, codes: torch.Tensor, z: torch.Tensor) -> None:
        """Move `codes` onto encoder outputs drawn from this batch (rank 0's, when distributed)."""
        pick = torch.randint(0, z.shape[0], (codes.numel(),), device=z.device)
        new = z[pick] + 1e-3 * torch.randn_like(z[pick])
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(new, src=0)
        self.embedding.weight.data[codes] = new.to(self.embedding.weight.dtype)
        self.usage_ema[codes] = 1.0


class ViT(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, tokens: int):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class VQTokenizer(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = c = config
        tokens = c.grid_size ** 2
        self.patch_embed = nn.Conv2d(3, c.dim, c.patch_size, stride=c.patch_size)
        self.encoder = ViT(c.dim, c.encoder_depth, c.heads, c.mlp_ratio, tokens)
        self.to_code = nn.Linear(c.dim, c.codebook_dim)
        self.quantizer = Quantizer(c.codebook_size, c.codebook_dim, beta=c.beta,
                                   threshold=c.dead_code_threshold, decay=c.usage_decay)
        self.from_code = nn.Linear(c.codebook_dim, c.dim)
        self.decoder = ViT(c.dim, c.decoder_depth, c.heads, c.mlp_ratio, tokens)
        self.to_pixels = nn.Linear(c.dim, c.patch_size ** 2 * 3)
        init_weights(self)
        nn.init.trunc_normal_(self.encoder.pos, std=0.02)
        nn.init.trunc_normal_(self.decoder.pos, std=0.02)
        nn.init.normal_(self.quantizer.embedding.weight)
        self._fingerprint: str | None = None

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight: the adaptive GAN weight balances gradients here."""
        return self.to_pixels.weight

    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        s = self.config.image_size
        if images.shape[-3:] != (3, s, s):
            raise PartiError(f"tokenizer expects images of shape (B, 3, {s}, {s}), got {tuple(images.shape)}")
        x = rearrange(self.patch_embed(images), "b d h w -> b (h w) d")
        return self.to_code(self.encoder(x))  # (B, T, codebook_dim)

    def _pixels(self, zq: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = self.to_pixels(self.decoder(self.from_code(zq)))  # (B, T, P*P*3)
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=c.grid_size, p=c.patch_size, q=c.patch_size)

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        z = self._latents(images)
        b, t, d = z.shape
        zq, idx, loss = self.quantizer(z.reshape(b * t, d))
        g = self.config.grid_size
        return TokenizerOutput(reconstruction=self._pixels(zq.reshape(b, t, d)), codes=idx.reshape(b, g, g),
                               commit_loss=loss)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) in [-1, 1] -> codes (B, S/P, S/P) long in [0, codebook_size)."""
        z = F.normalize(self._latents(images), dim=-1)
        g = self.config.grid_size
        return self.quantizer.lookup(z.flatten(0, 1)).reshape(-1, g, g)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) or (B, h*w) long -> images (B, 3, S, S), roughly in [-1, 1]."""
        c = self.config
        codes = codes.reshape(codes.shape[0], -1)
        if codes.shape[1] != c.grid_size ** 2:
            raise PartiError(f"expected {c.grid_size}x{c.grid_size} codes per image, got {codes.shape[1]}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= c.codebook_size):
            raise PartiError(f"codes must lie in [0, {c.codebook_size}); got [{codes.min()}, {codes.max()}]")
        return self._pixels(self.quantizer.codebook()[codes])

    def fingerprint(self) -> str:
        """Hash of the weights: caches and generators record it and refuse another tokenizer."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_state(self.state_dict())
        return self._fingerprint

    def num_parameters(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return {"trainable": trainable, "frozen": frozen}


def build_tokenizer(preset: str | TokenizerConfig = "ffhq128", **overrides) -> VQTokenizer:
    if isinstance(preset, TokenizerConfig):
        config = preset
    elif preset in TOKENIZER_PRESETS:
        config = TOKENIZER_PRESETS[preset]
    else:
        raise PartiError(f"unknown tokenizer preset {preset!r}; choose one of {sorted(TOKENIZER_PRESETS)}")
    if overrides:
        config = config_from_dict(TokenizerConfig, {**dataclasses.asdict(config), **overrides}, what="tokenizer")
    return VQTokenizer(config)


def save_tokenizer(model: VQTokenizer, folder: str | Path) -> Path:
    model._fingerprint = None  # weights may have changed since the last call
    return save_model(folder, "tokenizer", model.config, model)


def load_tokenizer(folder: str | Path, *, device: str | torch.device = "cpu", revision: str | None = None) -> VQTokenizer:
    """Rebuild a tokenizer from its folder alone (config.json + model.safetensors), strictly, in eval mode.
    The config is bounded and the weights checked against it before the model is built; the recorded
    fingerprint is verified against the weights, so a cache or generator check on it is a check of them.
    A Hub repo id ('user/name[@rev]') loads from its cached snapshot folder."""
    folder = resolve_checkpoint(folder, revision=revision)
    data = check_folder(folder, "tokenizer")
    config = config_from_dict(TokenizerConfig, data["config"], what=f"{folder}/config.json")
    model = load_model_weights(folder, lambda: VQTokenizer(config), fingerprint=data.get("fingerprint"))
    model._fingerprint = data.get("fingerprint") or None
    return model.to(device).eval()
