"""`parti demo`: the main job on the built-in default, end to end, offline.

Trains a tokenizer and a generator (with a jointly trained text encoder) on the synthetic captioned
faces, samples a grid for prompts that name attributes, and measures how often the generated faces
show the prompted background and hair colour. CPU: small 64 px configuration sized to finish in
about ten minutes on 2 cores; GPU: a 128 px configuration with larger models and more steps.
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

from parti.checkpoint import write_json
from parti.errors import PartiError

log = logging.getLogger(__name__)

DEMO_PROMPTS = (
    "a smiling person with long red hair and glasses on a blue background",
    "a person with short black hair wearing a hat on a yellow background",
    "a neutral person with long blonde hair on a green background",
    "a smiling person with short white hair on a purple background",
    "a person with long blue hair and glasses on a gray background",
    "a neutral person with short brown hair wearing a hat on a red background",
)


@dataclass(frozen=True)
class DemoSize:
    tokenizer_preset: str
    tokenizer_steps: int
    tokenizer_batch: int
    tokenizer_lr: float
    generator_preset: str
    text_preset: str
    generator_steps: int
    generator_batch: int
    generator_lr: float
    synthetic_length: int
    text_tokenizer: str = "sentencepiece"
    num_workers: int = 0  # data loader processes rendering faces (a GPU outruns one CPU core)


DEMO_SIZES = {
    # ~11 minutes on 2 CPU cores: 64 px faces, 8x8 codes from 512, a 4.5M-parameter generator.
    "cpu": DemoSize("demo", 800, 32, 2e-3, "demo", "tiny", 1500, 32, 1e-3, 10000),
    # One GPU: 128 px, 16x16 codes from 8192, a 34M-parameter generator (~5 minutes on an H100).
    "gpu": DemoSize("base", 2000, 64, 1e-3, "bench", "small", 2000, 64, 5e-4, 20000, num_workers=6),
    # Seconds: the tests' end-to-end check of this command's wiring (not a useful model).
    "smoke": DemoSize("tiny", 4, 8, 2e-3, "tiny", "tiny", 4, 8, 1e-3, 64, "bytes"),
}


@dataclass
class DemoConfig:
    out: str = ""  # default: checkpoints/demo, or checkpoints/demo_holdout with holdout
    images: str = "images"
    size: str = "auto"  # auto | cpu | gpu
    seed: int = 0
    holdout: bool = False  # train without HOLDOUT_COMBINATIONS' pairs and score them apart
    # Classifier-free guidance for the grid and the accuracy. Measured on a CPU demo generator (96
    # prompts): background/hair accuracy 99%/99% at 1.5-2, 92%/91% at 3, 55%/66% at 5 with top-p 0.9
    # (over-guidance lifts tail codes: speckled images).
    guidance_scale: float = 2.0
    eval_prompts: int = 48  # attribute-accuracy prompts (one image each)
    progress: bool = True


def run_demo(cfg: DemoConfig) -> dict:
    from parti.evaluate import attribute_accuracy
    from parti.pipeline import load_pipeline
    from parti.plots import reconstruction_grid, sample_grid
    from parti.tokenizer import load_tokenizer
    from parti.train_generator import GeneratorTrainConfig, train_generator
    from parti.train_tokenizer import TokenizerTrainConfig, train_tokenizer, val_batch, open_split

    size = cfg.size if cfg.size != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    if size not in DEMO_SIZES:
        raise PartiError(f"--size must be auto, cpu, gpu or smoke; got {cfg.size!r}")
    s = DEMO_SIZES[size]
    name = "demo_holdout" if cfg.holdout else "demo"
    out, images = Path(cfg.out or f"checkpoints/{name}"), Path(cfg.images)
    images.mkdir(parents=True, exist_ok=True)
    # A rerun skips finished stages; their training time is carried over from the previous summary.
    before = json.loads((out / "demo.json").read_text()).get("seconds", {}) if (out / "demo.json").is_file() else {}
    t0 = time.time()
    tok_cfg = TokenizerTrainConfig(data="synthetic", preset=s.tokenizer_preset, out=str(out / "tokenizer"),
                                   steps=s.tokenizer_steps, batch_size=s.tokenizer_batch, lr=s.tokenizer_lr,
                                   warmup_steps=50, perceptual_weight=0.0, adversarial_weight=0.0,
                                   sample_every=max(1, s.tokenizer_steps // 2), save_every=max(1, s.tokenizer_steps // 4),
                                   synthetic_length=s.synthetic_length, seed=cfg.seed, progress=cfg.progress,
                                   holdout=cfg.holdout, num_workers=s.num_workers, resume=True)
    _check_same_run(out / "tokenizer", dataclasses.asdict(tok_cfg))
    trained = not _finished(out / "tokenizer", s.tokenizer_steps)
    if trained:
        train_tokenizer(tok_cfg)
    t_tok = time.time() - t0 if trained else before.get("tokenizer", 0.0)
    t1 = time.time()
    gen_cfg = GeneratorTrainConfig(data="synthetic", tokenizer=str(out / "tokenizer"), preset=s.generator_preset,
                                   out=str(out / "generator"), text_preset=s.text_preset, vocab_size=300,
                                   text_tokenizer=s.text_tokenizer,
                                   steps=s.generator_steps, batch_size=s.generator_batch, lr=s.generator_lr,
                                   warmup_steps=50, sample_every=max(1, s.generator_steps // 2),
                                   save_every=max(1, s.generator_steps // 4), synthetic_length=s.synthetic_length,
                                   holdout=cfg.holdout, num_workers=s.num_workers,
                                   seed=cfg.seed, progress=cfg.progress, resume=True)
    _check_same_run(out / "generator", dataclasses.asdict(gen_cfg))
    trained = not _finished(out / "generator", s.generator_steps)
    if trained:
        train_generator(gen_cfg)
    t_gen = time.time() - t1 if trained else before.get("generator", 0.0)
    t2 = time.time()

    tokenizer = load_tokenizer(out / "tokenizer")
    real = val_batch(open_split(tok_cfg, "val", tokenizer.config.image_size), 8)
    reconstruction_grid(real, tokenizer.decode(tokenizer.encode(real)).clamp(-1, 1),
                        path=images / f"{name}_reconstructions.png")
    pipe = load_pipeline(out / "generator")
    result = pipe(list(DEMO_PROMPTS), num_images_per_prompt=6, guidance_scale=cfg.guidance_scale, seed=cfg.seed)
    sample_grid(result.images.cpu(), list(DEMO_PROMPTS), images_per_prompt=6, path=images / f"{name}_samples.png")
    accuracy = attribute_accuracy(pipe, num_prompts=cfg.eval_prompts, images_per_prompt=1, seed=cfg.seed,
                                  holdout=cfg.holdout, guidance_scale=cfg.guidance_scale)
    t_rest = time.time() - t2  # pictures, sampling and scoring (rerun every time)
    summary = {"size": size, "seconds": {"tokenizer": round(t_tok, 1), "generator": round(t_gen, 1),
                                         "sampling_and_scoring": round(t_rest, 1),
                                         "total": round(t_tok + t_gen + t_rest, 1)},
               "checkpoints": {"tokenizer": str(out / "tokenizer"), "generator": str(out / "generator")},
               "images": [str(images / f"{name}_samples.png"), str(images / f"{name}_reconstructions.png")],
               "attribute_accuracy": accuracy, "holdout": cfg.holdout,
               "guidance_scale": cfg.guidance_scale, "sizes": dataclasses.asdict(s)}
    write_json(out / "demo.json", summary)
    return summary


# Settings that change what a stage learns; a demo folder made with other values is not continued.
_SAME_RUN_KEYS = ("data", "preset", "steps", "batch_size", "lr", "synthetic_length", "holdout", "seed", "text_preset")


def _check_same_run(run_dir: Path, config: dict) -> None:
    if not (run_dir / "run.json").is_file():
        return
    old = json.loads((run_dir / "run.json").read_text()).get("config", {})
    changed = [f"{k}: {old.get(k, False)!r} -> {config[k]!r}" for k in _SAME_RUN_KEYS
               if k in config and old.get(k, False if k == "holdout" else None) != config[k]]
    if changed:
        raise PartiError(f"{run_dir} holds a demo stage made with other settings ({'; '.join(changed)}); "
                         f"delete {run_dir.parent} or pass --out NEW_FOLDER")


def _finished(run_dir: Path, steps: int) -> bool:
    """A stage whose exported model exists and whose newest checkpoint reached `steps` is skipped."""
    from parti.trainer import Checkpoints

    done = Checkpoints(run_dir).complete()
    if not done or not (run_dir / "config.json").exists():
        return False
    return json.loads((done[-1] / "state.json").read_text()).get("step", 0) >= steps
