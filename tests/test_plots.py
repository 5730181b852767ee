"""Grids put pixels where the docs say; charts and run plots write PNGs and tolerate interrupted logs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from parti.errors import PartiError
from parti.metrics import usage_from_counts
from parti.plots import (codebook_usage_histogram, image_grid, loss_curves, plot_run,
                         reconstruction_grid, sample_grid, to_pil, to_uint8)

H, W, PAD = 8, 12, 2


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def tile_at(canvas: np.ndarray, y: int, x: int) -> np.ndarray:
    return canvas[y:y + H, x:x + W]


def test_to_uint8_range_and_layout():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    out = to_uint8(x)
    assert out.shape == (1, 1, 4, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 255]  # clipped above 1
    assert to_pil(images(1, 0)[0]).size == (W, H)
    with pytest.raises(PartiError, match=r"\(B,3,H,W\)"):
        to_uint8(torch.zeros(3, H, W))


def test_image_grid_size_and_placement():
    x = images(5, 0)
    grid = image_grid(x, nrow=3, padding=PAD)
    assert grid.size == (3 * (W + PAD) + PAD, 2 * (H + PAD) + PAD)  # (width, height)
    canvas = np.asarray(grid)
    expected = to_uint8(x)
    for i in range(5):
        y, x0 = PAD + (i // 3) * (H + PAD), PAD + (i % 3) * (W + PAD)
        assert np.array_equal(tile_at(canvas, y, x0), expected[i])
    assert image_grid(x[:2], nrow=8, padding=0).size == (2 * W, H)


def test_reconstruction_grid_inputs_above_reconstructions(tmp_path):
    inputs, recons = images(5, 1), images(5, 2)
    path = tmp_path / "sub" / "recon.png"
    image = reconstruction_grid(inputs, recons, path=path, nrow=4)
    canvas = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(canvas, np.asarray(image))
    assert canvas.shape == (4 * (H + PAD) + PAD, 4 * (W + PAD) + PAD, 3)  # 2 input rows + 2 reconstruction rows
    top, bottom = to_uint8(inputs), to_uint8(recons)
    for i in range(5):
        x0 = PAD + (i % 4) * (W + PAD)
        assert np.array_equal(tile_at(canvas, PAD + (i // 4) * (H + PAD), x0), top[i])
        assert np.array_equal(tile_at(canvas, PAD + (2 + i // 4) * (H + PAD), x0), bottom[i])
    titled = np.asarray(reconstruction_grid(inputs, recons, title="step 200", nrow=4))
    band = titled.shape[0] - canvas.shape[0]
    assert band > 0 and np.array_equal(titled[band:], canvas)
    with pytest.raises(PartiError, match="same shape"):
        reconstruction_grid(inputs, recons[:4])


def test_sample_grid_one_row_per_prompt(tmp_path):
    prompts = ["a smiling woman with curly red hair and freckles, photographed outdoors in soft light " * 2,
               "an old man", "a child wearing glasses"]
    n = 2
    x = images(len(prompts) * n, 3)
    path = tmp_path / "samples.png"
    sample_grid(x, prompts, images_per_prompt=n, path=path, min_width=64)
    canvas = np.asarray(Image.open(path).convert("RGB"))
    row_h = (canvas.shape[0]) // len(prompts)
    band = row_h - (H + 2 * PAD)
    assert canvas.shape[0] == len(prompts) * row_h and band > 0  # equal rows: a text band + one strip
    assert canvas.shape[1] == max(n * (W + PAD) + PAD, 64)
    expected = to_uint8(x)
    for p in range(len(prompts)):
        for j in range(n):
            y, x0 = p * row_h + band + PAD, PAD + j * (W + PAD)
            assert np.array_equal(tile_at(canvas, y, x0), expected[p * n + j])
        assert (canvas[p * row_h:p * row_h + band] < 128).any()  # the prompt is drawn in the band
    with pytest.raises(PartiError, match="expected 6"):
        sample_grid(x[:5], prompts, images_per_prompt=n)


def write_metrics(path, *, truncated: bool) -> None:
    lines = []
    for step in range(0, 100, 10):
        lines.append(json.dumps({"step": step, "loss": 2.0 - step / 100, "lr": 1e-3, "time": 1.0 + step,
                                 "note": "warmup"}))
        if step % 50 == 0:
            lines.append(json.dumps({"step": step, "split": "val", "loss": 2.1 - step / 100}))
    text = "\n".join(lines) + "\n"
    path.write_text(text + ('{"step": 100, "loss": 0.9' if truncated else ""))


def test_loss_curves_from_truncated_jsonl(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    write_metrics(metrics, truncated=True)
    out = tmp_path / "curves.png"
    fig = loss_curves(metrics, path=out, smooth=3)
    assert Image.open(out).size[0] > 100
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["loss", "lr"]  # time, step, split and the string "note" are not curves
    loss_ax = fig.axes[0]
    labels = [line.get_label() for line in loss_ax.get_lines() if not line.get_label().startswith("_")]
    assert labels == ["train", "val"]  # both splits on the same axes
    assert fig._repr_png_().startswith(b"\x89PNG")  # shows inline in Jupyter
    assert [ax.get_title() for ax in loss_curves(metrics, keys=["lr"]).axes] == ["lr"]
    with pytest.raises(PartiError, match="no numeric values"):
        loss_curves(metrics, keys=["accuracy"])


def test_codebook_histogram(tmp_path):
    counts = torch.tensor([10, 0, 5, 5, 0, 0, 1, 0])
    stats = usage_from_counts(counts)
    assert stats["used"] == 4 and stats["share"] == 0.5 and 1 < stats["perplexity"] < 4
    assert usage_from_counts(np.ones(16))["perplexity"] == pytest.approx(16)
    path = tmp_path / "usage.png"
    fig = codebook_usage_histogram(counts, path=path)
    assert path.stat().st_size > 0 and "4/8 codes used (50.0%)" in fig.axes[0].get_title()
    codebook_usage_histogram(np.zeros(8))  # nothing used yet: still draws
    with pytest.raises(PartiError, match="non-negative"):
        codebook_usage_histogram(np.array([1.0, -1.0]))


def test_plot_run(tmp_path):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    write_metrics(run / "metrics.jsonl", truncated=True)
    for step in (100, 900, 1000):  # newest by step number, not by name order or mtime
        image_grid(images(2, step), nrow=2).save(run / "samples" / f"step_{step:06d}.png")
    image_grid(images(2, 7), nrow=2).save(run / "samples" / "recon_step_000300.png")
    written = plot_run(run)
    assert sorted(p.name for p in written) == ["latest_recon.png", "latest_samples.png", "loss_curves.png"]
    assert all(p.parent == run / "plots" and p.stat().st_size > 0 for p in written)
    newest = (run / "samples" / "step_001000.png").read_bytes()
    assert (run / "plots" / "latest_samples.png").read_bytes() == newest
    other = plot_run(run, out_dir=tmp_path / "elsewhere")
    assert {p.parent for p in other} == {tmp_path / "elsewhere"}


def test_plot_run_on_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PartiError, match=r"not a run folder.*config\.json, model\.safetensors"):
        plot_run(tmp_path)
    with pytest.raises(PartiError, match="does not exist"):
        plot_run(tmp_path / "missing")


def test_plot_run_draws_a_tokenizer_runs_codebook_usage(tmp_path):
    from parti.tokenizer import build_tokenizer, save_tokenizer

    save_tokenizer(build_tokenizer("tiny"), tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "total": 0.5}\n')
    written = plot_run(tmp_path)
    assert tmp_path / "plots" / "codebook_usage.png" in written
    assert (tmp_path / "plots" / "codebook_usage.png").stat().st_size > 0
