"""The device and precision policy: which device work runs on when the caller does not say, and which
floating-point precision each kind of work uses there (training, sampling), decided in one place."""

from __future__ import annotations

import logging
import os
import platform
from typing import Any

import torch

from parti.errors import PartiError

log = logging.getLogger(__name__)


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a torch.device; None: the first GPU when there is one, else the CPU. A GPU that is asked for
    but absent is a one-line error rather than a CUDA traceback later."""
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise PartiError(f"--device {device!r} is not a device ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PartiError(f"--device {device} asks for a GPU, but torch sees none; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PartiError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) present")
    return dev


def fast_bf16(device: torch.device) -> bool:
    """bf16 is fast here: a CUDA GPU of compute capability 8.0 or more (Ampere on). Decided by capability, not
    torch.cuda.is_bf16_supported(): that returns True on a T4 (7.5), where bf16 is only emulated and slow."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def detect_device() -> dict[str, Any]:
    """The hardware a run uses: {"type": "cuda"|"mps"|"cpu", "name", "count", ...}. Pure query, no logging."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        props = torch.cuda.get_device_properties(0)
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(),
            "capability": f"{major}.{minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
        }
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return {"type": "mps", "name": "Apple MPS", "count": 1}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "count": os.cpu_count() or 1}


def choose_mixed_precision() -> str:
    """Accelerate's mixed_precision string: "bf16" on Ampere+ CUDA, "fp16" on older CUDA, "no" elsewhere.

    Decided by compute capability, not torch.cuda.is_bf16_supported(): that returns True on a T4 (sm75)
    where bf16 is only emulated and slow.
    """
    if torch.cuda.is_available():
        choice = "bf16" if fast_bf16(torch.device("cuda", 0)) else "fp16"
        log.info("mixed precision: %s on %s", choice, torch.cuda.get_device_name(0))
    else:
        choice = "no"
        log.info("mixed precision: no (fp32) on %s", detect_device()["type"])
    return choice


SAMPLING_DTYPES = ("auto", "fp32", "bf16", "int8")


def sampling_dtype(name: str, device: torch.device) -> torch.dtype:
    """The generator's weight (and so KV cache) dtype for sampling. auto: bf16 on CUDA devices of compute
    capability 8.0 or more (Ampere on), else fp32: the rule of `choose_mixed_precision` (`fast_bf16`). Where training would use fp16, sampling keeps fp32: fp16 logits and cache risk overflow.
    bf16 halves the bytes each decoding step reads (weights and cache), which bound sampling at small
    batches; on CPUs with AMX it is also faster arithmetic (docs/benchmarks.md). int8 (CPU): fp32 here, the
    decoder's linears then stored int8 and checked by `parti.quantize.load_int8`; auto never picks it."""
    if name not in SAMPLING_DTYPES:
        raise PartiError(f"dtype must be one of {', '.join(SAMPLING_DTYPES)}; got {name!r}")
    if name == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    return torch.bfloat16 if name == "bf16" else torch.float32
