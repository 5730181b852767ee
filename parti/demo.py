"""`parti demo`: the main job on the built-in default, end to end, offline.

Trains a tokenizer and a generator (with a jointly trained text encoder) on the synthetic captioned
faces, samples a grid for prompts that name attributes, and measures how often the generated faces
show the prompted attributes (also for prompts in held-out phrasings, and for the grid itself) and how
often they show glasses or a hat no prompt asked for. CPU: small 64 px configuration sized to finish in
about three minutes on 2 cores; GPU: a 128 px configuration with larger models and more steps.
Rerunning continues unfinished stages from their last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from parti.checkpoint import CONFIG_NAME, DEMO_NAME, RUN_JSON, TOKENIZER_DIR
from parti.data import open_split, val_batch
from parti.errors import PartiError
from parti.evaluate import attribute_accuracy, score_attributes
from parti.files import write_json
from parti.pipeline import load_pipeline
from parti.plots import reconstruction_grid, sample_grid
from parti.prompts import DEMO_PROMPTS
from parti.sampling import SamplingParams
from parti.settings import check_settings, setting
from parti.state import Checkpoints
from parti.tokenizer import load_tokenizer
from parti.train_generator import GeneratorTrainConfig, train_generator
from parti.train_tokenizer import TokenizerTrainConfig, train_tokenizer

log = logging.getLogger(__name__)

# Each size: overrides of the two training configs (everything else is their defaults). Shared by both stages:
# the synthetic faces, no perceptual or GAN loss (flat cartoon faces, nothing to download).
DEMO_SIZES = {
    # 64 px faces, 8x8 codes from 512, a 0.7M-parameter generator: the CPU demo (its time, and the measurements
    # that chose these sizes, batches and steps: docs/benchmarks.md).
    "cpu": {"tokenizer": dict(preset="demo", steps=1000, batch_size=8, lr=3e-3),
            "generator": dict(preset="demo", text_preset="tiny", phrase_pieces=True, steps=1600, batch_size=16,
                              lr=3e-3, ema_decay=0.995),
            "synthetic_length": 10000, "num_workers": 0},
    # One GPU: 128 px, 16x16 codes from 8192, a 34M-parameter generator; loader processes render the faces.
    "gpu": {"tokenizer": dict(preset="base", steps=2000, batch_size=64, lr=1e-3),
            "generator": dict(preset="bench", text_preset="small", phrase_pieces=True, steps=2000, batch_size=64,
                              lr=5e-4),
            "synthetic_length": 20000, "num_workers": 6},
    # Seconds: the tests' end-to-end check of this command's wiring (not a useful model).
    "smoke": {"tokenizer": dict(preset="tiny", steps=4, batch_size=8, lr=2e-3),
              "generator": dict(preset="tiny", text_preset="tiny", text_tokenizer="bytes", steps=4, batch_size=8,
                                lr=1e-3),
              "synthetic_length": 64, "num_workers": 0},
}


@dataclass
class DemoConfig:
    out: str | None = setting(None, "run folders go here (default: checkpoints/demo, or checkpoints/demo_holdout "
                              "with --holdout)")
    images: str = setting("images", "pictures go here")
    size: str = setting("auto", "configuration (auto: gpu with a GPU, else cpu)", choices=("auto", *DEMO_SIZES))
    seed: int = setting(0, "seed of both stages and of sampling", minimum=0)
    holdout: bool = setting(False, "train without the held-out (hair, background) pairs and report their "
                            "accuracy apart")
    # Measured on the CPU demo's generator: 1.5 scores best, higher scales over-guide (docs/results.md).
    guidance_scale: float = setting(1.5, "classifier-free guidance of the grid and the accuracy prompts", minimum=0,
                                    maximum=100)
    eval_prompts: int = setting(48, "attribute-accuracy prompts (one image each)", minimum=1, maximum=100000)
    progress: bool = setting(True, "show progress bars")

    def __post_init__(self):
        check_settings(self)


def stage_configs(cfg: DemoConfig, size: str) -> tuple:
    """The two training configs of a demo size: its overrides on the training configs' defaults."""
    s, out = DEMO_SIZES[size], demo_folder(cfg)
    common = dict(data="synthetic", warmup_steps=50, synthetic_length=s["synthetic_length"], seed=cfg.seed,
                  progress=cfg.progress, holdout=cfg.holdout, num_workers=s["num_workers"], resume=True)
    tok, gen = s["tokenizer"], s["generator"]
    tok_cfg = TokenizerTrainConfig(**common, **tok, out=str(out / TOKENIZER_DIR), perceptual_weight=0.0,
                                   adversarial_weight=0.0, sample_every=max(1, tok["steps"] // 2),
                                   save_every=max(1, tok["steps"] // 4))
    gen_cfg = GeneratorTrainConfig(**common, **gen, tokenizer=str(out / TOKENIZER_DIR), out=str(out / "generator"),
                                   sample_every=max(1, gen["steps"] // 2),
                                   save_every=max(1, gen["steps"] // 4))
    return tok_cfg, gen_cfg


def demo_folder(cfg: DemoConfig) -> Path:
    return Path(cfg.out or ("checkpoints/demo_holdout" if cfg.holdout else "checkpoints/demo"))


def _train_stage(run_dir: Path, config, train, before: float | None) -> float:
    """Train a stage unless it already finished; the seconds it took (or took the run that trained it)."""
    _check_same_run(run_dir, config)
    if _finished(run_dir, config.steps):
        return before or 0.0
    t0 = time.time()
    train(config)
    return time.time() - t0


def run_demo(cfg: DemoConfig) -> dict:
    size = cfg.size if cfg.size != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    name = "demo_holdout" if cfg.holdout else "demo"
    out, images = demo_folder(cfg), Path(cfg.images)
    if out.exists() and not out.is_dir():
        raise PartiError(f"--out {out} is a file; give a folder for the demo's runs")
    images.mkdir(parents=True, exist_ok=True)
    # A rerun skips finished stages; their training time is carried over from the previous summary.
    before = json.loads((out / DEMO_NAME).read_text()).get("seconds", {}) if (out / DEMO_NAME).is_file() else {}
    tok_cfg, gen_cfg = stage_configs(cfg, size)
    t_tok = _train_stage(out / TOKENIZER_DIR, tok_cfg, train_tokenizer, before.get("tokenizer"))
    t_gen = _train_stage(out / "generator", gen_cfg, train_generator, before.get("generator"))
    t2 = time.time()

    tokenizer = load_tokenizer(out / TOKENIZER_DIR)
    real = val_batch(open_split(tok_cfg, "val", tokenizer.config.image_size), 8)
    reconstruction_grid(real, tokenizer.decode(tokenizer.encode(real)).clamp(-1, 1),
                        path=images / f"{name}_reconstructions.png")
    pipe = load_pipeline(out / "generator")
    sampling = SamplingParams(guidance_scale=cfg.guidance_scale)
    result = pipe(list(DEMO_PROMPTS), sampling, num_images_per_prompt=6, seed=cfg.seed)
    sample_grid(result.images.cpu(), list(DEMO_PROMPTS), images_per_prompt=6, path=images / f"{name}_samples.png")
    accuracy = attribute_accuracy(pipe, sampling, num_prompts=cfg.eval_prompts, images_per_prompt=1, seed=cfg.seed,
                                  holdout=cfg.holdout)
    # The picture itself, scored as the prompts are (unasked-for glasses or hats included).
    accuracy.update(score_attributes(result.images.cpu(), [p for p in DEMO_PROMPTS for _ in range(6)],
                                     prefix="grid_attribute_accuracy"))
    t_rest = time.time() - t2  # pictures, sampling and scoring (rerun every time)
    summary = {"size": size, "seconds": {"tokenizer": round(t_tok, 1), "generator": round(t_gen, 1),
                                         "sampling_and_scoring": round(t_rest, 1),
                                         "total": round(t_tok + t_gen + t_rest, 1)},
               "checkpoints": {"tokenizer": str(out / TOKENIZER_DIR), "generator": str(out / "generator")},
               "images": [str(images / f"{name}_samples.png"), str(images / f"{name}_reconstructions.png")],
               "attribute_accuracy": accuracy, "holdout": cfg.holdout,
               "guidance_scale": cfg.guidance_scale, "sizes": DEMO_SIZES[size]}
    write_json(out / DEMO_NAME, summary)
    return summary


# Settings that change what a stage learns; a demo folder made with other values is not continued.
_SAME_RUN_KEYS = ("data", "preset", "steps", "batch_size", "lr", "synthetic_length", "holdout", "seed", "text_preset",
                  "phrase_pieces")


def _check_same_run(run_dir: Path, config) -> None:
    """config: the stage's training config. A key an older run.json lacks counts as its default."""
    if not (run_dir / RUN_JSON).is_file():
        return
    old = json.loads((run_dir / RUN_JSON).read_text()).get("config", {})
    now, defaults = dataclasses.asdict(config), {f.name: f.default for f in dataclasses.fields(config)}
    was = {k: old.get(k, defaults[k]) for k in _SAME_RUN_KEYS if k in now}
    changed = [f"{k}: {was[k]!r} -> {now[k]!r}" for k in was if was[k] != now[k]]
    if changed:
        raise PartiError(f"{run_dir} holds a demo stage made with other settings ({'; '.join(changed)}); "
                         f"delete {run_dir.parent} or pass --out NEW_FOLDER")


def _finished(run_dir: Path, steps: int) -> bool:
    """A stage whose exported model exists and whose newest checkpoint reached `steps` is skipped."""
    done = Checkpoints(run_dir).complete()
    if not done or not (run_dir / CONFIG_NAME).exists():
        return False
    return json.loads((done[-1] / "state.json").read_text()).get("step", 0) >= steps
