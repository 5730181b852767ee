"""Resumable training state: RNG streams, checkpoint folders, and the checks made before resuming.

A run folder holds the exportable model at its top (config.json + model.safetensors) and the training
state apart, under checkpoints/step_XXXXXXX/ (weights, optimizer, EMA, RNG, data position), so inference
never touches training state and a killed run resumes from the newest complete step.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from parti.checkpoint import (
    CHECKPOINTS_DIR,
    METRICS_NAME,
    RUN_JSON,
    TEXT_ENCODER_DIR,
    TOKENIZER_DIR,
    read_tensors,
    write_tensors,
)
from parti.errors import PartiError
from parti.files import read_json, write_json

log = logging.getLogger(__name__)

STATE_JSON = "state.json"  # written last: its presence marks a complete checkpoint


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


def check_continuation(out: str | Path, *, resume: bool, inputs: dict[str, Any]) -> None:
    """Refuse, before any work, an --out folder holding progress (metrics or checkpoints) without --resume,
    or a resumed run asked to learn from other `inputs` (setting name -> value) than it started with: a model
    trained from two sources by accident. Whose folder it is, and its stage, is `claim_run_folder`'s check."""
    out = Path(out)
    run_json = out / RUN_JSON
    if not run_json.is_file():
        return
    metrics = out / METRICS_NAME
    progress = (metrics.is_file() and metrics.stat().st_size > 0) or any((out / CHECKPOINTS_DIR).glob("step_*"))
    if progress and not resume:
        raise PartiError(f"{out} already holds this run; pass --resume to continue it, or choose another --out "
                         f"to start afresh")
    if not resume:
        return
    old = read_json(run_json).get("config", {})
    unset = (None, "")  # runs from before settings had None wrote "" for an unset column
    changed = [f"{k}: {old[k]!r} -> {v!r}" for k, v in inputs.items()
               if k in old and old[k] != v and not (old[k] in unset and v in unset)]
    if changed:
        raise PartiError(f"{out} was trained from other inputs ({'; '.join(changed)}); resume with the same ones, or "
                         f"choose another --out to start afresh")


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
    for folder in (root, root / TEXT_ENCODER_DIR, root / TOKENIZER_DIR):
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def _step_of(folder: Path) -> int:
    m = re.fullmatch(r"step_(\d+)", folder.name)
    return int(m.group(1)) if m else -1
