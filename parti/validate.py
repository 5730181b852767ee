"""Bounds for model configs read from disk, checked before anything is built or allocated.

A config.json is input like any other: `"dim": 1e9` or `"depth": 10**6` must be a one-line error, not an
attempt to allocate terabytes. `check_model_config(name, values, what=...)` checks every field of the
three model configs (type, range, finiteness), the relations between fields (heads divide the width,
patches tile the image) and an estimate of the parameter bytes, refused above `MAX_PARAM_BYTES`.
`config_from_dict` calls it for the classes named in `BOUNDS`; other classes pass through unchanged.
"""

from __future__ import annotations

import math
from typing import Any

from parti.errors import PartiError

# Above the largest preset by far (Parti-20B would not fit one process anyway): 32 GiB of fp32 weights.
MAX_PARAM_BYTES = 32 * 2**30
MAX_TOKENS = 65536  # image tokens per image (grid_size ** 2); codes are cached as uint16, so codebooks too

# field -> (low, high) inclusive; a float range given as (low, high, "open") excludes `high`.
BOUNDS: dict[str, dict[str, tuple]] = {
    "TokenizerConfig": {
        "image_size": (8, 4096), "patch_size": (1, 256), "dim": (1, 16384), "encoder_depth": (0, 256),
        "decoder_depth": (0, 256), "heads": (1, 256), "mlp_ratio": (0.0, 64.0), "codebook_size": (2, 65536),
        "codebook_dim": (1, 16384), "beta": (0.0, 1e3), "dead_code_threshold": (0.0, 1e6),
        "usage_decay": (0.0, 1.0, "open"),
    },
    "GeneratorConfig": {
        "num_codes": (2, 65536), "grid_size": (1, 256), "dim": (1, 16384), "depth": (1, 256), "heads": (1, 256),
        "mlp_ratio": (0.0, 64.0), "text_dim": (1, 16384), "text_layers": (0, 256),
        "cond_drop_prob": (0.0, 1.0, "open"), "dropout": (0.0, 1.0, "open"),
    },
    "TextEncoderConfig": {
        "vocab_size": (3, 1_000_000), "d_model": (1, 16384), "num_layers": (1, 256), "num_heads": (1, 256),
        "d_ff": (1, 65536), "max_length": (2, 8192), "dropout": (0.0, 1.0, "open"),
    },
}


def check_model_config(name: str, values: dict[str, Any], *, what: str,
                       max_bytes: int = MAX_PARAM_BYTES) -> None:
    """Refuse out-of-range, non-finite or inconsistent fields of model config class `name` (a PartiError
    naming the field and the allowed range). Fields missing from `values` take the dataclass default and
    are not checked here."""
    bounds = BOUNDS.get(name)
    if bounds is None:
        return
    for field, value in values.items():
        if field in bounds:
            _check_range(field, value, bounds[field], what=what)
    relations = {"TokenizerConfig": _tokenizer_relations, "GeneratorConfig": _generator_relations,
                 "TextEncoderConfig": _text_relations}[name]
    params = relations(values, what=what)
    if params * 4 > max_bytes:
        raise PartiError(f"{what}: this config describes about {params / 1e9:.1f}B parameters "
                         f"({params * 4 / 2**30:.0f} GiB in fp32), above the {max_bytes / 2**30:.0f} GiB limit; "
                         f"the config is corrupt or not parti's")


def _check_range(field: str, value: Any, bound: tuple, *, what: str) -> None:
    low, high = bound[0], bound[1]
    is_float = isinstance(low, float)
    ok_type = isinstance(value, (int, float)) if is_float else isinstance(value, int)
    if isinstance(value, bool) or not ok_type:
        kind = "a number" if is_float else "an integer"
        raise PartiError(f"{what}: config key {field!r} must be {kind}, got {value!r}")
    if is_float and not math.isfinite(value):
        raise PartiError(f"{what}: config key {field!r} must be finite, got {value!r}")
    too_high = value >= high if len(bound) > 2 else value > high
    if value < low or too_high:
        top = f"< {high}" if len(bound) > 2 else f"<= {high}"
        raise PartiError(f"{what}: config key {field!r} = {value!r} is out of range (need {low} <= value {top})")


def _values(values: dict[str, Any], cls: type, *keys: str) -> tuple:
    """values[key] for each key, or the dataclass cls's default where the config leaves it out."""
    fields = cls.__dataclass_fields__
    return tuple(values.get(key, fields[key].default) for key in keys)


def _divides(what: str, small: str, a: int, big: str, b: int) -> None:
    if b % a:
        raise PartiError(f"{what}: {big} {b} must be divisible by {small} {a}")


def _block_params(dim: int, mlp_ratio: float) -> int:
    """One pre-norm transformer block: qkv + out projections and the MLP (biases and norms ignored)."""
    return 4 * dim * dim + 2 * dim * int(dim * mlp_ratio)


def _tokenizer_relations(v: dict[str, Any], *, what: str) -> int:
    from parti.tokenizer import TokenizerConfig  # defaults live in the dataclass, never here

    size, patch, dim, heads, enc, dec, ratio, book, book_dim = _values(
        v, TokenizerConfig, "image_size", "patch_size", "dim", "heads", "encoder_depth", "decoder_depth",
        "mlp_ratio", "codebook_size", "codebook_dim")
    _divides(what, "patch_size", patch, "image_size", size)
    _divides(what, "heads", heads, "dim", dim)
    tokens = (size // patch) ** 2
    if tokens > MAX_TOKENS:
        raise PartiError(f"{what}: image_size {size} / patch_size {patch} gives {tokens} tokens, above {MAX_TOKENS}")
    return (enc + dec) * _block_params(dim, ratio) + 2 * tokens * dim + 6 * patch * patch * dim + book * book_dim


def _generator_relations(v: dict[str, Any], *, what: str) -> int:
    from parti.generator import GeneratorConfig

    dim, heads, grid, codes, ratio, depth, text_layers, text_dim = _values(
        v, GeneratorConfig, "dim", "heads", "grid_size", "num_codes", "mlp_ratio", "depth", "text_layers", "text_dim")
    _divides(what, "heads", heads, "dim", dim)
    layer = _block_params(dim, ratio) + 4 * dim * dim  # + cross-attention
    return depth * layer + text_layers * _block_params(dim, ratio) + 2 * codes * dim + 2 * grid * dim + text_dim * dim


def _text_relations(v: dict[str, Any], *, what: str) -> int:
    from parti.text import TextEncoderConfig

    width, heads, layers, d_ff, vocab = _values(v, TextEncoderConfig, "d_model", "num_heads", "num_layers", "d_ff",
                                                "vocab_size")
    _divides(what, "num_heads", heads, "d_model", width)
    return vocab * width + layers * (4 * width * width + 3 * width * d_ff)  # gated-GELU: two input projections
