"""What `parti.ipynb` calls besides training and sampling: environment checks, Drive, the run configuration.

The notebook's cells hold plain parameters and calls; the decisions live here, where they are tested:
whether we run on Colab, where run folders go (local, or Google Drive so a disconnect loses nothing),
which mixed precision the GPU gets, and the small mode CI uses. Setting PARTI_NOTEBOOK_SMALL=1 turns
any run into a seconds-long one on the synthetic faces (tiny models, a few steps, no VGG or other
download), written under PARTI_NOTEBOOK_OUT (default checkpoints/notebook_small). `configure` builds the
training and evaluation configs from overrides of their own defaults: no setting is declared here.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from parti.errors import PartiError
from parti.evaluate import GeneratorEvalConfig, TokenizerEvalConfig
from parti.train_generator import GeneratorTrainConfig
from parti.train_tokenizer import TokenizerTrainConfig

SMALL_ENV = "PARTI_NOTEBOOK_SMALL"  # "1": configure() returns the small CPU run
OUT_ENV = "PARTI_NOTEBOOK_OUT"  # small mode's output folder (tests point it at a temporary folder)
DRIVE_MOUNT = "/content/drive"  # where Colab mounts Google Drive; run folders go under MyDrive/<drive_folder>
DEFAULT_OUT = "checkpoints/notebook"
SMALL_OUT = "checkpoints/notebook_small"  # apart from DEFAULT_OUT: a resumed full run never meets tiny weights


def in_colab() -> bool:
    """True inside a Google Colab kernel."""
    if "google.colab" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):  # no "google" package at all
        return False


def small_mode() -> bool:
    """True when PARTI_NOTEBOOK_SMALL is set to 1/true/yes (CI runs the notebook this way)."""
    return os.environ.get(SMALL_ENV, "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class NotebookRun:
    """What the notebook's cells train and evaluate: the four configs, built from overrides of their defaults."""

    tokenizer: TokenizerTrainConfig
    generator: GeneratorTrainConfig
    tokenizer_eval: TokenizerEvalConfig
    generator_eval: GeneratorEvalConfig
    small: bool = False  # small mode (PARTI_NOTEBOOK_SMALL=1)

    @property
    def tokenizer_dir(self) -> Path:
        return Path(self.tokenizer.out)

    @property
    def generator_dir(self) -> Path:
        return Path(self.generator.out)


# Small mode: tiny models on a few synthetic faces, a handful of steps, nothing downloaded (no VGG, no T5).
# Each stage runs in seconds on two CPU cores; the notebook then exercises every cell as on a GPU.
SMALL = {
    "common": dict(data="synthetic", warmup_steps=2, log_every=2, sample_every=6, save_every=3, synthetic_length=64,
                   num_workers=0, steps=6, batch_size=4),
    "tokenizer": dict(preset="tiny", perceptual_weight=0.0, adversarial_weight=0.0, val_images=8),
    "generator": dict(preset="tiny", text_encoder="trainable", text_preset="tiny", text_tokenizer="bytes"),
    "eval": dict(num_images=8, attribute_prompts=4, download=False),
}


def configure(*, out: str = DEFAULT_OUT, use_drive: bool = False, drive_folder: str = "parti",
              tokenizer: dict | None = None, generator: dict | None = None, evaluation: dict | None = None,
              **common) -> NotebookRun:
    """The run the notebook's cells train: `common` settings (data, seed, save_every, ...) for both stages,
    `tokenizer`/`generator` overrides of each stage's config (a field name each), `evaluation` overrides of
    the evaluation configs (num_images, attribute_prompts, download).

    Run folders go to OUT/tokenizer and OUT/generator; with `use_drive` on Colab, OUT is placed under the
    mounted MyDrive/<drive_folder> (elsewhere it is ignored with a warning). Stage 2 reads `generator["data"]`
    when given, else the common data. Small mode ($PARTI_NOTEBOOK_SMALL=1) replaces sizes with SMALL and OUT
    with $PARTI_NOTEBOOK_OUT. Mixed precision "auto" is resolved here, so the cell prints what runs.
    """
    from parti.runs import choose_mixed_precision

    tok, gen, ev = dict(tokenizer or {}), dict(generator or {}), dict(evaluation or {})
    small = small_mode()
    if small:  # small mode's values win over every other, shared or per stage
        common.update(SMALL["common"])
        tok.update(SMALL["common"], **SMALL["tokenizer"])
        gen.update(SMALL["common"], **SMALL["generator"])
        ev.update(SMALL["eval"])
        out = os.environ.get(OUT_ENV) or SMALL_OUT
    elif use_drive and in_colab():
        out = str(mount_drive() / drive_folder / out)
    elif use_drive:
        logging.getLogger(__name__).warning("use_drive is for Colab; writing run folders to %s", out)
    if common.get("mixed_precision", "auto") == "auto":
        # By compute capability: bf16 on Ampere and newer, fp16 on a T4 (bf16 is only emulated there), fp32 on CPU.
        common["mixed_precision"] = choose_mixed_precision()
    tok_dir, gen_dir = Path(out) / "tokenizer", Path(out) / "generator"
    tok_cfg = TokenizerTrainConfig(**{**common, **tok, "out": str(tok_dir)})
    gen_cfg = GeneratorTrainConfig(**{**common, **gen, "out": str(gen_dir), "tokenizer": str(tok_dir)})
    shared = {"seed": common.get("seed", 0), **ev}
    return NotebookRun(
        tokenizer=tok_cfg, generator=gen_cfg, small=small,
        tokenizer_eval=TokenizerEvalConfig(checkpoint=str(tok_dir), data=tok_cfg.data,
                                           **{k: v for k, v in shared.items() if k != "attribute_prompts"}),
        generator_eval=GeneratorEvalConfig(checkpoint=str(gen_dir), data=gen_cfg.data, data_seed=shared["seed"],
                                           **shared))


def mount_drive() -> Path:
    """Mount Google Drive (Colab asks for permission once) and return MyDrive."""
    if not in_colab():
        raise PartiError("Google Drive can only be mounted from Colab; set use_drive=False")
    from google.colab import drive  # only on Colab

    drive.mount(DRIVE_MOUNT)
    return Path(DRIVE_MOUNT) / "MyDrive"


def show_logs(level: int = logging.INFO) -> None:
    """Print parti's log lines (device, "resumed from step N", warnings) in the cell that produced them."""
    logger = logging.getLogger("parti")
    logger.setLevel(level)
    if not any(getattr(h, "_parti_notebook", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._parti_notebook = True  # one handler however often the setup cell runs
        logger.addHandler(handler)
    logger.propagate = False  # a root handler (some hosts install one) would print every line twice


def describe_environment() -> str:
    """Where this kernel runs: Colab or not, small mode or not, torch version, the device."""
    import torch

    from parti.runs import detect_device

    device = detect_device()
    where = "Colab" if in_colab() else "local Jupyter"
    lines = [f"{where}, torch {torch.__version__}, {device['type']}: {device['name']}"
             + (f" ({device['memory_gib']} GiB)" if "memory_gib" in device else "")]
    if device["type"] == "cpu" and not small_mode():
        lines.append("no GPU: on Colab choose Runtime > Change runtime type > GPU, or set "
                     f"{SMALL_ENV}=1 for the small CPU configuration")
    if small_mode():
        lines.append(f"small mode ({SMALL_ENV}=1): tiny models, a few steps, synthetic faces")
    return "\n".join(lines)


def preview_data(spec: str, *, n: int = 4, image_size: int = 128, synthetic_length: int | None = None,
                 seed: int = 0):
    """The first `n` readable training images of `spec`, each under its caption, as a PIL image."""
    import torch

    from parti.data import open_source
    from parti.plots import sample_grid

    source = open_source(spec, split="train", image_size=image_size, synthetic_length=synthetic_length, seed=seed)
    items = [item for item in (source[i] for i in range(min(len(source), 4 * n))) if item is not None][:n]
    if not items:
        raise PartiError(f"{spec!r} holds no readable images")
    captions = [item["caption"] or "(no caption)" for item in items]
    return sample_grid(torch.stack([item["image"] for item in items]), captions, images_per_prompt=1)


def latest_grid(run_dir: str | Path):
    """The newest grid a training run drew (RUN/samples/step_*.png) as a PIL image."""
    from PIL import Image

    grids = sorted(Path(run_dir, "samples").glob("step_*.png"))  # zero-padded steps: name order is step order
    if not grids:
        raise PartiError(f"{run_dir} has no sample grids yet; they appear every sample_every steps")
    with Image.open(grids[-1]) as image:
        return image.copy()  # loaded, and the file closed
