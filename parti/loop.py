"""The one training skeleton both stages run: resume, train, log, evaluate, save, export, stop.

A stage (`parti.train_tokenizer.TokenizerStage`, `parti.train_generator.GeneratorStage`) supplies its
models, data and step body; `fit(StageClass, config)` does everything around them, in this order:

    check --out, seed, read the newest checkpoint (with --resume)
    stage = StageClass(config, accelerator, state)        models, data, optimizers
    run.json; restore weights, optimizers, RNG and data position from the checkpoint
    loop: next batch -> lr -> stage.train_step
          every log_every:    stage.log_row -> metrics.jsonl, the progress bar, the trackers, the health checks
          every sample_every: stage.evaluate (no grad, RNG untouched) -> the same; a new best by
                              stage.val_metric keeps a copy of the weights the export would hold
          every save_every, at the end, on SIGINT/SIGTERM: weights checked finite, training state (with the
          best weights) saved, then stage.export of the best weights (the loadable model at the run
          folder's top)

The health checks (`parti.health`) warn once a run each, in the log, on the progress bar and in run.json.

With several processes every rank runs the same loop; the collectives (skipped batches, stop requests,
reductions) are reached by all ranks at the same steps, and only the main process writes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from parti.batches import batch_stream
from parti.checkpoint import finish_export
from parti.distributed import make_accelerator, on_main, total_over_ranks
from parti.errors import PartiError, say
from parti.health import Health
from parti.optim import NonFiniteGuard, lr_at, set_lr
from parti.runs import MetricsLogger, RunFolder, RunLock, check_output_not_inside, claim_run_folder
from parti.settings import check_settings, setting
from parti.state import (
    Checkpoints,
    capture_rng,
    check_continuation,
    check_resumable,
    remove_temporaries,
    restore_rng,
    rng_untouched,
    seed_everything,
)
from parti.synthetic import DEFAULT_LENGTH

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "no", "bf16", "fp16")
# --report-to: accelerate's trackers, and the packages each needs (any one of them)
TRACKER_PACKAGES = {"none": (), "tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
TENSORBOARD_DIR = "tensorboard"  # in the run folder: TensorBoard's event files, one folder a stage
BEST_PREFIX = "best."  # the best weights' tensors in a training checkpoint


@dataclasses.dataclass
class TrainConfig:
    """Settings every stage's training shares. Each stage's config adds its own and may redeclare a
    default here (help and bounds are inherited)."""

    data: str = setting("synthetic", "synthetic, an image folder, a .parquet file or folder, an imagefolder, or "
                        "hf:NAME (stage 2: also a code cache folder)")
    out: str = setting("checkpoints/run", "the run folder: the exported model, run.json, metrics, checkpoints")
    steps: int = setting(1000, "optimizer steps in all", minimum=1)
    batch_size: int = setting(32, "items per step and process", minimum=1, maximum=1 << 20)
    lr: float = setting(5e-4, "peak learning rate (after warmup, then cosine decay to a tenth)", above=0,
                        maximum=10.0)
    warmup_steps: int = setting(100, "linear warmup steps", minimum=0)
    weight_decay: float = setting(0.05, "AdamW weight decay (not on biases and norms)", minimum=0, maximum=10.0)
    grad_clip: float = setting(1.0, "clip the global gradient norm to this", above=0)
    log_every: int = setting(10, "steps between metrics lines", minimum=1)
    sample_every: int = setting(500, "steps between sample grids and validation metrics", minimum=1)
    save_every: int = setting(500, "steps between resumable checkpoints", minimum=1)
    keep_checkpoints: int = setting(2, "newest checkpoints kept", minimum=1, maximum=1000)
    seed: int = setting(0, "seed of weights, data order and dropout", minimum=0)
    mixed_precision: str = setting("auto", "auto: bf16 on GPUs that have it, fp16 on older ones, fp32 on CPU",
                                   choices=PRECISIONS)
    cpu: bool = setting(False, "train on the CPU even when a GPU is present")
    num_workers: int = setting(0, "data loader processes", minimum=0, maximum=256)
    synthetic_length: int = setting(DEFAULT_LENGTH, "synthetic faces in the training split", minimum=0, maximum=10**9)
    holdout: bool = setting(False, "synthetic: leave the (hair, background) pairs of HOLDOUT_COMBINATIONS out")
    image_column: str | None = setting(None, "table data: the image column (default: found from the data)")
    caption_column: str | None = setting(None, "table data: the caption column (default: found from the data)")
    resume: bool = setting(False, "continue the run in --out from its newest checkpoint")
    progress: bool = setting(True, "show a progress bar")
    report_to: str = setting("none", "also send the metrics to tensorboard (OUT/tensorboard) or wandb",
                             choices=tuple(TRACKER_PACKAGES))

    def __post_init__(self):
        check_settings(self)


class Stage:
    """One stage's part of training; `fit` calls it. Subclasses set `name` and implement the methods.

    `__init__(cfg, acc, state)` builds models, data and optimizers (drawing from the seeded RNG) and sets
    `model` (the module trained, before `acc.prepare`), `optimizer`, `guards` (`NonFiniteGuard`s whose
    counts are reported at log and save steps), `train_set`, `collate`, `flip_prob` and `model_config`
    (the architecture as JSON, compared on resume). `state` is the checkpoint being resumed, or None.
    """

    name = ""
    may_skip_batches = False  # whether the data can yield an empty (all unreadable) batch, as None
    # Settings naming what the run learns from: a resumed run must keep them (`check_continuation`). The
    # tokenizer and a frozen T5 are compared by fingerprint instead (a folder may move, its weights may not).
    # (The architecture is compared whole, by `check_resumable`.)
    inputs: tuple[str, ...] = ("data", "holdout", "image_column", "caption_column")
    # The evaluation metric the export's weights are chosen by (lower is better; None: the newest weights),
    # and the training metric it is compared with for overfitting (the same quantity on training batches).
    val_metric: str | None = None
    train_metric = "loss"
    gan_start: int | None = None  # step the GAN loss starts: best and health compare later evaluations apart

    @classmethod
    def reads(cls, cfg: TrainConfig) -> tuple[str, ...]:
        """Folders the run reads, which its --out must not overwrite (the generator's --tokenizer)."""
        return ()

    @classmethod
    def check_inputs(cls, cfg: TrainConfig) -> None:
        """Refuse inputs that cannot make a good run (an unfinished tokenizer), before any work."""

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Load weights and optimizer state from a checkpoint (the RNG and position are `fit`'s)."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Wrap models and optimizers for the accelerator (DDP, mixed precision)."""
        raise NotImplementedError

    def train_step(self, batch: Any, step: int) -> int:
        """One optimizer step on `batch`, without host reads; returns the images in it (this process)."""
        raise NotImplementedError

    def log_row(self) -> dict[str, Any]:
        """Metrics of the last step, reduced over ranks (every rank calls it)."""
        raise NotImplementedError

    def postfix(self, row: dict[str, Any]) -> dict[str, str]:
        """What the progress bar shows of a log row."""
        return {}

    def evaluate(self, step: int) -> dict[str, float]:
        """Validation metrics (and a grid under samples/) with the model in eval mode, under no_grad."""
        raise NotImplementedError

    def training_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON metadata a resumed run needs, beyond the RNG and the data position."""
        raise NotImplementedError

    def in_sync(self) -> bool:
        """Whether every rank holds the same weights (every rank calls it)."""
        raise NotImplementedError

    def export_weights(self) -> dict[str, torch.Tensor]:
        """CPU copies of the weights `export` writes now (EMA weights where used), to export later."""
        raise NotImplementedError

    def export(self, weights: dict[str, torch.Tensor] | None = None, best: dict[str, Any] | None = None) -> None:
        """Write the loadable model at the run folder's top: `weights` (from `export_weights`), or the current
        ones; `best` (`Best.record()`) is recorded in its config.json."""
        raise NotImplementedError

    def trained_modules(self) -> list[torch.nn.Module]:
        """Modules whose weights must stay finite; a save checks them first."""
        return [self.model]


@dataclasses.dataclass
class Position:
    step: int = 0
    epoch: int = 0
    position: int = 0  # batches of `epoch` already read


@dataclasses.dataclass
class Best:
    """The best evaluation so far by `metric` (lower is better) and a CPU copy of the weights it scored: what
    the export holds. Saved in each checkpoint (tensors under BEST_PREFIX, meta "best"), so a resumed run
    goes on comparing with it. Once the GAN loss is on, evaluations compare among themselves only: it trades
    pixel error for sharpness on purpose, so a pre-GAN model would otherwise always win."""

    metric: str
    step: int | None = None
    value: float = math.inf
    weights: dict[str, torch.Tensor] | None = None

    def offer(self, stage: Stage, step: int, row: dict[str, Any]) -> bool:
        """Keep `stage`'s export weights when `row` (an evaluation at `step`) is the best yet."""
        value = row.get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        before_gan = stage.gan_start is not None and self.step is not None and self.step <= stage.gan_start < step
        if value >= self.value and not before_gan:
            return False
        self.step, self.value, self.weights = step, float(value), stage.export_weights()
        return True

    def record(self) -> dict[str, Any] | None:
        """As run.json and the export's config.json keep it; None before the first evaluation."""
        return None if self.step is None else {"step": self.step, "metric": self.metric, "value": self.value}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {BEST_PREFIX + k: v for k, v in (self.weights or {}).items()}

    @classmethod
    def restore(cls, metric: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Best:
        record = meta.get("best")
        if not isinstance(record, dict) or record.get("metric") != metric:  # an older checkpoint: none kept
            return cls(metric)
        weights = {k[len(BEST_PREFIX):]: v for k, v in tensors.items() if k.startswith(BEST_PREFIX)}
        return cls(metric, int(record["step"]), float(record["value"]), weights)


def fit(stage_cls: type[Stage], cfg: TrainConfig) -> Path:
    """Train `stage_cls` as `cfg` says; returns the run folder (`cfg.out`).

    Before anything is written: --out must be ours (missing, empty, or a run of this stage), lie outside the
    folders the run reads and outside every other model's folder, and not be in use by another training
    (a lock file, taken over from a dead process)."""
    stage_cls.check_inputs(cfg)
    check_report_to(cfg.report_to)
    out = Path(cfg.out)
    tracker = None if cfg.report_to == "none" else cfg.report_to
    acc = make_accelerator(cfg.mixed_precision, cpu=cfg.cpu, log_with=tracker,
                           project_dir=str(out / TENSORBOARD_DIR) if tracker else None)
    check_output_not_inside(out, *stage_cls.reads(cfg))
    claim_run_folder(out, stage=stage_cls.name)
    check_continuation(out, resume=cfg.resume, inputs={k: getattr(cfg, k) for k in stage_cls.inputs})
    lock = RunLock(out) if acc.is_main_process else None
    on_main(acc, lambda: lock.acquire())
    try:
        return _fit(stage_cls, cfg, acc, out)
    finally:
        if lock is not None:
            lock.release()


def check_report_to(report_to: str) -> None:
    """--report-to names a tracker whose package is installed (one line saying what to install, if not)."""
    packages = TRACKER_PACKAGES[report_to]
    if packages and not any(importlib.util.find_spec(p) for p in packages):
        raise PartiError(f"--report-to {report_to} needs the {packages[0]} package: pip install {packages[0]} "
                         f"(or choose --report-to none)")


def _fit(stage_cls: type[Stage], cfg: TrainConfig, acc, out: Path) -> Path:
    seed_everything(cfg.seed)
    ckpts = Checkpoints(out, keep=cfg.keep_checkpoints)
    state = ckpts.latest() if cfg.resume else None  # before run.json changes: a refusal leaves no trace
    stage = stage_cls(cfg, acc, state)
    if state is not None:
        check_resumable(state[1], stage=stage.name, model=stage.model_config, where=out)
    run = on_main(acc, lambda: RunFolder(out, config={"stage": stage.name, **dataclasses.asdict(cfg),
                                                      "model": stage.model_config},
                                         resume=cfg.resume, mixed_precision=acc.mixed_precision))
    acc.wait_for_everyone()
    at = Position()
    best = Best(stage.val_metric) if stage.val_metric and acc.is_main_process else None
    if state is not None:
        tensors, meta = state
        stage.restore(tensors, meta)
        best = Best.restore(stage.val_metric, tensors, meta) if best is not None else None
        restore_rng(tensors)  # last: building the models drew from the RNG
        at = Position(meta["step"], meta["epoch"], meta["position"])
        log.info("resumed from step %d: continued from step %d of %d (%s)", at.step, at.step, cfg.steps, ckpts.root)
    elif cfg.resume and run is not None:  # killed before its first save, or its checkpoints deleted: say so
        (log.warning if run.resumed else log.info)("--resume: no checkpoint in %s: starting at step 0", ckpts.root)
    stage.prepare()
    metrics = MetricsLogger(run.metrics_path) if run else None
    if metrics is not None and state is not None:
        metrics.truncate_after(at.step)
    if state is not None and acc.is_main_process:
        remove_temporaries(out)
        finish_export(out)  # an export a kill interrupted after its commit point
        _export(stage, best)  # and rewritten from the checkpoint, whatever a kill left
    if run is not None and at.step >= cfg.steps:
        run.record_progress(at.step, cfg.steps)  # a finished run resumed: nothing to train, still finished
    if cfg.report_to != "none":
        acc.init_trackers(f"parti-{stage.name}", config=_plain_config(run.config if run else {}))
    try:
        _loop(stage, cfg, ckpts, Reporter(stage, cfg, metrics, run), at, best)
    finally:
        if metrics is not None:
            metrics.close()
        if cfg.report_to != "none":
            acc.end_training()
    return out


def _plain_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The run's config flattened to the scalars trackers take as hyperparameters (others as text)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_plain_config(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _loop(stage: Stage, cfg: TrainConfig, ckpts: Checkpoints, report: Reporter, at: Position,
          best: Best | None) -> None:
    acc = stage.acc
    stream = batch_stream(stage.train_set, stage.collate, batch_size=cfg.batch_size, seed=cfg.seed, epoch=at.epoch,
                          start=at.position, rank=acc.process_index, world=acc.num_processes,
                          num_workers=cfg.num_workers, flip_prob=stage.flip_prob, pin_memory=acc.device.type == "cuda")
    stage.model.train()
    bar = report.bar = tqdm(total=cfg.steps, initial=at.step, disable=not (cfg.progress and acc.is_main_process),
                            desc=stage.name)
    t0, seen, stop = time.time(), 0, StopRequest()
    with stop.installed():
        while at.step < cfg.steps:
            at.epoch, at.position, batch = next(stream)
            at.position += 1
            # Every image of a batch unreadable (each was warned about): skip it, on all ranks together.
            if stage.may_skip_batches and total_over_ranks(acc, float(batch is None)) > 0:
                continue
            set_lr(stage.optimizer, lr_at(at.step, base=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps))
            seen += _step_fitting_memory(stage, batch, at.step, cfg.batch_size) * acc.num_processes
            at.step += 1
            bar.update(1)
            last = at.step == cfg.steps
            if at.step % cfg.log_every == 0 or last:
                _report(stage.guards)
                report.train(at.step, {**stage.log_row(), "lr": stage.optimizer.param_groups[0]["lr"],
                                       "images_per_s": seen / (time.time() - t0),
                                       "nonfinite_steps": sum(g.total for g in stage.guards)})
            if at.step % cfg.sample_every == 0 or last:
                row = _evaluate(stage, at.step)
                report.val(at.step, row)
                if best is not None:
                    best.offer(stage, at.step, row)
            stopping = stop.should_stop(acc)
            if at.step % cfg.save_every == 0 or last or stopping:
                _report(stage.guards)  # a run of non-finite losses stops here, before the save
                _save(stage, ckpts, at, best)
                report.saved(at.step, cfg.steps, best)
                acc.wait_for_everyone()
            if stopping:
                log.warning("stopped at step %d of %d, saved; %s", at.step, cfg.steps,
                            say(cli="rerun with --resume to continue", notebook="run this cell again to continue"))
                break
    bar.close()


class Reporter:
    """Where a run's numbers go: metrics.jsonl, the progress bar, the trackers (--report-to) and the health
    checks, whose warnings go to the log, the bar and run.json's "warnings". Only the main process writes;
    every rank calls (the trackers write on the main process only)."""

    def __init__(self, stage: Stage, cfg: TrainConfig, metrics: MetricsLogger | None, run: RunFolder | None):
        self.stage, self.metrics, self.run, self.bar = stage, metrics, run, None
        self.track = cfg.report_to != "none"
        self.health = (Health(train_metric=stage.train_metric, val_metric=stage.val_metric,
                              gan_start=stage.gan_start, warned=run.warned()) if run is not None else None)
        self.warnings = len(run.info.get("warnings", [])) if run is not None else 0
        self.postfix: dict[str, str] = {}

    def train(self, step: int, row: dict[str, Any]) -> None:
        if self.metrics:
            self.metrics.log(step, **row)
        self.postfix = self.stage.postfix(row)
        self._emit(step, row, "train", self.health.train_row(step, row) if self.health else [])

    def val(self, step: int, row: dict[str, Any]) -> None:
        if self.metrics:
            self.metrics.log(step, split="val", **row)
        self._emit(step, row, "val", self.health.val_row(step, row) if self.health else [])

    def _emit(self, step: int, row: dict[str, Any], split: str, warnings: list) -> None:
        if self.track:
            self.stage.acc.log({f"{split}/{k}": v for k, v in row.items() if isinstance(v, (int, float))}, step=step)
        for w in warnings:
            log.warning("health: %s", w.message)
            self.run.record_warning(w.record())
            self.warnings += 1
        if self.bar is not None:
            self.bar.set_postfix({**self.postfix, **({"warnings": str(self.warnings)} if self.warnings else {})})

    def saved(self, step: int, steps: int, best: Best | None) -> None:
        if self.run is not None:
            self.run.record_best(best.record() if best is not None else None)
            self.run.record_progress(step, steps)


def _step_fitting_memory(stage: Stage, batch: Any, step: int, batch_size: int) -> int:
    """One training step; a batch that does not fit the GPU is a one-line error that says what to change (the
    newest checkpoint is kept), not CUDA's traceback. The first step is the probe: it is where it shows."""
    try:
        return stage.train_step(batch, step)
    except torch.cuda.OutOfMemoryError:
        dev = stage.acc.device
        size = f" ({torch.cuda.get_device_properties(dev).total_memory / 2**30:.1f} GiB)" if dev.type == "cuda" else ""
        raise PartiError(f"step {step + 1}: a batch of {batch_size} does not fit the GPU's memory{size}; "
                         + say(cli="lower --batch-size (or choose a smaller --preset), then run again with --resume",
                               notebook="lower the batch size (or choose a smaller preset) in the configuration "
                                        "cell, then run the cells again")) from None


def _report(guards: list[NonFiniteGuard]) -> None:
    for guard in guards:
        guard.report()


@torch.no_grad()
def _evaluate(stage: Stage, step: int) -> dict[str, float]:
    stage.model.eval()
    try:
        with rng_untouched():  # evaluation never moves the training RNG (resume equality)
            return stage.evaluate(step)
    finally:
        stage.model.train()


def _export(stage: Stage, best: Best | None) -> None:
    """The best weights so far (the newest before the first evaluation, or without a val_metric)."""
    with rng_untouched():
        if best is None or best.weights is None:
            stage.export()
        else:
            stage.export(best.weights, best.record())


def _save(stage: Stage, ckpts: Checkpoints, at: Position, best: Best | None) -> None:
    """Training state (with the best weights), then the export (a torn export is rewritten from the state on
    --resume). Weights that turned NaN/inf (a step that overflowed without a non-finite loss) stop the run
    before anything is written."""
    check_finite_weights(stage.trained_modules(), step=at.step)
    in_sync = stage.in_sync()  # every rank takes part
    if not stage.acc.is_main_process:
        return
    tensors, meta = stage.training_state()
    meta = {"stage": stage.name, "model": stage.model_config, "epoch": at.epoch, "position": at.position,
            "replicas_in_sync": in_sync, "world_size": stage.acc.num_processes, **meta}
    if best is not None:
        tensors, meta = {**tensors, **best.tensors()}, {**meta, "best": best.record()}
    ckpts.save(at.step, {**tensors, **capture_rng()}, meta)
    _export(stage, best)


def check_finite_weights(modules: list[torch.nn.Module], *, step: int) -> None:
    """One host read: whether any floating-point parameter of `modules` holds NaN/inf."""
    params = [p.detach() for m in modules if m is not None for p in m.parameters() if p.is_floating_point()]
    if not params:
        return
    bad = torch.stack([(~torch.isfinite(p)).any() for p in params]).any()
    if bool(bad.item()):
        raise PartiError(f"the weights became NaN/inf by step {step}; nothing was saved. Lower --lr or "
                         f"--grad-clip, or resume from the last checkpoint with --resume")


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
