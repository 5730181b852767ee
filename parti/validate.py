"""Bounds for model configs, checked before anything is built or allocated; it knows no model.

A config.json is input like any other: `"dim": 1e9` or `"depth": 10**6` must be a one-line error, not an
attempt to allocate terabytes. Each model config class declares its own bounds beside its fields: a
`BOUNDS` class attribute (field -> range) and a `relations(values, what=...)` static method that checks the
relations between fields (heads divide the width, patches tile the image) and returns an estimate of the
parameter count. `check_model_config(cls, values, what=...)` applies both and refuses more than
`MAX_PARAM_BYTES`; `config_from_dict` and each config's `__post_init__` call it, so the two agree.
"""

from __future__ import annotations

import math
from typing import Any

from parti.errors import PartiError

# Above the largest preset by far (Parti-20B would not fit one process anyway): 32 GiB of fp32 weights.
MAX_PARAM_BYTES = 32 * 2**30
MAX_TOKENS = 65536  # image tokens per image (grid_size ** 2); codes are cached as uint16, so codebooks too


def check_model_config(cls: type, values: dict[str, Any], *, what: str, max_bytes: int = MAX_PARAM_BYTES) -> None:
    """Refuse out-of-range, non-finite or inconsistent fields of model config class `cls` (a PartiError
    naming the field and the allowed range). Fields missing from `values` take the dataclass default.
    A class without `BOUNDS` passes unchecked."""
    bounds = getattr(cls, "BOUNDS", None)
    if bounds is None:
        return
    for field, value in values.items():
        if field in bounds:
            _check_range(field, value, bounds[field], what=what)
    params = cls.relations(values, what=what)
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


def values_of(values: dict[str, Any], cls: type, *keys: str) -> tuple:
    """values[key] for each key, or the dataclass cls's default where the config leaves it out."""
    fields = cls.__dataclass_fields__
    return tuple(values.get(key, fields[key].default) for key in keys)


def divides(what: str, small: str, a: int, big: str, b: int) -> None:
    if b % a:
        raise PartiError(f"{what}: {big} {b} must be divisible by {small} {a}")


def block_params(dim: int, mlp_ratio: float) -> int:
    """One pre-norm transformer block: qkv + out projections and the MLP (biases and norms ignored)."""
    return 4 * dim * dim + 2 * dim * int(dim * mlp_ratio)
