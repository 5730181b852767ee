"""The real job's path, offline: FFHQ thumbnails and the captioned FFHQ in the layouts the Hub holds them in,
a frozen T5 of t5-large's width, the notebook run end to end on them, and the generator reloaded in a new
process to draw a new prompt. Plus each trap of that path, reproduced and shown fixed.

Fixtures (built here, nothing downloaded): the Hub cache holds `nuwandaa/ffhq128` (thumbnails128x128.zip:
thumbnails128x128/00000/00000.png ... and LICENSE.txt) and `cr7Por/ffhq_controlnet_5_2_23`
(data/train-0000N-of-00002-<hash>.parquet with 512 px `image`, `conditioning_image` and `image_caption`);
the T5 is a random one-layer T5 with d_model 1024 saved as a local folder, with a locally trained vocabulary.
"""

import io
import json
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from hubcache import add_to_cache
from parti import notebook, synthetic
from parti.errors import PartiError
from t5folder import save_random_t5

NOTEBOOK = Path(__file__).resolve().parent.parent / "parti.ipynb"
CAPTIONED = "cr7Por/ffhq_controlnet_5_2_23"
CAPTIONS = ("a woman with long blonde hair smiling", "an old man with a gray beard wearing glasses",
            "a young boy with short brown hair", "a woman wearing a hat and red lipstick")


def _png(size: int, seed: int) -> bytes:
    buf = io.BytesIO()
    synthetic.render_face(synthetic.sample_attributes(random.Random(seed)), size).save(buf, format="PNG")
    return buf.getvalue()


def thumbnails_zip(n: int = 40, *, licence: bool = True) -> bytes:
    """NVlabs' layout inside one zip, as the mirror stores it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        if licence:
            z.writestr("thumbnails128x128/LICENSE.txt", "Creative Commons BY-NC-SA 4.0 (test copy)")
        for i in range(n):
            z.writestr(f"thumbnails128x128/{i // 1000 * 1000:05d}/{i:05d}.png", _png(128, i))
    return buf.getvalue()


def captioned_shards(rows: int = 40, shards: int = 2) -> dict[str, bytes]:
    """Parquet shards named as the Hub names them, with the features datasets writes into them."""
    import datasets

    files, per = {}, rows // shards
    for s in range(shards):
        idx = range(s * per, (s + 1) * per)
        table = datasets.Dataset.from_dict({
            "image": [{"bytes": _png(512, 1000 + i), "path": None} for i in idx],
            "conditioning_image": [{"bytes": _png(64, 2000 + i), "path": None} for i in idx],
            "image_caption": [CAPTIONS[i % len(CAPTIONS)] for i in idx]},
            features=datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(),
                                        "image_caption": datasets.Value("string")}))
        buf = io.BytesIO()
        table.to_parquet(buf)
        files[f"data/train-{s:05d}-of-{shards:05d}-3052833ccb69657{s}.parquet"] = buf.getvalue()
    files["README.md"] = b"---\ndataset_info:\n  features:\n  - name: image\n    dtype: image\n---\n"
    return files


def t5_folder(folder: Path) -> Path:
    """A random T5 encoder of t5-large's width (1024), one layer, and a SentencePiece vocabulary of its own."""
    words = " ".join(CAPTIONS).split() + ["man", "beard", "person", "face"]
    rng = random.Random(0)
    sentences = [" ".join(rng.choices(words, k=8)) for _ in range(300)]
    return save_random_t5(folder, sentences, vocab_size=60, d_model=1024, num_layers=1, d_kv=32)


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory):
    """A Hugging Face home whose Hub cache holds both FFHQ datasets, as snapshot_download leaves them."""
    home = tmp_path_factory.mktemp("hf")
    add_to_cache(home / "hub", "nuwandaa/ffhq128", {"thumbnails128x128.zip": thumbnails_zip(),
                                                     "LICENSE.txt": b"CC BY-NC-SA 4.0"}, repo_type="dataset")
    add_to_cache(home / "hub", CAPTIONED, captioned_shards(), repo_type="dataset")
    return home


@pytest.fixture
def offline_cache(hub_home, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(hub_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_home


# ---- the notebook's FFHQ path, end to end ------------------------------------------------------------


def _execute(nb, *, cwd: Path, out: Path, hub_home: Path, tmp_path: Path):
    from test_notebook import _kernel_manager

    from nbclient import NotebookClient

    env = {**os.environ, notebook.SMALL_ENV: "1", notebook.OUT_ENV: str(out), "HF_HOME": str(hub_home),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "2", "MPLBACKEND": "agg"}
    client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=300, resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)
    return nb


@pytest.fixture(scope="module")
def ffhq_run(hub_home, tmp_path_factory):
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    tmp = tmp_path_factory.mktemp("ffhq_notebook")
    t5 = t5_folder(tmp / "t5-large-width")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = (params.source.replace('DATASET = "auto"', 'DATASET = "ffhq"')
                     .replace('TEXT_ENCODER = "auto"', f'TEXT_ENCODER = "{t5}"'))
    assert f'TEXT_ENCODER = "{t5}"' in params.source and 'DATASET = "ffhq"' in params.source
    out = tmp / "runs"
    return _execute(nb, cwd=tmp, out=out, hub_home=hub_home, tmp_path=tmp), out, tmp, t5


def test_the_notebook_trains_on_ffhq_and_a_new_process_draws_a_new_prompt(ffhq_run, hub_home):
    nb, out, tmp, t5 = ffhq_run
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    thumbs = tmp / "data" / "ffhq128"
    assert (thumbs / "00000" / "00039.png").is_file() and (thumbs / "LICENSE.txt").is_file()
    tok_run = json.loads((out / "tokenizer" / "run.json").read_text())["config"]
    gen_run = json.loads((out / "generator" / "run.json").read_text())["config"]
    assert tok_run["data"] == "data/ffhq128" and gen_run["data"] == f"hf:{CAPTIONED}"
    assert gen_run["text_encoder"] == str(t5)
    manifest = json.loads((out / "generator" / "cache" / "manifest.json").read_text())
    assert manifest["text_dim"] == 1024 and manifest["splits"]["train"]["count"] == 38  # 40 rows, every 20th val
    env = {**os.environ, "HF_HOME": str(hub_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    new = tmp / "new_prompt.png"
    proc = subprocess.run([sys.executable, "-m", "parti.cli", "-q", "sample", "--checkpoint", str(out / "generator"),
                           "--prompt", "an old man with a beard", "--num-images", "2", "--out", str(new)],
                          capture_output=True, text=True, env=env, cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    with Image.open(new) as image:
        assert image.width >= 2 * 32 and image.height > 32


# ---- the traps of that path, each reproduced by its test's input and shown fixed ------------------------


def test_auto_picks_ffhq_only_on_a_gpu_with_the_hub_reachable(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv(notebook.SMALL_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    run = notebook.configure(mixed_precision="no")  # "auto" would ask the (mocked) GPU
    assert run.dataset == "ffhq" and run.generator.text_encoder == "t5-large"  # was: synthetic + trainable
    assert run.generator.data == f"hf:{CAPTIONED}" and run.tokenizer.data.endswith("ffhq128")
    # Drive's free 15 GB: one checkpoint a stage on the real job (the generator's state alone is ~2.8 GB) ...
    assert (run.tokenizer.keep_checkpoints, run.generator.keep_checkpoints) == (1, 1)
    kept = notebook.configure(mixed_precision="no", keep_checkpoints=3)  # ... unless the user asks for more
    assert (kept.tokenizer.keep_checkpoints, kept.generator.keep_checkpoints) == (3, 3)
    assert notebook.configure(dataset="synthetic", mixed_precision="no").generator.keep_checkpoints == 2
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert notebook.configure(mixed_precision="no").dataset == "synthetic"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert notebook.configure().dataset == "synthetic"


def test_fetch_extracts_the_mirror_zip_once_and_keeps_a_copy(offline_cache, tmp_path, caplog):
    from parti.fetch import fetch_ffhq_thumbnails

    kept = tmp_path / "drive"
    folder = fetch_ffhq_thumbnails(tmp_path / "ffhq128", keep_copy=kept, progress=False)
    assert len(list(folder.rglob("*.png"))) == 40 and (kept / "thumbnails128x128.zip").is_file()
    again = fetch_ffhq_thumbnails(tmp_path / "ffhq128", progress=False)  # finished: returned at once
    assert again == folder
    from_drive = fetch_ffhq_thumbnails(tmp_path / "from_drive", source=kept / "thumbnails128x128.zip", progress=False)
    assert sorted(p.name for p in from_drive.rglob("*.png")) == sorted(p.name for p in folder.rglob("*.png"))
    copied = fetch_ffhq_thumbnails(tmp_path / "copied", source=folder, progress=False)
    assert len(list(copied.rglob("*.png"))) == 40
    from parti.data import open_source

    assert len(open_source(str(folder), image_size=32)) == 36  # 40 thumbnails: the last 10% held out


def test_fetch_brings_the_mirrors_licence_when_the_zip_has_none(tmp_path, monkeypatch):
    """The mirror keeps LICENSE.txt beside the zip, not in it: the thumbnails folder and the Drive copy get it."""
    from huggingface_hub import constants

    from parti.fetch import fetch_ffhq_thumbnails

    add_to_cache(tmp_path / "hub", "nuwandaa/ffhq128", {"thumbnails128x128.zip": thumbnails_zip(licence=False),
                                                        "LICENSE.txt": b"FFHQ: CC BY-NC-SA 4.0"}, repo_type="dataset")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder = fetch_ffhq_thumbnails(tmp_path / "ffhq128", keep_copy=tmp_path / "drive", progress=False)
    assert (folder / "LICENSE.txt").read_bytes() == b"FFHQ: CC BY-NC-SA 4.0"
    assert (tmp_path / "drive" / "LICENSE.txt").read_bytes() == b"FFHQ: CC BY-NC-SA 4.0"
    again = fetch_ffhq_thumbnails(tmp_path / "next_runtime", source=tmp_path / "drive" / "thumbnails128x128.zip",
                                  progress=False)  # a new runtime: from the Drive copy, licence and all
    assert (again / "LICENSE.txt").read_bytes() == b"FFHQ: CC BY-NC-SA 4.0"


def test_fetch_says_when_the_zip_comes_from_the_cache(offline_cache, tmp_path, caplog):
    """The cached zip is not announced as a 2.1 GB download (a new runtime with the Hub cache kept)."""
    import logging

    from parti.fetch import fetch_ffhq_thumbnails

    with caplog.at_level(logging.INFO, logger="parti.fetch"):
        fetch_ffhq_thumbnails(tmp_path / "ffhq128", progress=False)
    assert "from the Hub cache (no download)" in caplog.text and "to download" not in caplog.text


def test_fetch_refuses_what_it_cannot_do(offline_cache, tmp_path, monkeypatch):
    from parti import fetch

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my files")
    with pytest.raises(PartiError, match="not a finished thumbnails folder"):
        fetch.fetch_ffhq_thumbnails(tmp_path / "mine", progress=False)
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(PartiError, match="not a readable zip"):
        fetch.fetch_ffhq_thumbnails(tmp_path / "x", source=bad, progress=False)
    monkeypatch.setattr(fetch.shutil, "disk_usage", lambda p: type("U", (), {"free": 10})())
    with pytest.raises(PartiError, match="needs .* GB"):
        fetch.fetch_ffhq_thumbnails(tmp_path / "y", progress=False)
    assert not (tmp_path / "y").exists()


def test_a_local_copy_in_the_hub_layout_finds_its_columns(offline_cache, tmp_path):
    """Trap: a Drive copy of the captioned FFHQ fell back to a caption column named `text` and failed."""
    from parti.data import open_source

    copy = tmp_path / "drive_copy"
    for rel, data in captioned_shards(rows=20).items():
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes(data)
    for spec in (str(copy), f"hf:{CAPTIONED}"):
        source = open_source(spec, image_size=32)
        assert source.has_captions and source[0]["caption"] in CAPTIONS and source[0]["image"].shape == (3, 32, 32)


def test_stage_2_refuses_caption_less_data_before_any_work(tmp_path):
    """Trap: stage 2 on caption-less data encoded everything, then failed, and every retry failed again."""
    from parti.train_generator import GeneratorTrainConfig, train_generator

    folder = tmp_path / "faces"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i:02d}.png").write_bytes(_png(32, i))
    tok = tmp_path / "tok"
    from parti.tokenizer import build_tokenizer, save_tokenizer

    save_tokenizer(build_tokenizer("tiny"), tok)
    cfg = GeneratorTrainConfig(data=str(folder), tokenizer=str(tok), out=str(tmp_path / "gen"), steps=1,
                               batch_size=2, progress=False, cpu=True, text_tokenizer="bytes", text_preset="tiny")
    with pytest.raises(PartiError, match="has no captions"):
        train_generator(cfg)
    assert not (tmp_path / "gen" / "cache").exists()  # nothing encoded


def test_a_run_continued_with_other_data_is_refused(tmp_path):
    """Trap: changing the data under the same OUT kept the old tokenizer, or the old code cache, with a warning."""
    from parti.train_tokenizer import TokenizerTrainConfig, train_tokenizer

    small = dict(preset="tiny", steps=2, batch_size=2, synthetic_length=8, val_images=2, save_every=1, progress=False,
                 cpu=True, out=str(tmp_path / "tok"))
    train_tokenizer(TokenizerTrainConfig(data="synthetic", **small))
    folder = tmp_path / "faces"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i:02d}.png").write_bytes(_png(32, i))
    with pytest.raises(PartiError, match="other inputs .*data: 'synthetic'"):
        train_tokenizer(TokenizerTrainConfig(data=str(folder), resume=True, **small))


def test_drive_keeps_out_and_the_thumbnails(monkeypatch, tmp_path):
    """Trap: with USE_DRIVE on, OUT was ignored."""
    monkeypatch.delenv(notebook.SMALL_ENV, raising=False)
    monkeypatch.setattr(notebook, "in_colab", lambda: True)
    monkeypatch.setattr(notebook, "mount_drive", lambda: tmp_path / "MyDrive")
    run = notebook.configure(dataset="ffhq", out="runs/first", use_drive=True)
    assert run.tokenizer_dir == tmp_path / "MyDrive" / "parti" / "runs" / "first" / "tokenizer"
    assert run.drive == tmp_path / "MyDrive" / "parti"


def test_the_generate_cell_prompts_follow_the_dataset(monkeypatch):
    from parti.prompts import FFHQ_SAMPLE_PROMPTS

    monkeypatch.delenv(notebook.SMALL_ENV, raising=False)
    assert set(notebook.example_prompts(notebook.configure(dataset="ffhq"))) <= set(FFHQ_SAMPLE_PROMPTS)
    assert all("background" in p for p in notebook.example_prompts(notebook.configure(dataset="synthetic")))
