"""What `parti.ipynb` calls besides training and sampling: environment checks, Drive, the run configuration.

The notebook's cells hold plain parameters and calls; the decisions live here, where they are tested:
whether we run on Colab, where run folders go (local, or Google Drive so a disconnect loses nothing),
which mixed precision the GPU gets, and the small mode CI uses. Setting PARTI_NOTEBOOK_SMALL=1 turns
any configuration into a seconds-long one on the synthetic faces (tiny models, a few steps, no VGG
or other download), written under PARTI_NOTEBOOK_OUT (default checkpoints/notebook_small).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from parti.errors import PartiError

SMALL_ENV = "PARTI_NOTEBOOK_SMALL"  # "1": resolve() returns the small CPU configuration
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
class NotebookConfig:
    """Everything the notebook's cells pass to training, sampling and evaluation, with Colab-sized defaults.

    The defaults fit one Colab GPU (a T4 runs them in hours, an A100 in well under): the `base`
    tokenizer (128 px, 16x16 codes from 8192) and the `bench` generator with a jointly trained text encoder.
    """

    data: str = "synthetic"  # stage 1: synthetic | a folder of images | hf:NAME | a .parquet file or folder
    generator_data: str = ""  # stage 2 needs captions; empty: the same as `data`
    out: str = DEFAULT_OUT  # run folders: OUT/tokenizer, OUT/generator
    use_drive: bool = False  # Colab: put run folders on Google Drive, under MyDrive/<drive_folder>
    drive_folder: str = "parti"
    tokenizer_preset: str = "base"
    tokenizer_steps: int = 20000
    tokenizer_batch_size: int = 32
    tokenizer_lr: float = 1e-3
    perceptual_weight: float = 0.1  # needs VGG16 weights (downloaded once); 0 turns the loss off
    adversarial_weight: float = 0.1
    disc_start: int = 10000
    generator_preset: str = "bench"
    text_encoder: str = "trainable"  # trainable | t5-small | t5-base | t5-large
    text_preset: str = "small"  # the trainable encoder's size
    text_tokenizer: str = "sentencepiece"  # the trainable encoder's tokenizer: sentencepiece | bytes
    generator_steps: int = 30000
    generator_batch_size: int = 64
    generator_lr: float = 5e-4
    warmup_steps: int = 500
    log_every: int = 10
    sample_every: int = 1000  # sample grids (samples/step_*.png) and validation metrics
    save_every: int = 500  # resumable checkpoints: a disconnect loses at most this many steps
    synthetic_length: int = 20000
    val_images: int = 64
    eval_images: int = 1000  # evaluation: held-out images (reconstructions, FID, CLIP score)
    eval_prompts: int = 200  # evaluation: attribute-accuracy prompts on synthetic data
    num_workers: int = 2
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16
    seed: int = 0
    small: bool = False  # set by resolve() in small mode

    def __post_init__(self):
        from parti.generator import GENERATOR_PRESETS
        from parti.tokenizer import TOKENIZER_PRESETS

        if self.tokenizer_preset not in TOKENIZER_PRESETS:
            raise PartiError(f"unknown tokenizer preset {self.tokenizer_preset!r}; "
                             f"choose one of {sorted(TOKENIZER_PRESETS)}")
        if self.generator_preset not in GENERATOR_PRESETS:
            raise PartiError(f"unknown generator preset {self.generator_preset!r}; "
                             f"choose one of {sorted(GENERATOR_PRESETS)}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise PartiError(f"mixed_precision must be auto, no, bf16 or fp16; got {self.mixed_precision!r}")

    @property
    def tokenizer_dir(self) -> Path:
        return Path(self.out) / "tokenizer"

    @property
    def generator_dir(self) -> Path:
        return Path(self.out) / "generator"


# Small mode: tiny models on a few synthetic faces, a handful of steps, nothing downloaded (no VGG, no T5).
# Each stage runs in seconds on two CPU cores; the notebook then exercises every cell as on a GPU.
SMALL = dict(
    data="synthetic", generator_data="synthetic", use_drive=False,
    tokenizer_preset="tiny", tokenizer_steps=6, tokenizer_batch_size=4,
    perceptual_weight=0.0, adversarial_weight=0.0,
    generator_preset="tiny", text_encoder="trainable", text_preset="tiny", text_tokenizer="bytes",
    generator_steps=6, generator_batch_size=4,
    warmup_steps=2, log_every=2, sample_every=6, save_every=3,
    synthetic_length=64, val_images=8, eval_images=8, eval_prompts=4, num_workers=0,
)


def resolve(cfg: NotebookConfig) -> NotebookConfig:
    """The configuration a run uses: small mode applied, run folders placed, mixed precision chosen.

    Small mode replaces the sizes with SMALL and the output folder with $PARTI_NOTEBOOK_OUT (default
    checkpoints/notebook_small). Otherwise, with `use_drive` on Colab, Drive is mounted and run folders
    go to MyDrive/<drive_folder>; `use_drive` elsewhere is ignored with a warning.
    """
    from parti.runs import choose_mixed_precision

    changes: dict = {}
    if small_mode():
        changes.update(SMALL, small=True, out=os.environ.get(OUT_ENV) or SMALL_OUT)
    elif cfg.use_drive:
        if in_colab():
            changes["out"] = str(mount_drive() / cfg.drive_folder)
        else:
            logging.getLogger(__name__).warning("use_drive is for Colab; writing run folders to %s", cfg.out)
    if cfg.mixed_precision == "auto":
        # By compute capability: bf16 on Ampere and newer, fp16 on a T4 (where bf16 is only emulated), fp32 on CPU.
        changes["mixed_precision"] = choose_mixed_precision()
    resolved = dataclasses.replace(cfg, **changes)
    if not resolved.generator_data:
        resolved = dataclasses.replace(resolved, generator_data=resolved.data)
    return resolved


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
