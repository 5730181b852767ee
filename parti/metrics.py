"""Evaluation numbers, computed the way the field computes them, so ours compare with published ones.

- reconstruction: `psnr`, `ssim` (Wang et al. 2004; matches skimage `structural_similarity(...,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)` and torchmetrics'
  `structural_similarity_index_measure` defaults);
- distribution: `feature_statistics` + `frechet_distance` (pytorch-fid's formula and numerics), with any
  `FeatureExtractor` (the FID Inception lives in `parti.inception`);
- text alignment: `clip_score` (100 * cos(image, text) clipped at 0, averaged);
- tokenizer and generator health: `code_usage` (from a histogram, on its device), `usage_from_counts`,
  `codebook_stats` (from codes), `perplexity_from_loss`.

Images are float tensors in [-1, 1], shape (B, 3, H, W); metrics that need [0, 1] map them here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from scipy import linalg
from torch import Tensor

from parti.errors import PartiError
from parti.hub import is_local_path

# The normalisation every OpenAI CLIP checkpoint was trained with (RGB, on [0, 1] pixels).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_pair(x: Tensor, y: Tensor, *, what: str) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise PartiError(f"{what} needs two image batches of the same shape (B, C, H, W), got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")


def _to_unit(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1] in float64, clamped as an 8-bit image file would be."""
    return ((x.detach().double() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, (B,), on [0, 1] images (data range 1). Identical -> inf."""
    _check_pair(x, y, what="psnr")
    mse = (_to_unit(x) - _to_unit(y)).pow(2).flatten(1).mean(dim=1)  # (B,)
    return torch.where(mse > 0, -10.0 * torch.log10(mse), torch.full_like(mse, math.inf))


def _gaussian_window(size: int, sigma: float) -> Tensor:
    """(size,) normalised 1-D gaussian sampled at integer offsets; the 2-D window is its outer product."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(offsets**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: Tensor, y: Tensor, *, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean structural similarity per image, (B,), on [0, 1] images, averaged over channels.

    Gaussian 11x11 window (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 1, population (not sample)
    covariances, and only windows lying fully inside the image ("valid"): the skimage/torchmetrics
    conventions above. Computed in float64.
    """
    _check_pair(x, y, what="ssim")
    if min(x.shape[-2:]) < window_size:
        raise PartiError(f"ssim needs images of at least {window_size}x{window_size}, got {tuple(x.shape[-2:])}")
    a, b = _to_unit(x), _to_unit(y)
    channels = a.shape[1]
    g = _gaussian_window(window_size, sigma).to(a.device)
    window = torch.outer(g, g).expand(channels, 1, window_size, window_size)  # depthwise: one per channel

    def blur(t: Tensor) -> Tensor:  # local gaussian-weighted mean, (B, C, H-10, W-10)
        return F.conv2d(t, window, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2  # (K * data_range)^2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(dim=1)


# ----------------------------------------------------------------------------------------------------
# Frechet distance (FID when the features are FID Inception pool3 features)


class FeatureExtractor(Protocol):
    """Anything mapping images (B, 3, H, W) in [-1, 1] to features (B, dim), e.g. `InceptionFeatures`."""

    dim: int

    def __call__(self, images: Tensor) -> Tensor: ...


def extract_features(batches: Iterable[Tensor], *, extractor: FeatureExtractor) -> Tensor:
    """Run `extractor` over image batches; returns (N, dim) float64 on CPU, ready for `feature_statistics`."""
    feats = [extractor(images).detach().double().cpu() for images in batches]
    if not feats:
        raise PartiError("no images to extract features from; check the image folder or sample count")
    return torch.cat(feats, dim=0)


def _as_numpy64(a: Any) -> np.ndarray:
    if isinstance(a, Tensor):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def feature_statistics(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), float64 (as pytorch-fid)."""
    f = _as_numpy64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise PartiError(f"feature statistics need an (N, D) array with N >= 2, got shape {f.shape}; use more images")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, *, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) between two Gaussians, pytorch-fid's numerics.

    A near-singular product (fewer samples than dimensions) gives a non-finite sqrtm: retry with `eps`
    added to both diagonals. Round-off can leave a tiny imaginary part: dropped if small, else an error.
    """
    mu1, mu2 = np.atleast_1d(_as_numpy64(mu1)), np.atleast_1d(_as_numpy64(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_numpy64(sigma1)), np.atleast_2d(_as_numpy64(sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise PartiError(f"frechet_distance needs means (D,) and covariances (D, D) of one D, got "
                         f"{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            worst = np.max(np.abs(covmean.imag))
            raise PartiError(f"FID covariance square root has imaginary part {worst:.3g}; use more images")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features1: Tensor | np.ndarray, features2: Tensor | np.ndarray) -> float:
    """Frechet distance between two feature sets (N1, D) and (N2, D)."""
    mu1, sigma1 = feature_statistics(features1)
    mu2, sigma2 = feature_statistics(features2)
    return frechet_distance(mu1, sigma1, mu2, sigma2)


# ----------------------------------------------------------------------------------------------------
# CLIP score


def load_clip(name_or_path: str = "openai/clip-vit-base-patch32", *, device: str | torch.device) -> tuple[Any, Any]:
    """-> (CLIPModel in eval mode on `device`, its CLIPTokenizer). Explicit: nothing loads CLIP implicitly.

    Accepts a hub name (downloaded and cached by transformers on first use) or a local folder written by
    `save_pretrained` holding both the model and the tokenizer files.
    """
    from transformers import CLIPModel, CLIPTokenizer  # heavy import, only when CLIP is wanted

    advice = ("download it once where you have a network (CLIPModel/CLIPTokenizer .from_pretrained then "
              ".save_pretrained into one folder) and pass that folder with --clip PATH")
    if is_local_path(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        raise PartiError(f"CLIP folder {name_or_path} does not exist; {advice}")
    source = str(Path(name_or_path).expanduser()) if is_local_path(name_or_path) else name_or_path
    try:
        model = CLIPModel.from_pretrained(source)
        tokenizer = CLIPTokenizer.from_pretrained(source)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # a corrupt weights file: SafetensorError
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PartiError(f"could not load CLIP {name_or_path!r} ({first_line}); {advice}") from err
    return model.to(device).eval().requires_grad_(False), tokenizer


def _clip_pixels(images: Tensor, *, image_size: int) -> Tensor:
    """[-1, 1] (B, 3, H, W) -> CLIP input (B, 3, S, S): CLIPImageProcessor's steps, in torch.

    Resize the shorter side to S with antialiased bicubic (PIL's BICUBIC), centre-crop S x S, clamp to
    [0, 1] as the uint8 round trip would, normalise with the CLIP mean/std. Done here because v5's
    CLIPImageProcessor is torchvision-backed and we do not depend on torchvision.
    """
    x = ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    h, w = x.shape[-2:]
    scale = image_size / min(h, w)
    new_h, new_w = max(image_size, round(h * scale)), max(image_size, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    x = x[..., top : top + image_size, left : left + image_size].clamp(0.0, 1.0)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _pooled(output: Any) -> Tensor:
    # transformers v5 returns a BaseModelOutputWithPooling whose pooler_output is the projected embedding.
    return output.pooler_output if hasattr(output, "pooler_output") else output


@torch.no_grad()
def clip_similarity(images: Tensor, texts: Sequence[str], *, model, processor) -> Tensor:
    """Per pair 100 * max(cos(image_emb, text_emb), 0), shape (B,), float32 on CPU.

    processor: the CLIP tokenizer (or a CLIPProcessor; only its text side is called).
    """
    if isinstance(texts, str) or images.ndim != 4 or len(texts) != images.shape[0]:
        raise PartiError(f"clip_score needs one caption per image: got {images.shape[0] if images.ndim else 0} "
                         f"images and {1 if isinstance(texts, str) else len(texts)} captions")
    param = next(model.parameters())
    pixels = _clip_pixels(images.to(param.device), image_size=model.config.vision_config.image_size)
    tokens = processor(text=list(texts), padding=True, truncation=True, return_tensors="pt",
                       max_length=model.config.text_config.max_position_embeddings)
    img = _pooled(model.get_image_features(pixel_values=pixels.to(param.dtype)))  # (B, P)
    txt = _pooled(model.get_text_features(input_ids=tokens["input_ids"].to(param.device),
                                          attention_mask=tokens["attention_mask"].to(param.device)))  # (B, P)
    cos = F.cosine_similarity(img.float(), txt.float(), dim=-1)  # (B,)
    return (100.0 * cos.clamp(min=0.0)).cpu()


def clip_score(images: Tensor, texts: Sequence[str], *, model, processor) -> float:
    """CLIP score: 100 * mean over pairs of max(cos(image_emb, text_emb), 0), in [0, 100].

    Hessel et al.'s per-pair clip at 0; torchmetrics clips the mean instead, which is the same number
    whenever no pair has negative cosine (always the case with trained CLIP on real captions). To average
    over many batches, concatenate `clip_similarity` results rather than averaging batch scores.
    """
    return float(clip_similarity(images, texts, model=model, processor=processor).mean())


# ----------------------------------------------------------------------------------------------------
# Tokenizer and generator health


def code_usage(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A code histogram (K,) -> (share of the K codes used, perplexity: exp of the histogram's entropy in nats,
    K when uniform, 1 when collapsed), as 0-d float tensors on the histogram's device (no host read)."""
    counts = counts.double()
    p = counts / counts.sum().clamp_min(1)
    return (counts > 0).double().mean().float(), torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum()).float()


def usage_from_counts(counts: Tensor | np.ndarray) -> dict[str, float]:
    """A code histogram (K,) -> {"used": codes with count > 0, "size": K, "share": used/K, "perplexity"}."""
    c = np.asarray(counts.detach().cpu() if isinstance(counts, torch.Tensor) else counts, dtype=np.float64)
    if c.ndim != 1 or c.size == 0:
        raise PartiError(f"codebook counts must be a non-empty (K,) vector, got shape {c.shape}")
    if (c < 0).any() or not np.isfinite(c).all():
        raise PartiError("codebook counts must be finite and non-negative")
    share, perplexity = code_usage(torch.from_numpy(c))
    return {"used": int((c > 0).sum()), "size": int(c.size), "share": float(share),
            "perplexity": float(perplexity) if c.sum() > 0 else 0.0}


def codebook_stats(codes: Tensor, num_codes: int) -> dict[str, Any]:
    """Code usage over any-shaped integer `codes` in [0, num_codes).

    usage: share of the codebook used at least once; perplexity: exp(entropy in nats) of the code
    histogram (num_codes when uniform, 1 when collapsed); counts: (num_codes,) int64 histogram.
    """
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise PartiError(f"codebook_stats needs integer codes, got {codes.dtype}")
    flat = codes.detach().reshape(-1).long().cpu()
    if flat.numel() == 0:
        raise PartiError("codebook_stats got no codes; encode at least one image")
    if flat.min() < 0 or flat.max() >= num_codes:
        raise PartiError(f"codes must lie in [0, {num_codes}), got range [{int(flat.min())}, {int(flat.max())}]; "
                         f"check num_codes matches the tokenizer's codebook size")
    counts = torch.bincount(flat, minlength=num_codes)
    usage, perplexity = code_usage(counts)
    return {"usage": float(usage), "perplexity": float(perplexity), "counts": counts}


def perplexity_from_loss(mean_nll: float | Tensor) -> float:
    """exp(mean negative log-likelihood in nats per token); inf when it overflows."""
    value = float(mean_nll)
    return math.exp(value) if value < 709.0 else math.inf  # exp overflows float64 just above 709.78
