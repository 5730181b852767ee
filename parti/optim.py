"""Optimisation: AdamW and its schedule, optimizer state as tensors + JSON, the non-finite guard, EMA.

`make_adamw` builds the optimizer both stages use; `NonFiniteGuard` decides, on the device, whether a
step's update is applied; `EMA` keeps the exported weights' moving average.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from parti.errors import PartiError

log = logging.getLogger(__name__)


def lr_at(step: int, *, base: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to `base`, then cosine decay to `min_ratio * base` at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_adamw(params, *, lr: float, weight_decay: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with no decay on biases, norms and embeddings' 1-d params (nanoGPT's grouping), fused where torch
    supports it for these parameters (CPU and CUDA): one vectorised kernel per device and dtype instead of a
    loop over tensors, and a step it can skip on the device (`NonFiniteGuard`)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # torch checks devices and dtypes only at the first step: decide here, so an unsupported device (XLA,
    # meta) gets the plain implementation instead of an error mid-run.
    fused = bool(params) and all(p.device.type in _fused_devices() and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def _fused_devices() -> tuple[str, ...]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return tuple(_get_fused_kernels_supported_devices())
    except (ImportError, AttributeError):  # a torch without the helper
        return ("cpu", "cuda")


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` (or the one accelerate wraps) takes a `found_inf` tensor and skips its step on
    the device when it is 1: torch's fused Adam/AdamW do (it is how GradScaler skips them)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return bool(inner.param_groups) and all(g.get("fused") for g in inner.param_groups)


def flatten_optimizer(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            idx, key = name[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    # How the optimizer runs (fused, foreach) is this run's choice, not the checkpoint's: a checkpoint
    # written before make_adamw turned fused on must not turn it off again.
    impl = {k: opt.param_groups[0][k] for k in ("fused", "foreach", "capturable") if k in opt.param_groups[0]}
    groups = [{**g, **impl} for g in groups]
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise PartiError(f"the checkpoint's optimizer state does not fit this model ({e}); resume with the same "
                         f"model settings, or choose another --out") from None
    # Moments come back contiguous; give them their parameter's layout again (the discriminator's and VGG's
    # weights are channels-last). Fused AdamW walks parameter, gradient and moments as flat memory, so a
    # layout mismatch would pair the wrong elements.
    for p, st in opt.state.items():
        for key, value in st.items():
            if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                st[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


class NonFiniteGuard:
    """Skip steps whose loss is NaN/inf; stop with a clear error after `limit` in a row.

    `step(loss, acc, optimizer)` says whether to run the backward pass and the optimizer step. When the
    optimizer can skip on the device (`skips_on_device`: fused AdamW, `make_adamw`'s default), it always
    says yes and reads nothing back: the verdict becomes the optimizer's `found_inf` (a non-finite step
    leaves weights, moments and step count as they were) and `self.bad` (for the EMA), and the counts stay
    on the device until `report()` (log steps, saves, the end of a run). A GPU then never waits for the host
    between steps. With another optimizer the verdict is read at once and a bad step is not run.

    With several processes the verdict is shared (one rank's NaN skips the step everywhere); ranks that
    disagreed on running the gradient all-reduce would hang.
    """

    def __init__(self, limit: int = 20, *, what: str = "loss"):
        self.limit, self.what = limit, what
        self.total = 0  # steps skipped, as of the last report
        self.bad: torch.Tensor | None = None  # the last verdict: 0-d float, 1.0 = skipped
        self._counts: torch.Tensor | None = None  # on the device: [in a row now, most in a row since report, total]

    def step(self, loss: torch.Tensor, acc=None, optimizer: torch.optim.Optimizer | None = None, *,
             skip_also: torch.Tensor | None = None) -> bool:
        """`skip_also`: another verdict that skips this optimizer's step too (not counted here)."""
        bad = (~torch.isfinite(loss.detach().float())).any().float()
        if acc is not None and acc.num_processes > 1:
            bad = acc.reduce(bad.reshape(1), reduction="sum").reshape(()).clamp(max=1.0)
        own = bad if skip_also is None else bad * (1 - skip_also)
        if self._counts is None:
            self._counts = torch.zeros(3, device=bad.device)
        in_row = (self._counts[0] + own) * own
        self._counts = torch.stack([in_row, torch.maximum(self._counts[1], in_row), self._counts[2] + own])
        self.bad = bad if skip_also is None else torch.maximum(bad, skip_also)
        # Under fp16 accelerate's GradScaler sets (and deletes) `found_inf` itself, from the gradients alone,
        # and would halve its scale at every skipped step: there the verdict is read at once.
        if optimizer is not None and skips_on_device(optimizer) and getattr(acc, "scaler", None) is None:
            getattr(optimizer, "optimizer", optimizer).found_inf = self.bad
            return True
        self.report()
        return not bool(self.bad.item())

    def report(self) -> None:
        """Read the counts back (one host sync): warn about steps skipped since the last report, and raise
        once `limit` came in a row."""
        if self._counts is None:
            return
        in_row, most, total = (int(v) for v in self._counts.tolist())
        if total > self.total:
            log.warning("non-finite %s: %d step(s) skipped (%d in a row now, %d in all)", self.what,
                        total - self.total, in_row, total)
        self.total = total
        if most >= self.limit:
            raise PartiError(f"the {self.what} was NaN/inf for {most} steps in a row; lower --lr, check the "
                             f"data, or resume from an earlier checkpoint")
        self._counts = torch.stack([self._counts[0], self._counts[0], self._counts[2]])


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers."""

    CHUNK = 1 << 24  # values updated per group of multi-tensor ops

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, *, skip: torch.Tensor | None = None) -> None:
        """shadow += (1 - decay) * (weights - shadow), as a few multi-tensor ops; `skip` (a 0-d tensor,
        1.0 for a step the optimizer skipped, `NonFiniteGuard.bad`) makes it a no-op without a host read."""
        state = model.state_dict()
        keys = [k for k, v in state.items() if v.dtype.is_floating_point]
        for k, v in state.items():
            if not v.dtype.is_floating_point:
                self.shadow[k].copy_(v)
        if not keys:
            return
        weight = 1 - self.decay if skip is None else (1 - skip.to(self.shadow[keys[0]].device)) * (1 - self.decay)
        # In chunks of about CHUNK values: the differences are a temporary copy of the weights they cover.
        chunk: list[str] = []
        size = 0
        for i, k in enumerate(keys):
            chunk.append(k)
            size += self.shadow[k].numel()
            if i == len(keys) - 1 or size >= self.CHUNK:
                shadow = [self.shadow[c] for c in chunk]
                diff = torch._foreach_sub([state[c].detach() for c in chunk], shadow)
                torch._foreach_mul_(diff, weight)
                torch._foreach_add_(shadow, diff)
                chunk, size = [], 0

    def load(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        saved = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if not saved:
            log.warning("the checkpoint holds no EMA weights (EMA was off); starting the EMA from the weights")
            return
        if set(saved) != set(self.shadow) or any(saved[k].shape != v.shape for k, v in self.shadow.items()):
            raise PartiError("the checkpoint's EMA weights do not fit this model; resume with the same --preset")
        self.shadow = {k: saved[k].to(v.device, v.dtype) for k, v in self.shadow.items()}
