"""Soak: thousands of tiny training steps through the real training loops, resident memory sampled.

Both stages run in this process with everything a long run does: logging every 25 steps, evaluation and
sample grids, checkpoints (keep 2) and exports every steps/8 (250 at the default 2000). The resident set
size is read from /proc/self/statm at every log line; after a warm-up (the first quarter of the steps:
allocator pools, optimizer state, the synthetic renderer's cache) a least-squares line is fitted to RSS
against step.
A leak shows as a positive slope; flat memory as a slope near zero (allocator noise: a few MiB).

    python benchmarks/soak.py                 # 2000 steps per stage (~4 min on 2 busy cores)
    python benchmarks/soak.py --quick         # 300 steps per stage
    python benchmarks/soak.py --steps 8000 --stages tokenizer
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import common  # noqa: I001 - puts the repository on sys.path
from parti.runs import MetricsLogger

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mib() -> float:
    """Resident set size of this process now, from /proc/self/statm (second field, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def fit(points: list[tuple[int, float]]) -> dict:
    """Least-squares slope (MiB per 1000 steps) and spread of RSS over (step, MiB) points."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return {"slope_mib_per_1k_steps": slope * 1000, "rss_first_mib": ys[0], "rss_last_mib": ys[-1],
            "rss_min_mib": min(ys), "rss_max_mib": max(ys), "points": len(points)}


class Sampler:
    """Records (step, RSS) at every training log line of MetricsLogger (validation lines excluded)."""

    def __init__(self):
        self.points: list[tuple[int, float]] = []
        self._log = MetricsLogger.log

    def __enter__(self):
        sampler, log = self, self._log

        def log_and_sample(logger, step, **scalars):
            if "split" not in scalars:
                sampler.points.append((step, rss_mib()))
            return log(logger, step, **scalars)

        MetricsLogger.log = log_and_sample
        return self

    def __exit__(self, *exc):
        MetricsLogger.log = self._log


def soak_tokenizer(root: Path, steps: int) -> list[tuple[int, float]]:
    from parti.train_tokenizer import TokenizerTrainConfig, train_tokenizer

    every = max(1, steps // 8)
    with Sampler() as sampler:
        train_tokenizer(TokenizerTrainConfig(data="synthetic", preset="tiny", steps=steps, batch_size=4,
                                             synthetic_length=256, val_images=8, perceptual_weight=0.0,
                                             adversarial_weight=0.1, disc_start=steps // 4, disc_channels=8,
                                             log_every=25, sample_every=every, save_every=every, cpu=True,
                                             mixed_precision="no", progress=False, out=str(root / "tokenizer")))
    return sampler.points


def soak_generator(root: Path, steps: int) -> list[tuple[int, float]]:
    from parti.train_generator import GeneratorTrainConfig, train_generator

    every = max(1, steps // 8)
    with Sampler() as sampler:
        train_generator(GeneratorTrainConfig(data="synthetic", tokenizer=str(root / "tokenizer"), preset="tiny",
                                             text_preset="tiny", vocab_size=300, steps=steps, batch_size=8,
                                             synthetic_length=256, val_batches=1, ema_decay=0.99, log_every=25,
                                             sample_every=every, save_every=every, cpu=True, mixed_precision="no",
                                             progress=False, out=str(root / "generator")))
    return sampler.points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="training steps per stage")
    parser.add_argument("--quick", action="store_true", help="300 steps per stage")
    parser.add_argument("--stages", default="tokenizer,generator", help="which stages (generator needs tokenizer)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: memory is the point, not speed)")
    args = parser.parse_args()
    steps = 300 if args.quick else args.steps
    info = common.setup(args.threads)
    common.log(common.describe(info))
    results, rows = {}, []
    with tempfile.TemporaryDirectory(prefix="parti-soak-") as tmp:
        stages = [s for s in ("tokenizer", "generator") if s in args.stages.split(",")]
        for stage, run in ((s, {"tokenizer": soak_tokenizer, "generator": soak_generator}[s]) for s in stages):
            t0 = time.perf_counter()
            points = run(Path(tmp), steps)
            seconds = time.perf_counter() - t0
            warm = [p for p in points if p[0] > steps // 4]  # after allocator and cache warm-up
            result = {**fit(warm), "steps": steps, "seconds": seconds, "warmup_steps": steps // 4,
                      "rss_at_start_mib": points[0][1]}
            results[stage] = result
            common.log(f"{stage}: {steps} steps in {seconds:.0f} s, slope {result['slope_mib_per_1k_steps']:+.2f} "
                       f"MiB per 1000 steps")
            rows.append([stage, str(steps), f"{seconds:.0f} s", f"{result['rss_at_start_mib']:.0f}",
                         f"{result['rss_first_mib']:.0f}", f"{result['rss_last_mib']:.0f}",
                         f"{result['rss_min_mib']:.0f} - {result['rss_max_mib']:.0f}",
                         f"{result['slope_mib_per_1k_steps']:+.2f}"])
    print(common.table(["stage", "steps", "time", "RSS step 25", "RSS after warm-up", "RSS last", "range",
                        "slope MiB/1k steps"], rows,
                       title=f"Soak: resident memory (MiB) over training, fitted after the first {steps // 4} steps"))
    common.emit_json({"benchmark": "soak", "machine": info, "steps_per_stage": steps, **results})


if __name__ == "__main__":
    main()
