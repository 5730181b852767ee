"""What both training loops share: device/precision, LR schedule, resumable training state, signals.

A run folder holds the exportable model at its top (config.json + model.safetensors) and the
training state apart, under checkpoints/step_XXXXXXX/ (weights, optimizer, EMA, RNG, data position),
so inference never touches training state and a killed run resumes from the newest complete step.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from parti.checkpoint import read_json, read_tensors, write_json, write_tensors
from parti.errors import PartiError

log = logging.getLogger(__name__)

STATE_JSON = "state.json"  # written last: its presence marks a complete checkpoint


def make_accelerator(mixed_precision: str = "auto", *, cpu: bool = False):
    """An accelerate.Accelerator with bf16 where supported, fp16 on older GPUs, fp32 on CPU."""
    from accelerate import Accelerator

    if mixed_precision == "auto":
        from parti.runs import choose_mixed_precision

        # By compute capability: a T4 claims bf16 support but only emulates it (slowly), so it gets fp16.
        mixed_precision = "no" if cpu else choose_mixed_precision()
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
    """AdamW with no decay on biases, norms and embeddings' 1-d params (nanoGPT's grouping), fused where torch
    supports it for these parameters (CPU and CUDA): one vectorised kernel per device and dtype instead of a
    loop over tensors (the bench generator's optimizer step on CPU about 3x faster, docs/benchmarks.md),
    and a step it can skip on the device (`NonFiniteGuard`)."""
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


def seed_everything(seed: int) -> None:
    """torch (CPU and CUDA), numpy and python RNGs from one seed: the same on every rank."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def capture_rng() -> dict[str, torch.Tensor]:
    """Every RNG a training step may touch (torch CPU and CUDA, numpy, python), as tensors."""
    rng = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        # The current device only: under DDP rank r draws on GPU r, and every rank's stream is the same
        # (same seed, same draws), so the main process's state is right for every rank on resume.
        rng["rng.cuda"] = torch.cuda.get_rng_state()
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    rng["rng.numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))  # (624,) uint32 values
    rng["rng.numpy.rest"] = torch.tensor([pos, has_gauss, gauss], dtype=torch.float64)
    version, internal, gauss_next = random.getstate()
    # 625 ints < 2**32 (exact in float64), the version, whether a gaussian is cached, and its value
    rng["rng.python"] = torch.tensor([*internal, version, gauss_next is not None, gauss_next or 0.0],
                                     dtype=torch.float64)
    return rng


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    if "rng.numpy.keys" in tensors:
        pos, has_gauss, gauss = tensors["rng.numpy.rest"].tolist()
        np.random.set_state(("MT19937", tensors["rng.numpy.keys"].numpy().astype(np.uint32), int(pos),
                             int(has_gauss), gauss))
    if "rng.python" in tensors:
        *internal, version, has_gauss, gauss = tensors["rng.python"].tolist()
        random.setstate((int(version), tuple(int(v) for v in internal), gauss if has_gauss else None))


@contextmanager
def rng_untouched():
    """Evaluate, sample or export without moving the training RNG streams, so a resumed run matches an
    uninterrupted one whichever sample and save points lie between."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


# ---- resuming -------------------------------------------------------------------------------------
def load_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, *, what: str) -> None:
    """Load the `prefix.*` tensors of a training checkpoint strictly; a mismatch is one clear line."""
    state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__
        raise PartiError(f"the checkpoint's {what} does not fit this model ({detail[:160]}); resume with the "
                         f"same --preset and model settings, or choose another --out") from None


def check_stage(out: str | Path, stage: str, *, resume: bool) -> None:
    """Refuse, before any work, an --out folder holding a run of the other stage, or one holding progress
    (metrics or checkpoints) without --resume. RunFolder decides the rest."""
    out = Path(out)
    run_json = out / "run.json"
    if not run_json.is_file():
        return
    found = read_json(run_json).get("config", {}).get("stage")
    if found not in (None, stage):
        raise PartiError(f"{out} holds a {found} run, not a {stage} run; choose another --out")
    metrics = out / "metrics.jsonl"
    progress = (metrics.is_file() and metrics.stat().st_size > 0) or any((out / "checkpoints").glob("step_*"))
    if progress and not resume:
        raise PartiError(f"{out} already holds this run; pass --resume to continue it, or choose another --out "
                         f"to start afresh")


def check_resumable(meta: dict[str, Any], *, stage: str, model: dict[str, Any], where: Path) -> None:
    """A training checkpoint of the other stage or of another model is refused before anything loads."""
    if meta.get("stage", stage) != stage:
        raise PartiError(f"{where} holds a {meta['stage']} checkpoint, not a {stage} one; choose another --out")
    saved, now = meta.get("model"), json.loads(json.dumps(model))
    if saved is not None and saved != now:
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise PartiError(f"{where} was trained with another model ({', '.join(diff[:4])} differ); resume with "
                         f"the same --preset, or choose another --out")


class Checkpoints:
    """checkpoints/step_XXXXXXX folders under a run; keeps the newest `keep` complete ones.

    A step folder is complete once its state.json exists: state.safetensors is renamed into place
    first, state.json last, each atomically, so a kill at any moment (or a full disk) leaves the
    previous complete checkpoint as the newest complete one.
    """

    def __init__(self, run_dir: str | Path, *, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = max(1, keep)

    def save(self, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
        folder = self.root / f"step_{step:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STATE_JSON).unlink(missing_ok=True)  # incomplete until the JSON lands again
        write_tensors(folder / "state.safetensors", tensors)
        write_json(folder / STATE_JSON, {"step": step, **meta})
        self._prune(newest=step)
        return folder

    def _prune(self, *, newest: int) -> None:
        """Drop complete checkpoints beyond the newest `keep`, and what killed saves left behind."""
        for old in self.complete()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for folder in self._folders():
            if not (folder / STATE_JSON).exists() and _step_of(folder) < newest:
                shutil.rmtree(folder, ignore_errors=True)  # a save killed before its state.json
            for tmp in folder.glob(".*.tmp"):  # a temporary file of a save killed mid-write
                tmp.unlink(missing_ok=True)

    def _folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.glob("step_*") if p.is_dir() and _step_of(p) >= 0), key=_step_of)

    def complete(self) -> list[Path]:
        """Complete checkpoint folders, oldest first (by step number, not by name)."""
        return [p for p in self._folders() if (p / STATE_JSON).exists()]

    def latest(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """Newest readable checkpoint, or None when there is none. A damaged one falls back to the one
        before, with a warning; when all are damaged (or not safetensors) that is a PartiError."""
        errors = []
        for folder in reversed(self.complete()):
            try:
                tensors, meta = read_tensors(folder / "state.safetensors"), read_json(folder / STATE_JSON)
            except PartiError as e:
                log.warning("skipping unreadable checkpoint %s: %s", folder.name, e)
                errors.append(str(e))
                continue
            if errors:
                log.warning("resuming from %s, the newest readable checkpoint", folder.name)
            return tensors, meta
        if errors:
            raise PartiError(f"no readable checkpoint in {self.root}: {errors[0]}")
        return None


def remove_temporaries(run_dir: str | Path) -> None:
    """Temporary files (.NAME.XXXX.tmp) that a save killed mid-write left beside the exported models."""
    root = Path(run_dir)
    for folder in (root, root / "text_encoder", root / "tokenizer"):
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def _step_of(folder: Path) -> int:
    m = re.fullmatch(r"step_(\d+)", folder.name)
    return int(m.group(1)) if m else -1


# ---- signals and non-finite losses ----------------------------------------------------------------
class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits.

    With several processes `should_stop(acc)` agrees across ranks (a signal may reach only some), so
    every rank stops at the same step and none waits forever in a collective.
    """

    def __init__(self):
        self.requested = False

    def _handler(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        log.warning("signal %d: saving a checkpoint after this step, then stopping", signum)

    def should_stop(self, acc) -> bool:
        if acc.num_processes > 1:
            flag = torch.tensor([float(self.requested)], device=acc.device)
            self.requested = bool(acc.reduce(flag, reduction="sum").item() > 0)
        return self.requested

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
        # and would halve its scale at every skipped step: there the verdict is read at once, as before.
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


def describe(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


# ---- several processes ----------------------------------------------------------------------------
def on_main(acc, fn):
    """Run `fn` on the main process only. Its failure is raised on every rank (a PartiError with the same
    one-line message; any other error re-raised on main, a PartiError naming it elsewhere), so the other
    ranks never wait forever at the next collective. Returns fn's result on the main process, else None."""
    result, message, error = None, "", None
    if acc.is_main_process:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
            error = e
            message = (str(e) or "failed") if isinstance(e, PartiError) else f"the main process failed ({e!r})"
    if acc.num_processes > 1:
        message = _broadcast_text(acc, message)
    if error is not None:
        raise error
    if message:
        raise PartiError(message)
    return result


def _broadcast_text(acc, text: str) -> str:
    """The main process's string on every rank, sent as bytes in a tensor (nothing pickled)."""
    from accelerate.utils import broadcast

    data = torch.tensor(list(text.encode("utf-8")[:4096]), dtype=torch.uint8)
    length = broadcast(torch.tensor([len(data)], dtype=torch.long, device=acc.device), from_process=0)
    buf = torch.zeros(int(length.item()), dtype=torch.uint8, device=acc.device)
    if acc.is_main_process:
        buf.copy_(data.to(acc.device))
    if buf.numel():
        buf = broadcast(buf, from_process=0)
    return bytes(buf.cpu().tolist()).decode("utf-8", errors="replace")


def reduce_logs(acc, logs: dict[str, float]) -> dict[str, float]:
    """Scalar logs averaged over ranks (one all-reduce); unchanged with one process."""
    if acc.num_processes == 1 or not logs:
        return logs
    keys = sorted(logs)
    values = acc.reduce(torch.tensor([float(logs[k]) for k in keys], device=acc.device), reduction="mean")
    return dict(zip(keys, values.tolist()))


def total_over_ranks(acc, value: float) -> float:
    """Sum of a per-rank count (e.g. unreadable images met) over ranks; the value itself with one process."""
    if acc.num_processes == 1:
        return value
    return float(acc.reduce(torch.tensor([float(value)], device=acc.device), reduction="sum").item())


def codebook_stats(acc, codes: torch.Tensor, size: int) -> dict[str, float]:
    """Share of the codebook used and perplexity of the global batch (code counts summed over ranks;
    averaging per-rank usage would understate it)."""
    counts = torch.bincount(codes.flatten(), minlength=size).float()
    if acc.num_processes > 1:
        counts = acc.reduce(counts, reduction="sum")
    p = counts / counts.sum()
    return {"usage": float((counts > 0).float().mean()),
            "perplexity": float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))}


def average_gradients(acc, module: torch.nn.Module) -> None:
    """Mean of `module`'s gradients over ranks: for a module trained outside DDP (the discriminator)."""
    if acc.num_processes == 1:
        return
    import torch.distributed as dist

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one all-reduce for all tensors
    dist.all_reduce(flat)
    flat /= acc.num_processes
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def replicas_agree(acc, module: torch.nn.Module) -> bool:
    """Whether every rank holds the same weights and buffers (compared by per-tensor float64 sums). All
    ranks must call it: DDP, the all-reduced codebook usage and broadcast code restarts keep it True."""
    if acc.num_processes == 1:
        return True
    sums = torch.stack([v.detach().double().sum() for v in module.state_dict().values()
                        if v.dtype.is_floating_point]).to(acc.device)
    every = acc.gather(sums[None])  # (world, n)
    agree = bool((every == every[0]).all().item())
    if not agree:
        log.error("model replicas differ across ranks (max difference %.3g)", float((every - every[0]).abs().max()))
    return agree


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
                 world: int = 1, num_workers: int = 0, flip_prob: float = 0.0, pin_memory: bool = False):
    """Yield (epoch, index_in_epoch, batch) forever, starting at batch `start` of `epoch`.
    A batch is None when every item in it was unreadable (the caller skips it). `pin_memory` (for a GPU):
    batches in page-locked memory, so `.to(device, non_blocking=True)` does not wait for the device."""
    from torch.utils.data import DataLoader

    from parti.data import ignore_stop_signals

    while True:
        batches = epoch_batches(len(dataset), batch_size=batch_size, seed=seed, epoch=epoch, rank=rank, world=world,
                                flip_prob=flip_prob)
        # A private generator: a DataLoader iterator draws its workers' base seed from the global RNG
        # otherwise, and a resumed run (a new iterator mid-epoch) would then shift the training RNG.
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        loader = DataLoader(dataset, batch_sampler=batches[start:], collate_fn=collate, num_workers=num_workers,
                            generator=g, worker_init_fn=ignore_stop_signals, pin_memory=pin_memory)
        for i, batch in enumerate(loader, start=start):
            yield epoch, i, batch
        epoch, start = epoch + 1, 0
