"""What both training loops share: device/precision, LR schedule, resumable training state, signals.

A run folder holds the exportable model at its top (config.json + model.safetensors) and the
training state apart, under checkpoints/step_XXXXXXX/ (weights, optimizer, EMA, RNG, data position),
so inference never touches training state and a killed run resumes from the newest complete step.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from parti.checkpoint import read_json, read_tensors, write_json, write_tensors
from parti.errors import PartiError

log = logging.getLogger(__name__)

STATE_JSON = "state.json"  # written last: its presence marks a complete checkpoint


def make_accelerator(mixed_precision: str = "auto", *, cpu: bool = False):
    """An accelerate.Accelerator with bf16 where supported, fp16 on older GPUs, fp32 on CPU."""
    from accelerate import Accelerator

    if mixed_precision == "auto":
        if torch.cuda.is_available() and not cpu:
            mixed_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            mixed_precision = "no"
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise PartiError(f"--mixed-precision must be auto, no, bf16 or fp16; got {mixed_precision!r}")
    acc = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    log.info("device %s, mixed precision %s, %d process(es)", acc.device, mixed_precision, acc.num_processes)
    return acc


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
    """AdamW with no decay on biases, norms and embeddings' 1-d params (nanoGPT's grouping)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


# ---- training state <-> safetensors + JSON (nothing pickled) --------------------------------------
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
    opt.load_state_dict({"state": state, "param_groups": groups})


def capture_rng() -> dict[str, torch.Tensor]:
    rng = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"rng.cuda.{i}"] = s
    return rng


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


class Checkpoints:
    """checkpoints/step_XXXXXXX folders under a run; keeps the newest `keep`."""

    def __init__(self, run_dir: str | Path, *, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = max(1, keep)

    def save(self, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
        folder = self.root / f"step_{step:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STATE_JSON).unlink(missing_ok=True)  # incomplete until the JSON lands again
        write_tensors(folder / "state.safetensors", tensors)
        write_json(folder / STATE_JSON, {"step": step, **meta})
        for old in self.complete()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if (p / STATE_JSON).exists())

    def latest(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """Newest readable checkpoint; a corrupt one (killed mid-write) falls back to the one before."""
        for folder in reversed(self.complete()):
            try:
                return read_tensors(folder / "state.safetensors"), read_json(folder / STATE_JSON)
            except PartiError as e:
                log.warning("skipping unreadable checkpoint %s: %s", folder, e)
        return None


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits."""

    def __init__(self):
        self.requested = False

    def _handler(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        log.warning("signal %d: saving a checkpoint after this step, then stopping", signum)

    @contextmanager
    def installed(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, self._handler)
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


class NonFiniteGuard:
    """Skip steps whose loss is NaN/inf; stop with a clear error after `limit` in a row."""

    def __init__(self, limit: int = 20):
        self.limit, self.in_row, self.total = limit, 0, 0

    def ok(self, loss: torch.Tensor) -> bool:
        if bool(torch.isfinite(loss.detach()).all()):
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        log.warning("non-finite loss: step skipped (%d in a row, %d in all)", self.in_row, self.total)
        if self.in_row >= self.limit:
            raise PartiError(f"loss was NaN/inf for {self.in_row} steps in a row; lower --lr or check the data")
        return False


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.detach(), 1 - self.decay)
            else:
                self.shadow[k].copy_(v)


def describe(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def epoch_batches(n: int, *, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                  flip_prob: float = 0.0) -> list[list]:
    """This rank's batches of one epoch: a seeded permutation cut into global batches of
    batch_size * world, each rank taking its slice. Pure function of (seed, epoch): resumable.
    With flip_prob > 0 each entry is (index, flip) with flips drawn from the same generator."""
    per = batch_size * world
    if n < per:
        raise PartiError(f"the dataset has {n} items, fewer than one batch ({per}); lower --batch-size")
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    if flip_prob > 0:
        flips = (torch.rand(n, generator=g) < flip_prob).tolist()
        perm = list(zip(perm, flips))
    return [perm[i * per + rank * batch_size:i * per + (rank + 1) * batch_size] for i in range(n // per)]


def batch_stream(dataset, collate, *, batch_size: int, seed: int, epoch: int, start: int, rank: int = 0,
                 world: int = 1, num_workers: int = 0, flip_prob: float = 0.0):
    """Yield (epoch, index_in_epoch, batch) forever, starting at batch `start` of `epoch`.
    A batch is None when every item in it was unreadable (the caller skips it)."""
    from torch.utils.data import DataLoader

    while True:
        batches = epoch_batches(len(dataset), batch_size=batch_size, seed=seed, epoch=epoch, rank=rank, world=world,
                                flip_prob=flip_prob)
        loader = DataLoader(dataset, batch_sampler=batches[start:], collate_fn=collate, num_workers=num_workers)
        for i, batch in enumerate(loader, start=start):
            yield epoch, i, batch
        epoch, start = epoch + 1, 0
