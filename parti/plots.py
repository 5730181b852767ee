"""Pictures a researcher looks at: image grids, loss curves, codebook usage; PNG files and inline figures.

Image grids (`image_grid`, `reconstruction_grid`, `sample_grid`) are PIL images built with numpy: pixels are
exact (a 64x64 face shows as 64x64 pixels, never resampled), they are fast enough to call every few
hundred steps, and Jupyter/Colab display a returned PIL image inline. Charts (`loss_curves`,
`codebook_usage_histogram`) are matplotlib Figures made without pyplot: no global backend is selected or
switched (headless training and the notebook's inline backend both keep working), nothing piles up in
pyplot's figure list, and each returned figure shows inline through its own `_repr_png_`.
Every function that takes `path=` also writes a PNG there, atomically (write to a temporary file, rename),
so `plot_run` reading a run folder while training writes to it never sees half a file.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from parti.checkpoint import CONFIG_NAME, MAX_GRID_BYTES, METRICS_NAME, SAMPLES_DIR, WEIGHTS_NAME, read_tensors
from parti.errors import PartiError
from parti.files import atomic_write, not_plain_file, read_json
from parti.metrics import usage_from_counts
from parti.runs import check_output, read_metrics, save_image
from parti.settings import check_settings, setting

log = logging.getLogger(__name__)

FILL = 255  # white padding between tiles
FONT_SIZE = 14
NON_METRIC_KEYS = {"step", "time", "split", "epoch"}


# ---------------------------------------------------------------------------------------------------------------
# Tensors -> pixels


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) float in [-1,1] -> (B,H,W,3) uint8; values outside [-1,1] are clipped."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise PartiError(f"images must be a (B,3,H,W) tensor in [-1,1], got {shape}")
    x = images.detach().to("cpu", torch.float32).clamp(-1, 1)
    x = torch.round((x + 1) * 127.5).to(torch.uint8)  # -1 -> 0, 1 -> 255
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3,H,W) float in [-1,1] -> RGB PIL image."""
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        raise PartiError(f"to_pil takes one (3,H,W) image; for a batch use image_grid, got {getattr(image, 'shape', image)}")
    return Image.fromarray(to_uint8(image[None])[0])


def _tile(tiles: np.ndarray, *, ncol: int, padding: int) -> np.ndarray:
    """(N,H,W,3) uint8 -> one (rows*(H+p)+p, ncol*(W+p)+p, 3) canvas, row-major; missing tiles stay FILL.

    Tile i sits at y = p + (i // ncol) * (H + p), x = p + (i % ncol) * (W + p).
    """
    n, h, w, _ = tiles.shape
    rows = max(1, math.ceil(n / ncol))
    canvas = np.full((rows * (h + padding) + padding, ncol * (w + padding) + padding, 3), FILL, np.uint8)
    for i in range(n):
        y, x = padding + (i // ncol) * (h + padding), padding + (i % ncol) * (w + padding)
        canvas[y:y + h, x:x + w] = tiles[i]
    return canvas


def image_grid(images: torch.Tensor, *, nrow: int, padding: int = 2) -> Image.Image:
    """(N,3,H,W) in [-1,1] -> PIL grid with `nrow` images per row (torchvision's make_grid meaning).

    Size: width = c*(W+padding)+padding with c = min(nrow, N); height = r*(H+padding)+padding, r = ceil(N/c).
    """
    if nrow < 1 or padding < 0:
        raise PartiError(f"image_grid needs nrow >= 1 and padding >= 0, got nrow={nrow}, padding={padding}")
    tiles = to_uint8(images)
    return Image.fromarray(_tile(tiles, ncol=max(1, min(nrow, len(tiles))), padding=padding))


# ---------------------------------------------------------------------------------------------------------------
# Text bands (titles, prompts) drawn with PIL


@functools.cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)  # Pillow's bundled font; needs FreeType
    except (TypeError, ValueError, OSError):
        return ImageFont.load_default()  # bitmap fallback


def _wrap(text: str, width_px: int, *, max_lines: int) -> list[str]:
    """Greedy word wrap to `width_px` pixels; overlong words are split; extra lines end in an ellipsis."""
    font = _font()
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width_px:
                line = candidate
                continue
            if line:
                lines.append(line)
            while len(word) > 1 and font.getlength(word) > width_px:  # a word wider than the band: split it
                cut = len(word) - 1
                while cut > 1 and font.getlength(word[:cut]) > width_px:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "…") > width_px:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last + "…"]
    return lines


def _line_height() -> int:
    left, top, right, bottom = _font().getbbox("Ag|")
    return bottom + 4


def _text_band(lines: list[str], width: int, *, n_lines: int | None = None) -> np.ndarray:
    """A (h, width, 3) white band holding `lines` of black text; `n_lines` fixes h so bands line up.

    Text sits at the bottom of the band, next to the images it describes, not the row above.
    """
    line_h = _line_height()
    height = line_h * (n_lines or len(lines)) + 6
    top = height - 2 - line_h * len(lines)
    band = Image.new("RGB", (width, height), (FILL,) * 3)
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((4, top + i * line_h), line, fill=(0, 0, 0), font=_font())
    return np.asarray(band)


def _with_title(canvas: np.ndarray, title: str | None) -> np.ndarray:
    if not title:
        return canvas
    lines = _wrap(title, canvas.shape[1] - 8, max_lines=3)
    return np.concatenate([_text_band(lines, canvas.shape[1]), canvas])


def _save_pil(image: Image.Image, path: str | Path | None) -> None:
    if path is not None:
        save_image(image, path)  # the suffix's format, atomically; never over a model's files


# ---------------------------------------------------------------------------------------------------------------
# Image grids


def reconstruction_grid(inputs: torch.Tensor, reconstructions: torch.Tensor, *, path: str | Path | None = None,
                        title: str | None = None, nrow: int = 8, padding: int = 2) -> Image.Image:
    """Inputs in the top row(s), reconstructions below in matching columns; returns (and saves) a PIL image.

    With B images and c = min(nrow, B) columns, input i is tile i and its reconstruction is tile
    ceil(B/c)*c + i of a c-column grid (layout of `image_grid`), under an optional title band.
    """
    if inputs.shape != reconstructions.shape:
        raise PartiError(f"inputs {tuple(inputs.shape)} and reconstructions {tuple(reconstructions.shape)} "
                         f"must have the same shape")
    top, bottom = to_uint8(inputs), to_uint8(reconstructions)
    b, h, w, _ = top.shape
    ncol = max(1, min(nrow, b))
    rows = math.ceil(b / ncol)
    blank = np.full((rows * ncol - b, h, w, 3), FILL, np.uint8)  # pad the input block to whole rows
    canvas = _tile(np.concatenate([top, blank, bottom]), ncol=ncol, padding=padding)
    image = Image.fromarray(_with_title(canvas, title))
    _save_pil(image, path)
    return image


def sample_grid(images: torch.Tensor, prompts: list[str], *, images_per_prompt: int,
                path: str | Path | None = None, padding: int = 2, min_width: int = 256) -> Image.Image:
    """One row per prompt, the prompt (wrapped) above its `images_per_prompt` images; returns a PIL image.

    `images` is (P*N,3,H,W), prompt-major: images[p*N:(p+1)*N] belong to prompts[p]. Every text band has
    the same height so rows line up; the canvas is at least `min_width` wide so prompts stay readable.
    Row p is a band of height t then an `image_grid`-style strip of height H + 2*padding, so image j of
    prompt p has its top-left corner at y = p*(t + H + 2*padding) + t + padding, x = padding + j*(W + padding).
    """
    if isinstance(prompts, str):
        raise PartiError("prompts must be a list of strings, got one string; wrap it in a list")
    n = images_per_prompt
    if n < 1 or len(images) != len(prompts) * n:
        raise PartiError(f"sample_grid got {len(images)} images for {len(prompts)} prompts x "
                         f"images_per_prompt={n}; expected {len(prompts) * n}")
    tiles = to_uint8(images)
    rows = [_tile(tiles[p * n:(p + 1) * n], ncol=n, padding=padding) for p in range(len(prompts))]
    width = max(rows[0].shape[1], min_width) if rows else min_width
    wrapped = [_wrap(prompt, width - 8, max_lines=3) for prompt in prompts]
    n_lines = max((len(lines) for lines in wrapped), default=1)
    parts = []
    for lines, row in zip(wrapped, rows):
        parts.append(_text_band(lines, width, n_lines=n_lines))
        padded = np.full((row.shape[0], width, 3), FILL, np.uint8)
        padded[:, :row.shape[1]] = row  # left-aligned under its prompt
        parts.append(padded)
    canvas = np.concatenate(parts) if parts else np.full((1, width, 3), FILL, np.uint8)
    image = Image.fromarray(canvas)
    _save_pil(image, path)
    return image


# ---------------------------------------------------------------------------------------------------------------
# Charts (matplotlib, no pyplot)


@functools.cache
def _figure_class() -> type:
    from matplotlib.figure import Figure

    class InlineFigure(Figure):
        """A Figure that shows itself in Jupyter/Colab whether or not the inline backend is active."""

        def _repr_png_(self) -> bytes:
            import io

            buffer = io.BytesIO()
            self.savefig(buffer, format="png", bbox_inches="tight")
            return buffer.getvalue()

    return InlineFigure


def _new_figure(*, width: float, height: float) -> Any:
    return _figure_class()(figsize=(width, height), layout="constrained")


def _save_figure(fig: Any, path: str | Path | None) -> None:
    if path is not None:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` points (fewer at the start), NaN-free input assumed."""
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(0, idx - window)
    return (cumsum[idx] - cumsum[start]) / (idx - start)


def loss_curves(metrics_path_or_records: str | Path | Iterable[dict[str, Any]], *, keys: list[str] | None = None,
                path: str | Path | None = None, smooth: int = 0, strict: bool = True) -> Any:
    """Each numeric key against step, one subplot per key, one line per split ("train" when unlabelled).

    Reads a metrics JSONL (a truncated last line is skipped) or takes its records. `keys` picks and orders
    the subplots (default: every numeric key but step/time/epoch); `smooth` > 1 overlays a trailing moving
    average of that many points on the faint raw curve. Returns a matplotlib Figure, saved to `path` if given.
    strict=False (the notebook's plotting cells): a key not logged yet, or an empty log (a run stopped before
    its first log step), is an empty panel that says so, never an error.
    """
    if isinstance(metrics_path_or_records, (str, Path)):
        source = str(metrics_path_or_records)
        records = read_metrics(metrics_path_or_records)
    else:
        source, records = "records", list(metrics_path_or_records)
    # series[key][split] = (steps, values), built in file order
    series: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for record in records:
        step = record.get("step")
        if not _is_number(step):
            continue
        split = str(record.get("split", "train"))
        for key, value in record.items():
            if key in NON_METRIC_KEYS or not _is_number(value):
                continue
            steps, values = series.setdefault(key, {}).setdefault(split, ([], []))
            steps.append(step)
            values.append(float(value))
    if keys is None:
        keys = list(series) or ([] if strict else ["metrics"])
    missing = [k for k in keys if k not in series]
    if missing and strict:
        raise PartiError(f"{source} has no numeric values for {missing}; it has {sorted(series)}")
    if not keys:
        raise PartiError(f"{source} holds no numeric metrics yet; plot again once the run has logged a step")

    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = _new_figure(width=4.2 * ncols, height=3.0 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        if key not in series:
            ax.set_title(key)
            ax.text(0.5, 0.5, "not logged yet", ha="center", va="center", transform=ax.transAxes, color="gray")
            continue
        for split, (steps, values) in sorted(series[key].items(), key=lambda kv: kv[0] != "train"):
            x, y = np.asarray(steps), np.asarray(values)
            if smooth > 1 and len(y) > 1:
                line, = ax.plot(x, y, alpha=0.25, linewidth=1)
                ax.plot(x, _moving_average(y, smooth), color=line.get_color(), linewidth=1.5, label=split)
            else:
                ax.plot(x, y, marker="." if len(y) < 30 else None, linewidth=1.5, label=split)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(series[key]) > 1:
            ax.legend(fontsize="small")
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    _save_figure(fig, path)
    return fig


def codebook_usage_histogram(counts: torch.Tensor | np.ndarray, *, path: str | Path | None = None) -> Any:
    """Usage counts sorted high to low (log y); the title gives the share of codes used and the perplexity.

    A healthy codebook shows a long flat curve; collapse shows a cliff after a few codes. Returns a Figure.
    """
    stats = usage_from_counts(counts)
    c = np.asarray(counts.detach().cpu() if isinstance(counts, torch.Tensor) else counts, dtype=np.float64)
    ordered = np.sort(c)[::-1]
    fig = _new_figure(width=7.0, height=3.2)
    ax = fig.subplots()
    ranks = np.arange(len(ordered))
    ax.fill_between(ranks, ordered, step="post", alpha=0.6, linewidth=0)
    ax.step(ranks, ordered, where="post", linewidth=1)
    if stats["used"]:
        ax.set_yscale("log")  # zeros (dead codes) fall off the log axis; the title counts them
    ax.set_xlim(0, len(ordered))
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("count")
    ax.set_title(f"{stats['used']}/{stats['size']} codes used ({stats['share']:.1%}), "
                 f"perplexity {stats['perplexity']:.1f}")
    ax.grid(alpha=0.3)
    _save_figure(fig, path)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# A whole run folder


def _latest_grids(samples: Path) -> dict[str, Path]:
    """{name: newest png} per grid series: 'recon_step_000200.png' is step 200 of series 'recon'.

    The last run of digits in the file stem is the step; the rest, trimmed of '_'/'-'/'step', names the
    series ('samples' when empty). A png without digits is its own series.
    """
    newest: dict[str, tuple[int, Path]] = {}
    for png in samples.glob("*.png"):
        match = re.fullmatch(r"(.*?)(\d+)", png.stem)
        prefix, step = (match.group(1), int(match.group(2))) if match else (png.stem, -1)
        name = re.sub(r"[_\-.]*step[_\-.]*$", "", prefix).strip("_-.") or "samples"
        if name not in newest or step > newest[name][0]:
            newest[name] = (step, png)
    return {name: png for name, (step, png) in sorted(newest.items())}


PLOTS_DIR = "plots"  # a run's pictures from `plot_run`: loss_curves.png, codebook_usage.png, latest_<series>.png


def _not_plots(folder: Path) -> str | None:
    """None when `folder` holds only pictures `plot_run` writes (and hidden files), else what else it holds."""
    other = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and not
                   re.fullmatch(r"loss_curves\.png|codebook_usage\.png|latest_.+\.png", p.name))
    return f"holds files `parti plot` did not write ({other[:5]})" if other else None


@dataclasses.dataclass
class PlotConfig:
    """`parti plot`: the arguments of `plot_run`."""

    run_dir: str | None = setting(None, "a training run folder", required=True, positional=True)
    out: str | None = setting(None, "folder for the pictures (default RUN_DIR/plots)")

    def __post_init__(self):
        check_settings(self)


def plot_run(run_dir: str | Path, *, out_dir: str | Path | None = None) -> list[Path]:
    """Draw a run folder's loss curves and copy its newest sample grids into `out_dir` (run_dir/plots).

    Writes loss_curves.png (when metrics exist) and latest_<series>.png for each grid series in
    run_dir/samples; returns the written paths.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PartiError(f"run folder {run_dir} does not exist" if not run_dir.exists()
                         else f"{run_dir} is a file; give a run folder (the --out of `parti train`)")
    if not (run_dir / METRICS_NAME).exists():
        held = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir())
        shown = ", ".join(held[:10]) + (f", ... ({len(held)} entries)" if len(held) > 10 else "")
        raise PartiError(f"{run_dir} is not a run folder (no {METRICS_NAME}; it holds: {shown or 'nothing'}); "
                         f"give the --out folder of `parti train`")
    # The output guard, before any drawing: a run's own plots/ (or a folder outside every run and model) that
    # holds nothing but earlier pictures of `plot_run`.
    out = check_output(Path(out_dir) if out_dir is not None else run_dir / PLOTS_DIR, what="--out", folder=True,
                       slots=(PLOTS_DIR,), replaces=_not_plots)
    written: list[Path] = []
    records = read_metrics(run_dir / METRICS_NAME)
    if any(_is_number(v) and k not in NON_METRIC_KEYS for r in records for k, v in r.items()):
        loss_curves(records, path=out / "loss_curves.png")
        written.append(out / "loss_curves.png")
    samples = run_dir / SAMPLES_DIR
    if samples.is_dir():
        for name, png in _latest_grids(samples).items():
            why = not_plain_file(png, limit=MAX_GRID_BYTES)  # a symlink there may point at a key, a token
            if why is not None:
                log.warning("not copying %s: %s", png, why)
                continue
            target = out / f"latest_{name}.png"
            atomic_write(target, lambda tmp, src=png: shutil.copyfile(src, tmp))
            written.append(target)
    usage = _codebook_usage(run_dir)
    if usage is not None:
        codebook_usage_histogram(usage, path=out / "codebook_usage.png")
        written.append(out / "codebook_usage.png")
    return written


def _codebook_usage(run_dir: Path):
    """A tokenizer run's per-code usage (the quantizer's EMA of codes per batch), or None."""
    config, weights = run_dir / CONFIG_NAME, run_dir / WEIGHTS_NAME
    if not (config.exists() and weights.exists()) or read_json(config).get("kind") != "tokenizer":
        return None
    return read_tensors(weights).get("quantizer.usage_ema")
