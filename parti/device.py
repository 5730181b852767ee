"""Which device work runs on when the caller does not say."""

from __future__ import annotations

import torch

from parti.errors import PartiError


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
