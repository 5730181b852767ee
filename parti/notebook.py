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
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from parti.checkpoint import CACHE_DIR, GRID_GLOB, MANIFEST_NAME, SAMPLES_DIR, TOKENIZER_DIR
from parti.data import find_columns, open_source, to_tensor
from parti.device import choose_mixed_precision, detect_device
from parti.errors import PartiError, set_audience
from parti.evaluate import GeneratorEvalConfig, TokenizerEvalConfig
from parti.fetch import FFHQ_MIRROR, fetch_ffhq_thumbnails
from parti.hub import dataset_snapshot
from parti.loop import TENSORBOARD_DIR
from parti.plots import sample_grid
from parti.prompts import FFHQ_SAMPLE_PROMPTS, SYNTHETIC_SAMPLE_PROMPTS
from parti.runs import run_progress
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
    dataset: str = "synthetic"  # what `configure`'s choice resolved to: ffhq | synthetic
    drive: Path | None = None  # MyDrive/<drive_folder> when Drive is mounted: downloads are kept there too

    @property
    def tokenizer_dir(self) -> Path:
        return Path(self.tokenizer.out)

    @property
    def generator_dir(self) -> Path:
        return Path(self.generator.out)


# What each dataset choice trains on; the notebook's form values override these per stage.
FFHQ_CAPTIONED = "hf:cr7Por/ffhq_controlnet_5_2_23"  # 39.6k FFHQ faces with captions (image, image_caption)
DATASETS = {
    # The real job: stage 1 on FFHQ's 70,000 thumbnails (fetched once onto local disk), stage 2 on the
    # captioned FFHQ with a frozen pretrained T5 (t5-large, as in the original work).
    "ffhq": {"tokenizer": dict(perceptual_weight=0.1, adversarial_weight=0.1),
             "generator": dict(data=FFHQ_CAPTIONED, text_encoder="t5-large"), "thumbnails": True},
    # The built-in synthetic faces: no download, a text encoder trained jointly.
    "synthetic": {"tokenizer": dict(data="synthetic"), "generator": dict(data="synthetic", text_encoder="trainable"),
                  "thumbnails": False},
}

# Small mode: tiny models, a handful of steps, nothing downloaded (no VGG; synthetic data unless the FFHQ
# choice was made explicitly, then its sources at tiny sizes). Each stage runs in seconds on two CPU cores.
SMALL = {
    "common": dict(warmup_steps=2, log_every=2, sample_every=6, save_every=3, synthetic_length=64, num_workers=0,
                   steps=6, batch_size=4),
    "tokenizer": dict(preset="tiny", perceptual_weight=0.0, adversarial_weight=0.0, val_images=8),
    "generator": dict(preset="tiny", text_preset="tiny", text_tokenizer="bytes"),
    "eval": dict(num_images=8, attribute_prompts=4, download=False),
}


def choose_dataset(choice: str) -> str:
    """auto: FFHQ on a GPU with the Hub reachable (offline mode not set), else the synthetic faces."""
    import torch
    from huggingface_hub import constants

    if choice not in ("auto", *DATASETS):
        raise PartiError(f"dataset must be auto, {' or '.join(DATASETS)}; got {choice!r}")
    if choice != "auto":
        return choice
    return "ffhq" if torch.cuda.is_available() and not constants.HF_HUB_OFFLINE and not small_mode() else "synthetic"


def configure(*, dataset: str = "auto", out: str = DEFAULT_OUT, use_drive: bool = True, drive_folder: str = "parti",
              data_dir: str = "data", tokenizer: dict | None = None, generator: dict | None = None,
              evaluation: dict | None = None, **common) -> NotebookRun:
    """The run the notebook's cells train: the `dataset` choice's sources (DATASETS), `common` settings (seed,
    save_every, ...) for both stages, `tokenizer`/`generator` overrides of each stage's config (a field name
    each; `text_encoder="auto"` keeps the dataset's), `evaluation` overrides of the evaluation configs.

    FFHQ's thumbnails go to DATA_DIR/ffhq128 on local disk (`fetch_data`). Run folders go to OUT/tokenizer and
    OUT/generator; with `use_drive` (the default) on Colab, Drive is mounted and OUT placed under
    MyDrive/<drive_folder>/, so a new runtime continues there (elsewhere the flag is ignored). Small mode ($PARTI_NOTEBOOK_SMALL=1) shrinks every size (SMALL) and writes
    under $PARTI_NOTEBOOK_OUT. Mixed precision "auto" is resolved here, so the cell prints what runs.
    """
    kind = choose_dataset(dataset)
    chosen = DATASETS[kind]
    given = {"data": common.pop("data")} if "data" in common else {}  # data named for both stages wins
    tok = {**chosen["tokenizer"], **given, **(tokenizer or {})}
    gen = {**chosen["generator"], **given, **{k: v for k, v in (generator or {}).items() if v != "auto"}}
    ev = dict(evaluation or {})
    if chosen["thumbnails"]:
        tok.setdefault("data", str(Path(data_dir) / "ffhq128"))
    small, drive = small_mode(), None
    if small:  # small mode's sizes win over every other, shared or per stage
        if kind != "ffhq" or dataset != "ffhq":  # nothing downloaded unless FFHQ was asked for by name
            kind = "synthetic"
            tok.update(DATASETS["synthetic"]["tokenizer"])
            gen.update(DATASETS["synthetic"]["generator"])
        common.update(SMALL["common"])
        tok.update(SMALL["common"], **SMALL["tokenizer"])
        gen.update(SMALL["common"], **SMALL["generator"])
        ev.update(SMALL["eval"])
        out = os.environ.get(OUT_ENV) or SMALL_OUT
    if use_drive and in_colab():  # small mode too: a disconnect costs its few steps, nothing more
        drive = mount_drive() / drive_folder
        out = str(drive / out)
    elif use_drive:
        logging.getLogger(__name__).info("use_drive is for Colab; writing run folders to %s", out)
    if kind == "ffhq":  # one checkpoint a stage: the generator's training state is ~2.8 GB, and Drive's free 15 GB
        common.setdefault("keep_checkpoints", 1)  # holds the zip, both runs and the code cache (docs/colab.md)
    for stage, cls in ((tok, TokenizerTrainConfig), (gen, GeneratorTrainConfig)):
        _fit_schedule(stage, common, cls)
    if common.get("mixed_precision", "auto") == "auto":
        # By compute capability: bf16 on Ampere and newer, fp16 on a T4 (bf16 is only emulated there), fp32 on CPU.
        common["mixed_precision"] = choose_mixed_precision()
    tok_dir, gen_dir = Path(out) / TOKENIZER_DIR, Path(out) / "generator"
    tok_cfg = TokenizerTrainConfig(**{**common, **tok, "out": str(tok_dir)})
    gen_cfg = GeneratorTrainConfig(**{**common, "data": tok_cfg.data, **gen, "out": str(gen_dir),
                                      "tokenizer": str(tok_dir)})
    shared = {"seed": common.get("seed", 0), **ev}
    return NotebookRun(
        tokenizer=tok_cfg, generator=gen_cfg, small=small, dataset=kind, drive=drive,
        tokenizer_eval=TokenizerEvalConfig(checkpoint=str(tok_dir), data=tok_cfg.data, data_seed=shared["seed"],
                                           **{k: v for k, v in shared.items()
                                              if k not in ("seed", "attribute_prompts")}),
        generator_eval=GeneratorEvalConfig(checkpoint=str(gen_dir), data=gen_cfg.data, data_seed=shared["seed"],
                                           text_encoder_path=_local_folder(gen_cfg.text_encoder), **shared))


def _fit_schedule(stage: dict, common: dict, cls: type) -> None:
    """Warm-up and grid interval that fit the stage's steps where none was given: a short run still reaches its
    peak learning rate (warm-up a tenth of the run, at most 500 steps) and draws about 20 grids (at most every
    1,000 steps)."""
    given = {**common, **stage}
    steps = given.get("steps", cls.__dataclass_fields__["steps"].default)
    if "warmup_steps" not in given:
        stage["warmup_steps"] = max(1, min(500, steps // 10))
    if "sample_every" not in given:
        stage["sample_every"] = max(1, min(1000, steps // 20))


def _local_folder(name: str) -> str | None:
    return name if Path(name).expanduser().is_dir() else None


def fetch_data(run: NotebookRun, *, source: str | None = None) -> None:
    """Get what the run reads before training starts. FFHQ: the thumbnails onto local disk once, from `source`
    (a zip or folder, e.g. on Drive), else the zip kept on Drive by an earlier runtime, else the Hub mirror (then
    a copy is kept on Drive when it is mounted); and the captioned shards into the Hub cache (their size said
    first) unless the generator's code cache is made already. The synthetic faces: nothing."""
    if run.dataset != "ffhq":
        return
    kept = run.drive / FFHQ_MIRROR["filename"] if run.drive is not None else None
    if source is None and kept is not None and kept.is_file():
        source = str(kept)
    fetch_ffhq_thumbnails(run.tokenizer.data, source=source, keep_copy=run.drive if source is None else None)
    data = run.generator.data
    if data.startswith("hf:") and not (run.generator_dir / CACHE_DIR / MANIFEST_NAME).is_file():
        dataset_snapshot(data[3:])


def mount_drive() -> Path:
    """Mount Google Drive (Colab asks for permission once) and return MyDrive."""
    if not in_colab():
        raise PartiError("Google Drive can only be mounted from Colab; set use_drive=False")
    from google.colab import drive  # only on Colab

    drive.mount(DRIVE_MOUNT)
    return Path(DRIVE_MOUNT) / "MyDrive"


def show_logs(level: int = logging.INFO) -> None:
    """Print parti's log lines (device, "resumed from step N", warnings) in the cell that produced them, and
    word parti's messages for a notebook (cells and parameters, not command-line flags)."""
    set_audience("notebook")
    logger = logging.getLogger("parti")
    logger.setLevel(level)
    if not any(getattr(h, "_parti_notebook", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._parti_notebook = True  # one handler however often the setup cell runs
        logger.addHandler(handler)
    logger.propagate = False  # a root handler (some hosts install one) would print every line twice


def show_tensorboard(folder: str | Path) -> None:
    """TensorBoard inline in this notebook (Colab or Jupyter) on `folder`: a run folder, or the folder of both
    runs (OUT). What `%load_ext tensorboard` then `%tensorboard --logdir FOLDER` do; the runs write their
    curves there with report_to="tensorboard" (RUN/tensorboard/), and it refreshes as they train."""
    try:
        from IPython import get_ipython  # only inside a notebook
    except ImportError:
        get_ipython = None  # noqa: N806
    shell = get_ipython() if get_ipython is not None else None
    if shell is None:
        raise PartiError(f"show_tensorboard runs in a notebook; elsewhere run `tensorboard --logdir {folder}`")
    if importlib.util.find_spec("tensorboard") is None:
        raise PartiError("TensorBoard needs the tensorboard package: pip install tensorboard")
    if not any(Path(folder).rglob(f"{TENSORBOARD_DIR}/*")):
        logging.getLogger(__name__).warning("%s holds no TensorBoard logs yet: train with report_to=\"tensorboard\"",
                                            folder)
    shell.run_line_magic("load_ext", "tensorboard")
    shell.run_line_magic("tensorboard", f"--logdir {shlex.quote(str(folder))}")


def describe_environment() -> str:
    """Where this kernel runs: Colab or not, small mode or not, torch version, the device."""
    import torch


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
    """The first `n` readable training images of `spec`, each under its caption, as a PIL image. A Hub
    dataset not yet in the cache is previewed from its first parquet rows, read remotely: never downloaded
    whole for a look."""
    import torch


    if spec.startswith("hf:") and not _in_hub_cache(spec[3:]):
        rows = _first_rows(spec[3:], 4 * n)
        images = [to_tensor(image, image_size) for image, _ in rows[:n]]
        return sample_grid(torch.stack(images), [c or "(no caption)" for _, c in rows[:n]], images_per_prompt=1)
    source = open_source(spec, split="train", image_size=image_size, synthetic_length=synthetic_length, seed=seed)
    items = [item for item in (source[i] for i in range(min(len(source), 4 * n))) if item is not None][:n]
    if not items:
        raise PartiError(f"{spec!r} holds no readable images")
    captions = [item["caption"] or "(no caption)" for item in items]
    return sample_grid(torch.stack([item["image"] for item in items]), captions, images_per_prompt=1)


def _in_hub_cache(repo_id: str) -> bool:
    if Path(repo_id).expanduser().is_dir():
        return True  # hf:FOLDER, a local copy
    from huggingface_hub import scan_cache_dir

    try:
        return any(r.repo_id == repo_id and r.repo_type == "dataset" for r in scan_cache_dir().repos)
    except Exception:  # no cache folder yet, or one huggingface_hub cannot read
        return False


def _first_rows(repo_id: str, n: int) -> list:
    """(PIL image, caption) of the first `n` rows of a Hub dataset's first parquet shard, read through
    HfFileSystem: the footer and one row group, not the shard."""
    import io

    import pyarrow.parquet as pq
    from huggingface_hub import HfFileSystem
    from PIL import Image


    fs = HfFileSystem()
    try:
        shards = sorted(fs.glob(f"datasets/{repo_id}/**/*.parquet"))
        if not shards:
            raise PartiError(f"Hub dataset {repo_id} has no parquet shards to preview")
        with fs.open(shards[0], "rb") as f:
            table = pq.ParquetFile(f).read_row_group(0)
    except PartiError:
        raise
    except Exception as e:  # offline, not found, private: one line either way
        raise PartiError(f"could not preview Hub dataset {repo_id} ({str(e).splitlines()[0][:160]}); go online "
                         f"or give a local copy") from None
    columns = table.column_names
    texts = [c for c in columns if str(table.schema.field(c).type) in ("string", "large_string")]
    image_col, caption_col = find_columns(columns, images=[], texts=texts, image_column=None, caption_column=None,
                                          spec=repo_id)
    rows = table.slice(0, n).to_pylist()
    return [(Image.open(io.BytesIO(r[image_col]["bytes"])), r.get(caption_col) if caption_col else None) for r in rows]


class CellStopped(PartiError):
    """A training cell that stopped before its last step: raised so that Run all stops there too (the cells
    below would otherwise run on an unfinished model). IPython shows the message alone, no traceback."""

    def _render_traceback_(self) -> list[str]:
        return [f"parti: {self}"]


def train(train_fn: Callable[[Any], Path], config: Any) -> Path:
    """Run a training cell: `train_fn(config)` resumed from the run's newest checkpoint (a new folder starts
    afresh). When it returns before its last step (the stop button saved a checkpoint and stopped), raise
    CellStopped, which stops Run all: a stage never starts on an unfinished one."""
    out = train_fn(replace(config, resume=True))
    progress = run_progress(out)
    if progress is not None and not progress["finished"]:
        raise CellStopped(f"{Path(out).name} stopped at step {progress['step']} of {progress['steps']} and saved "
                          f"a checkpoint; run this cell again to continue (the cells below did not run)")
    return out


@contextmanager
def demo_guard() -> Iterator[None]:
    """Around the web-demo cell, the notebook's last: a demo that cannot start (no gradio, an old or new
    gradio, no network) logs why in one line, so Run all still ends cleanly with every result above it."""
    try:
        yield
    except Exception as e:  # whatever gradio raises: the results above are complete without the demo
        logging.getLogger(__name__).warning("the web demo could not start (%s: %s); the results above are "
                                            "complete", type(e).__name__, str(e).splitlines()[0] if str(e) else "")


def example_prompts(run: NotebookRun) -> tuple[str, ...]:
    """Prompts for the generate cell in the style of the run's captions."""
    return FFHQ_SAMPLE_PROMPTS[:2] if run.dataset == "ffhq" else SYNTHETIC_SAMPLE_PROMPTS[2:4]


def latest_grid(run_dir: str | Path):
    """The newest grid a training run drew (RUN/samples/step_*.png) as a PIL image."""
    from PIL import Image

    grids = sorted(Path(run_dir, SAMPLES_DIR).glob(GRID_GLOB))  # zero-padded steps: name order is step order
    if not grids:
        raise PartiError(f"{run_dir} has no sample grids yet; they appear every sample_every steps")
    with Image.open(grids[-1]) as image:
        return image.copy()  # loaded, and the file closed
