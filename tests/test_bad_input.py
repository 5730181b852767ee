"""Bad input, one test per row of the issue's table: each is a one-line error or a counted skip, never a
traceback. Rows already covered elsewhere are named here with where (see each docstring).

data     odd and broken image files flow through training, skipped and counted; captions that are missing,
         empty, very long, non-ASCII or emoji; an empty dataset
models   a folder of the other stage or another preset; a missing or truncated file; another tokenizer
sampling invalid parameters; no prompts; a prompt longer than the text encoder allows
training NaN/inf losses are skipped and counted, then stop with a clear message
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from parti.cli import main
from parti.errors import PartiError

TINY_TOKENIZER = dict(preset="tiny", batch_size=4, synthetic_length=16, val_images=2, perceptual_weight=0.0,
                      adversarial_weight=0.0, sample_every=100, save_every=100, log_every=1, cpu=True,
                      progress=False)
TINY_GENERATOR = dict(preset="tiny", text_preset="tiny", batch_size=4, val_batches=1, sample_every=100,
                      save_every=100, log_every=1, cpu=True, progress=False)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err, err
    last = err[-1]  # warnings logged before the error may precede it; the error itself is one line
    assert last.startswith("parti: error: ") and not any("Traceback" in e for e in err), err
    for needle in needles:
        assert needle in last, last
    return last


def rows(run: Path) -> list[dict]:
    """The training rows of a run's metrics (validation rows left out)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "split" not in r]


@pytest.fixture(scope="module")
def models(tiny_folders):
    return tiny_folders


# ---- data --------------------------------------------------------------------------------------------

def odd_folder(root: Path, captions: dict[str, str] | None = None) -> Path:
    """14 good images in every mode and size (some below the 32 px target), a truncated PNG, a zero-byte
    file and files that are not images. Bad files sort first, so they land in the train split (16 images,
    4 batches of 4: one epoch meets every file), the last one is val."""
    root.mkdir(parents=True)
    good = Image.new("RGB", (48, 40), (200, 30, 30))
    good.save(root / "tmp.png")
    data = (root / "tmp.png").read_bytes()
    (root / "tmp.png").unlink()
    (root / "00_truncated.png").write_bytes(data[: len(data) // 2])
    (root / "01_empty.jpg").write_bytes(b"")
    (root / "02_notes.txt.png").write_bytes(b"this is text, not a picture")
    (root / "README.md").write_text("not an image")
    (root / "LICENSE").write_text("free")
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    images = {"10_rgb.png": good, "11_gray.png": Image.new("L", (40, 40), 90),
              "12_rgba.png": Image.new("RGBA", (36, 36), (0, 90, 200, 128)), "13_palette.png": palette,
              "14_16bit.png": Image.fromarray(np.full((40, 40), 40000, np.uint16)),
              "15_small.png": Image.new("RGB", (8, 8), (10, 200, 10)),
              "16_wide.jpg": Image.new("RGB", (90, 20), "blue"),
              "17_cmyk.jpg": Image.new("CMYK", (40, 40), (0, 255, 255, 0)),
              "18_tiny.bmp": Image.new("RGB", (3, 5), "white"), "19_gif.gif": Image.new("P", (30, 30), 3)}
    for i, (name, img) in enumerate(images.items()):
        img.save(root / name)
        if captions is not None:
            (root / name).with_suffix(".txt").write_text(captions.get(name, f"face {i}"), encoding="utf-8")
    for i in range(4):
        good.save(root / f"2{i}_more.png")
    return root


def test_odd_and_broken_images_flow_through_training_and_are_counted(tmp_path):
    from parti.data import UnreadableImageWarning
    from parti.train_tokenizer import TokenizerTrainConfig, train_tokenizer

    folder = odd_folder(tmp_path / "faces")  # 17 image-named files: 16 train (3 unreadable), 1 val
    with pytest.warns(UnreadableImageWarning):
        run = train_tokenizer(TokenizerTrainConfig(**{**TINY_TOKENIZER, "synthetic_length": 0}, data=str(folder),
                                                   steps=4, out=str(tmp_path / "run")))
    last = rows(run)[-1]
    assert last["skipped_images"] == 3 and np.isfinite(last["total"])  # a whole epoch: every bad file met once


def test_empty_and_unreadable_datasets_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    code = main(["train-tokenizer", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "a"), "--cpu"])
    one_line_error(capsys, code, "no images")
    (tmp_path / "broken").mkdir()
    for i in range(4):
        (tmp_path / "broken" / f"{i}.png").write_bytes(b"")
    code = main(["train-tokenizer", "--data", str(tmp_path / "broken"), "--out", str(tmp_path / "b"), "--cpu"])
    one_line_error(capsys, code, "no readable images")
    code = main(["train-tokenizer", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "c"), "--cpu"])
    one_line_error(capsys, code, "no such file or folder")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").rglob("*.safetensors"))


def test_missing_caption_column_is_a_one_line_error(tmp_path, capsys):
    """Table sources: tests/test_data.py::test_table_column_errors checks every column case; here the CLI."""
    import datasets

    table = datasets.Dataset.from_dict({"image": [Image.new("RGB", (12, 12), (i, 0, 0)) for i in range(20)],
                                        "text": [f"face {i}" for i in range(20)]},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "text": datasets.Value("string")}))
    table.to_parquet(str(tmp_path / "t.parquet"))
    code = main(["train-tokenizer", "--data", str(tmp_path / "t.parquet"), "--caption-column", "caption",
                 "--out", str(tmp_path / "a"), "--cpu"])
    one_line_error(capsys, code, "column 'caption' not in dataset")


def test_no_captions_at_all(models, tmp_path, capsys):
    """Images without captions: a sentencepiece vocabulary cannot be learned (one line, says what to do);
    the byte tokenizer needs no vocabulary and trains on the empty captions (null-like conditions)."""
    folder = odd_folder(tmp_path / "faces")
    common = ["train", "--data", str(folder), "--tokenizer", str(models / "tok"), "--preset", "tiny",
              "--text-preset", "tiny", "--steps", "2", "--batch-size", "4", "--val-batches", "1", "--cpu",
              "--no-progress", "--sample-every", "100", "--log-every", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main([*common, "--out", str(tmp_path / "spm")])
        one_line_error(capsys, code, "needs non-empty captions")
        assert main([*common, "--out", str(tmp_path / "bytes"), "--text-tokenizer", "bytes"]) == 0
    assert len(rows(tmp_path / "bytes")) >= 2


def test_empty_long_non_ascii_and_emoji_captions_train(models, tmp_path):
    from parti.text import TruncationWarning
    from parti.train_generator import GeneratorTrainConfig, train_generator

    captions = {"10_rgb.png": "", "11_gray.png": "a very long caption, " * 200,
                "12_rgba.png": "visage souriant, cheveux châtains, fond bleu", "13_palette.png": "笑顔の人、赤い背景",
                "14_16bit.png": "🙂🔥 person 👩🏽‍🦰", "15_small.png": "   ",
                "16_wide.jpg": "Ünïcödé ñ ß Ω ∑ \u200b zero-width"}
    folder = odd_folder(tmp_path / "faces", captions)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = GeneratorTrainConfig(**TINY_GENERATOR, data=str(folder), tokenizer=str(models / "tok"), vocab_size=500,
                                   steps=4, out=str(tmp_path / "run"))
        run = train_generator(cfg)
    assert any(issubclass(w.category, TruncationWarning) for w in caught)  # the long caption was cut
    assert all(np.isfinite(r["loss"]) for r in rows(run) if "loss" in r)
    from parti.cache import CodeCache
    assert "🙂🔥 person 👩🏽‍🦰" in CodeCache(run / "cache", "train").captions  # stored exactly, emoji and all


# ---- models ------------------------------------------------------------------------------------------

def test_folder_of_the_other_stage(models, tmp_path, capsys):
    code = main(["sample", "--checkpoint", str(models / "tok"), "--prompt", "x", "--out", str(tmp_path / "a.png")])
    one_line_error(capsys, code, "holds a tokenizer checkpoint, not a generator")
    code = main(["train", "--tokenizer", str(models / "gen"), "--out", str(tmp_path / "g"), "--cpu", "--no-progress"])
    one_line_error(capsys, code, "holds a generator checkpoint, not a tokenizer")


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory):
    from parti.train_tokenizer import TokenizerTrainConfig, train_tokenizer

    out = tmp_path_factory.mktemp("tokrun") / "run"
    return train_tokenizer(TokenizerTrainConfig(**{**TINY_TOKENIZER, "save_every": 2}, steps=2, out=str(out)))


def test_resuming_with_another_preset_or_stage(tokenizer_run, models, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tokenizer_run, run)
    code = main(["train-tokenizer", "--out", str(run), "--resume", "--preset", "demo", "--steps", "4", "--cpu",
                 "--perceptual-weight", "0", "--adversarial-weight", "0", "--no-progress"])
    one_line_error(capsys, code, "was trained with another model", "--preset")
    code = main(["train", "--out", str(run), "--resume", "--tokenizer", str(models / "tok"), "--cpu", "--no-progress"])
    one_line_error(capsys, code, "holds a tokenizer run, not a generator run")
    assert json.loads((run / "run.json").read_text())["resumes"] == []  # refused before touching the run


def test_config_of_another_preset_than_the_weights(models, tmp_path):
    from parti.tokenizer import TOKENIZER_PRESETS, load_tokenizer

    tok = tmp_path / "tok"
    shutil.copytree(models / "tok", tok)
    config = json.loads((tok / "config.json").read_text())
    config["config"] = dataclasses.asdict(TOKENIZER_PRESETS["demo"])
    (tok / "config.json").write_text(json.dumps(config))
    with pytest.raises(PartiError, match="does not match its config.json"):
        load_tokenizer(tok)


@pytest.mark.parametrize("damage", ["missing weights", "truncated weights", "missing config", "truncated config",
                                    "missing tokenizer", "missing text encoder"])
def test_missing_or_truncated_files(models, tmp_path, capsys, damage):
    gen = tmp_path / "gen"
    shutil.copytree(models / "gen", gen)
    target = {"missing weights": gen / "model.safetensors", "truncated weights": gen / "model.safetensors",
              "missing config": gen / "config.json", "truncated config": gen / "config.json",
              "missing tokenizer": gen / "tokenizer", "missing text encoder": gen / "text_encoder"}[damage]
    if damage.startswith("truncated"):
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    code = main(["sample", "--checkpoint", str(gen), "--prompt", "x", "--out", str(tmp_path / "a.png")])
    needle = {"missing weights": "not found", "truncated weights": "corrupt or truncated",
              "missing config": "no config.json", "truncated config": "not valid JSON",
              "missing tokenizer": "does not exist", "missing text encoder": "does not exist"}[damage]
    one_line_error(capsys, code, needle)


def test_another_tokenizer_than_the_one_trained_with(models, tmp_path, capsys):
    """load_pipeline / check_tokenizer: tests/test_pipeline.py::test_generator_refuses_another_tokenizer.
    Here: a generator folder whose tokenizer/ was swapped, and resuming a run with another --tokenizer."""
    from parti.cache import encode_dataset
    from parti.tokenizer import build_tokenizer, save_tokenizer
    from parti.train_generator import GeneratorTrainConfig, train_generator

    gen = tmp_path / "gen"
    shutil.copytree(models / "gen", gen)
    torch.manual_seed(1)
    save_tokenizer(build_tokenizer("tiny"), gen / "tokenizer")
    code = main(["sample", "--checkpoint", str(gen), "--prompt", "x", "--out", str(tmp_path / "a.png")])
    one_line_error(capsys, code, "not the tokenizer the generator was trained with")

    encode_dataset(data="synthetic", tokenizer=models / "tok", out=tmp_path / "cache", synthetic_length=8,
                   max_items=8, device="cpu", progress=False)
    cfg = GeneratorTrainConfig(**{**TINY_GENERATOR, "save_every": 1}, data=str(tmp_path / "cache"), steps=1,
                               tokenizer=str(models / "tok"), text_tokenizer="bytes", out=str(tmp_path / "run"))
    train_generator(cfg)
    with pytest.raises(PartiError, match="resume with the tokenizer the run started with"):
        train_generator(dataclasses.replace(cfg, tokenizer=str(gen / "tokenizer"), steps=2, resume=True))


# ---- sampling ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(models):
    from parti.pipeline import load_pipeline

    return load_pipeline(models / "gen", device="cpu")


@pytest.mark.parametrize("kwargs, message", [
    ({"guidance_scale": -1.0}, "guidance_scale"), ({"temperature": -0.5}, "temperature"), ({"top_k": 0}, "top_k"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"num_images_per_prompt": 0}, "num_images_per_prompt")])
def test_invalid_sampling_parameters(pipe, kwargs, message):
    with pytest.raises(PartiError, match=message):
        pipe(["a face"], **kwargs)


def test_no_prompts_and_non_string_prompts(pipe, models, tmp_path, capsys):
    with pytest.raises(PartiError, match="no prompts"):
        pipe([])
    with pytest.raises(PartiError, match="strings"):
        pipe(["a face", 3])
    code = main(["sample", "--checkpoint", str(models / "gen"), "--out", str(tmp_path / "a.png")])
    one_line_error(capsys, code, "no prompts")
    code = main(["sample", "--checkpoint", str(models / "gen"), "--prompt", "x", "--num-images", "0",
                 "--out", str(tmp_path / "a.png")])
    one_line_error(capsys, code, "num_images_per_prompt")


def test_prompt_longer_than_the_text_encoder_is_truncated_with_a_warning(pipe):
    from parti.text import TruncationWarning

    long = "a person with long red hair on a blue background " * 10  # > 16 tokens of this encoder
    with pytest.warns(TruncationWarning, match="1 of 2 prompts were longer than 16 tokens"):
        result = pipe([long, "red hair"], seed=0, temperature=0)
    assert result.images.shape == (2, 3, 32, 32) and torch.isfinite(result.images).all()


# ---- training: NaN / inf -----------------------------------------------------------------------------

def test_nonfinite_losses_are_skipped_and_counted(tmp_path, monkeypatch):
    from parti.losses import TokenizerLoss
    from parti.train_tokenizer import TokenizerTrainConfig, train_tokenizer

    real = TokenizerLoss.generator_loss

    def sometimes_nan(self, real_images, fake, *, commit_loss, step, last_layer):
        loss, logs = real(self, real_images, fake, commit_loss=commit_loss, step=step, last_layer=last_layer)
        return (loss * float("nan") if step in (1, 2) else loss * float("inf") if step == 4 else loss), logs

    monkeypatch.setattr(TokenizerLoss, "generator_loss", sometimes_nan)
    run = train_tokenizer(TokenizerTrainConfig(**{**TINY_TOKENIZER, "save_every": 6}, steps=6, out=str(tmp_path / "r")))
    assert [r["nonfinite_steps"] for r in rows(run) if "nonfinite_steps" in r] == [0, 1, 2, 2, 3, 3]
    from parti.tokenizer import load_tokenizer
    assert all(torch.isfinite(v).all() for v in load_tokenizer(run).state_dict().values())  # nothing poisoned


def test_a_run_of_nonfinite_losses_stops_with_a_clear_message(models, tmp_path, monkeypatch, capsys):
    from parti.cache import encode_dataset
    from parti.train_generator import Objective

    encode_dataset(data="synthetic", tokenizer=models / "tok", out=tmp_path / "cache", synthetic_length=8,
                   max_items=8, device="cpu", progress=False)
    real = Objective.forward
    monkeypatch.setattr(Objective, "forward", lambda self, *a: real(self, *a) * float("nan"))
    code = main(["train", "--data", str(tmp_path / "cache"), "--tokenizer", str(models / "tok"), "--preset", "tiny",
                 "--text-preset", "tiny", "--text-tokenizer", "bytes", "--steps", "30", "--batch-size", "4",
                 "--cpu", "--no-progress", "--out", str(tmp_path / "run"), "--sample-every", "100"])
    one_line_error(capsys, code, "NaN/inf for 20 steps in a row", "lower --lr")
