"""Training health: detectors fed the logged rows, each warning once a run with its numbers and what to try.

`Health.train_row(step, row)` takes each training row the loop logs (metrics.jsonl's), `Health.val_row(step,
row)` each evaluation; both return the new `HealthWarning`s, which the loop shows (log, progress bar) and keeps
in run.json's "warnings" list. A kind already warned about (in run.json from before a resume) stays quiet.

    codebook_collapse     tokenizer: codebook usage fell under half of its best, perplexity under a quarter
                          of its best, or under 2 (a code or two carry every image)
    discriminator_wins    tokenizer, after disc_start: D's loss near 0 while the generator's GAN loss climbs
    overfitting           validation loss rose at several evaluations in a row (1% above its best) while the
                          training loss fell
    nonfinite_gradients   steps skipped for a NaN/inf loss, or a NaN/inf gradient norm
    exploding_gradients   a gradient norm far above the run's usual (its median so far), twice in a row or 100x once

Every detector reads plain numbers only (no tensors, no model): tests feed it recorded rows.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import deque
from collections.abc import Iterable
from typing import Any

WINDOW = 5  # training rows averaged (a log row is one step's batch: noisy)
SETTLE_ROWS = 10  # training rows before the codebook's best counts (usage falls from its random start first)
USAGE_DROP = 0.5  # usage below this share of its best (smoothed) is a collapse
PERPLEXITY_DROP = 0.25  # perplexity below this share of its best, too
PERPLEXITY_FLOOR = 2.0  # or below this at all: the tokens use a code or two (collapsed from the start)
DISC_LOSS_NEAR_ZERO = 0.05  # hinge D loss (about 1 at the start): near 0 when D separates every image
GAN_LOSS_CLIMB = 0.5  # the generator's hinge GAN loss risen by this much since the GAN started
OVERFIT_RISES = 3  # validation rises in a row
OVERFIT_MARGIN = 0.01  # and the last one this share above the best evaluation (a plateau's wobble is not it)
EXPLODE_FACTOR = 10.0  # a gradient norm this many times the median of the run's earlier ones
EXPLODE_HISTORY = 5  # earlier rows needed before a norm can be called exploding
EXPLODE_FAR = 10.0  # a single spike counts only this many times further out (100x the median); else two in a row

KINDS = ("codebook_collapse", "discriminator_wins", "overfitting", "nonfinite_gradients", "exploding_gradients")


@dataclasses.dataclass
class HealthWarning:
    kind: str  # one of KINDS
    step: int
    message: str  # one line: what happened, the numbers, what to try
    numbers: dict[str, float | None]  # JSON-able: a NaN/inf is None

    def record(self) -> dict[str, Any]:
        """As run.json's "warnings" list keeps it."""
        return dataclasses.asdict(self)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


class Health:
    """The detectors of one run. `train_metric`/`val_metric`: the training and validation loss compared for
    overfitting (the same quantity: the tokenizer's L1, the generator's cross-entropy); `gan_start`: the
    step the GAN loss starts (None: no GAN); `warned`: kinds already warned about in this run."""

    def __init__(self, *, train_metric: str, val_metric: str | None, gan_start: int | None = None,
                 warned: Iterable[str] = ()):
        self.train_metric, self.val_metric, self.gan_start = train_metric, val_metric, gan_start
        self.warned = set(warned)
        self.usage: deque[float] = deque(maxlen=WINDOW)
        self.perplexity: deque[float] = deque(maxlen=WINDOW)
        self.best_usage = self.best_perplexity = 0.0
        self.codebook_rows = 0
        self.d_loss: deque[float] = deque(maxlen=WINDOW)
        self.adv: deque[float] = deque(maxlen=WINDOW)
        self.adv_start: float | None = None  # the GAN loss's mean over its first WINDOW rows
        self.grad_norms: deque[float] = deque(maxlen=200)
        self.spiked = False  # the last row's norm was a spike
        self.nonfinite = 0
        self.train: list[tuple[int, float]] = []  # (step, train_metric)
        self.val: list[tuple[int, float]] = []  # (step, val_metric)

    def train_row(self, step: int, row: dict[str, Any]) -> list[HealthWarning]:
        found = [self._codebook(step, row), self._discriminator(step, row), *self._gradients(step, row)]
        if _finite(row.get(self.train_metric)):
            self.train.append((step, float(row[self.train_metric])))
        return self._new(found)

    def val_row(self, step: int, row: dict[str, Any]) -> list[HealthWarning]:
        if self.val_metric is None or not _finite(row.get(self.val_metric)):
            return []
        self.val.append((step, float(row[self.val_metric])))
        return self._new([self._overfitting(step)])

    def _new(self, found: list[HealthWarning | None]) -> list[HealthWarning]:
        new = []
        for w in found:
            if w is not None and w.kind not in self.warned:
                self.warned.add(w.kind)
                new.append(w)
        return new

    def _codebook(self, step: int, row: dict[str, Any]) -> HealthWarning | None:
        if not (_finite(row.get("usage")) and _finite(row.get("perplexity"))):
            return None
        self.usage.append(row["usage"])
        self.perplexity.append(row["perplexity"])
        self.codebook_rows += 1
        if self.codebook_rows < SETTLE_ROWS:
            return None
        usage, perplexity = _mean(self.usage), _mean(self.perplexity)
        fell = (usage < USAGE_DROP * self.best_usage or perplexity < PERPLEXITY_DROP * self.best_perplexity
                or perplexity < PERPLEXITY_FLOOR)
        self.best_usage, self.best_perplexity = max(self.best_usage, usage), max(self.best_perplexity, perplexity)
        if not fell:
            return None
        return HealthWarning("codebook_collapse", step, (
            f"codebook collapsing at step {step}: {usage:.1%} of the codes in use (best {self.best_usage:.1%}), "
            f"perplexity {perplexity:.1f} (best {self.best_perplexity:.1f}), means of the last {WINDOW} logs; try "
            f"a lower --lr or a longer --warmup-steps, and check that the images vary"),
            {"usage": usage, "best_usage": self.best_usage, "perplexity": perplexity,
             "best_perplexity": self.best_perplexity})

    def _discriminator(self, step: int, row: dict[str, Any]) -> HealthWarning | None:
        if self.gan_start is None or step <= self.gan_start:
            return None
        if not (_finite(row.get("d_loss")) and _finite(row.get("adv"))):
            return None
        self.d_loss.append(row["d_loss"])
        self.adv.append(row["adv"])
        if len(self.adv) < WINDOW:
            return None
        if self.adv_start is None:
            self.adv_start = _mean(self.adv)
            return None
        d_loss, adv = _mean(self.d_loss), _mean(self.adv)
        if d_loss > DISC_LOSS_NEAR_ZERO or adv - self.adv_start < GAN_LOSS_CLIMB:
            return None
        return HealthWarning("discriminator_wins", step, (
            f"the discriminator is winning at step {step}: its loss is {d_loss:.3f} (near 0) while the "
            f"tokenizer's GAN loss climbed from {self.adv_start:.2f} to {adv:.2f}; try a lower "
            f"--adversarial-weight, a smaller --disc-channels, or a later --disc-start"),
            {"d_loss": d_loss, "gan_loss": adv, "gan_loss_at_start": self.adv_start})

    def _gradients(self, step: int, row: dict[str, Any]) -> list[HealthWarning | None]:
        found: list[HealthWarning | None] = []
        skipped = row.get("nonfinite_steps", 0)
        norm = row.get("grad_norm")
        nan_norm = isinstance(norm, float) and not math.isfinite(norm)
        if (_finite(skipped) and skipped > self.nonfinite) or nan_norm:
            found.append(HealthWarning("nonfinite_gradients", step, (
                f"non-finite values at step {step}: {int(skipped)} step(s) skipped for a NaN/inf loss so far, "
                f"gradient norm {norm}; try a lower --lr or --grad-clip, or --mixed-precision bf16 instead of fp16"),
                {"skipped_steps": float(skipped), "grad_norm": norm if _finite(norm) else None}))
        if _finite(skipped):
            self.nonfinite = max(self.nonfinite, int(skipped))
        if not _finite(norm):
            return found
        usual = statistics.median(self.grad_norms) if len(self.grad_norms) >= EXPLODE_HISTORY else 0.0
        spike = usual > 0 and norm > EXPLODE_FACTOR * usual
        # One clipped spike is routine early in training; gradients that explode stay high, or jump far.
        if spike and (self.spiked or norm > EXPLODE_FAR * EXPLODE_FACTOR * usual):
            found.append(HealthWarning("exploding_gradients", step, (
                f"exploding gradients at step {step}: norm {norm:.3g}, {norm / usual:.0f}x the run's median "
                f"{usual:.3g} (clipped to --grad-clip before the step); try a lower --lr or a longer "
                f"--warmup-steps"), {"grad_norm": norm, "median_grad_norm": usual}))
        self.spiked = spike
        self.grad_norms.append(norm)
        return found

    def _overfitting(self, step: int) -> HealthWarning | None:
        if len(self.val) < OVERFIT_RISES + 1:
            return None
        points = self.val[-(OVERFIT_RISES + 1):]  # (step, val) of the last evaluations
        if any(b[1] <= a[1] for a, b in zip(points, points[1:])):
            return None
        lowest = min(v for _, v in self.val)
        if points[-1][1] - lowest < OVERFIT_MARGIN * abs(lowest):
            return None
        first, before_last = points[0][0], points[-2][0]
        earlier = [v for s, v in self.train if s <= first][-WINDOW * 4:]  # up to the first of the rising ones
        recent = [v for s, v in self.train if s > before_last]  # since the evaluation before the last
        if not earlier or not recent or _mean(recent) >= _mean(earlier):
            return None
        return HealthWarning("overfitting", step, (
            f"overfitting at step {step}: {self.val_metric} rose {OVERFIT_RISES} evaluations in a row "
            f"({points[0][1]:.4f} at step {first} -> {points[-1][1]:.4f}) while the training {self.train_metric} "
            f"fell ({_mean(earlier):.4f} -> {_mean(recent):.4f}); the export keeps the best weights; try more "
            f"data, a larger --weight-decay, or fewer --steps"),
            {"val_first": points[0][1], "val_last": points[-1][1], "train_before": _mean(earlier),
             "train_recent": _mean(recent)})
