"""Bad input: every hostile case is a named row of `CASES` (one line each), answered by a one-line
`PartiError` or a safe outcome, never a traceback, a silent mix-up or a destroyed file. The older
per-topic tests follow the table unchanged. docs/hostile_input.md lists what is checked.

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


# ---- the table ---------------------------------------------------------------------------------------
# A row is pytest.param(action, needle, id=...): `action(ctx)` sets the case up and runs it; it must raise
# a PartiError matching `needle` (needle None: it must succeed; the action asserts what matters).


class Ctx:
    """What a row works on: private copies of the tiny models and of a two-shard code cache."""

    def __init__(self, tmp: Path, models: Path, cache: Path, capsys, monkeypatch):
        self.tmp, self.models, self._cache, self.capsys, self.monkeypatch = tmp, models, cache, capsys, monkeypatch

    def copy(self, name: str) -> Path:
        dst = self.tmp / name
        if not dst.exists():
            shutil.copytree(self.models / name if name in ("tok", "gen") else self._cache, dst)
        return dst

    def path(self, text: str) -> str:
        return text.format(tmp=self.tmp, tok=self.models / "tok", gen=self.copy("gen"), cache=self.copy("cache"))


@pytest.fixture(scope="module")
def code_cache(models, tmp_path_factory):
    from parti.cache import encode_dataset

    out = tmp_path_factory.mktemp("cache") / "cache"
    return encode_dataset(data="synthetic", tokenizer=models / "tok", out=out, synthetic_length=8, max_items=8,
                          shard_size=4, batch_size=4, device="cpu", progress=False)


@pytest.fixture
def ctx(tmp_path, models, code_cache, capsys, monkeypatch):
    return Ctx(tmp_path, models, code_cache, capsys, monkeypatch)


def cli(*argv: str):
    """Run `parti ARGV` (paths as {tmp}, {tok}, {gen}, {cache}); a refusal must be one line, re-raised here."""
    def action(c: Ctx) -> None:
        code = main([c.path(a) for a in argv])
        if code != 0:
            raise PartiError(one_line_error(c.capsys, code).removeprefix("parti: error: "))
    return action


# -- code caches --

def load_cache(c: Ctx, root: Path | None = None) -> None:
    from parti.cache import CodeCache

    CodeCache(root or c.copy("cache"), "train")


def cache_edit(mutate):
    """Mutate a fresh cache copy (mutate(root)), then open its train split."""
    def action(c: Ctx) -> None:
        mutate(c.copy("cache"))
        load_cache(c)
    return action


def json_edit(name: str):
    """edit(fn): a mutation of a copied folder that applies fn to the JSON object in folder/name."""
    def edit(fn):
        def mutate(folder: Path) -> None:
            data = json.loads((folder / name).read_text())
            fn(data)
            (folder / name).write_text(json.dumps(data))
        return mutate
    return edit


manifest = json_edit("manifest.json")


def put(name: str, make, *, record: bool = True):
    """Replace train/NAME with make(old bytes or array) -> ndarray | str | bytes; `record`: also update the
    manifest's size and checksum, as a hostile (or buggy) writer of a consistent cache would."""
    def mutate(root: Path) -> None:
        import hashlib

        path = root / "train" / name
        old = np.load(path) if name.endswith(".npy") else path.read_bytes()
        new = make(old)
        if isinstance(new, np.ndarray):
            np.save(path, new, allow_pickle=new.dtype == object)
        else:
            path.write_bytes(new.encode() if isinstance(new, str) else new)
        if record:
            data = json.loads((root / "manifest.json").read_text())
            entry = next(s for s in data["splits"]["train"]["shards"] if name in s.get("files", {name: 0}))
            if "files" in entry:
                blob = path.read_bytes()
                entry["files"][name] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
            (root / "manifest.json").write_text(json.dumps(data))
    return mutate


def npy_header_rows(rows: int):
    def make(old: np.ndarray) -> bytes:
        import io

        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "<u2", "fortran_order": False,
                                                    "shape": (rows, old.shape[1])})
        return buf.getvalue() + old.tobytes()
    return make


def reencode_killed_before_manifest(c: Ctx) -> None:
    """Re-encode an existing cache with another tokenizer; the kill lands just before the manifest."""
    import parti.cache as cache_mod
    from parti.tokenizer import build_tokenizer, save_tokenizer

    root = c.copy("cache")
    torch.manual_seed(7)
    save_tokenizer(build_tokenizer("tiny"), c.tmp / "other_tok")

    def killed(*a, **k):
        raise KeyboardInterrupt

    c.monkeypatch.setattr(cache_mod, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        cache_mod.encode_dataset(data="synthetic", tokenizer=c.tmp / "other_tok", out=root, synthetic_length=8,
                                 max_items=8, shard_size=4, device="cpu", progress=False)
    c.monkeypatch.undo()
    load_cache(c, root)


def cache_grid_check(c: Ctx) -> None:
    from parti.cache import CodeCache

    cache = CodeCache(c.copy("cache"), "train")
    cache.check(tokenizer_fingerprint=cache.manifest["tokenizer_fingerprint"], text_identity=None, grid_size=16)


def encode_into(out: str):
    def action(c: Ctx) -> None:
        from parti.cache import encode_dataset

        target = Path(c.path(out))
        if target.name == "user_files":
            target.mkdir()
            (target / "thesis.tex").write_text("years of work")
        encode_dataset(data="synthetic", tokenizer=c.models / "tok", out=target, synthetic_length=4, max_items=4,
                       device="cpu", progress=False)
    return action


# -- model folders --

def tok_edit(mutate):
    """Mutate a copy of the tiny tokenizer folder (mutate(folder)), then load it."""
    def action(c: Ctx) -> None:
        from parti.tokenizer import load_tokenizer

        folder = c.copy("tok")
        mutate(folder)
        load_tokenizer(folder)
    return action


def gen_edit(mutate):
    """Mutate a copy of the tiny generator folder, then load the whole pipeline from it."""
    def action(c: Ctx) -> None:
        from parti.pipeline import load_pipeline

        folder = c.copy("gen")
        mutate(folder)
        load_pipeline(folder, device="cpu")
    return action


config = json_edit("config.json")


def model_config(**values):
    return config(lambda d: d["config"].update(values))


def weights(fn, *, keep_metadata: bool = True):
    """Rewrite model.safetensors as fn(state) (with its metadata, or without: a file from another tool)."""
    def mutate(folder: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        path = folder / "model.safetensors"
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        save_file(fn(load_file(str(path))), str(path), metadata=meta if keep_metadata else None)
    return mutate


def other_tokenizer_weights(state: dict) -> dict:
    from parti.tokenizer import build_tokenizer

    torch.manual_seed(123)
    return build_tokenizer("tiny").state_dict()


def floats(fn):
    return lambda state: {k: fn(v) if v.is_floating_point() else v for k, v in state.items()}


def config_is_a_folder(folder: Path) -> None:
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()


# -- writes --

def write_under(where: str):
    def action(c: Ctx) -> None:
        from parti.files import write_json

        (c.tmp / "a_file").write_text("x")
        write_json(Path(c.path(where)) / "config.json", {"a": 1})
    return action


def claim(prepare):
    """Make the folder `--out` points at (prepare(folder)), then open a run there."""
    def action(c: Ctx) -> None:
        from parti.runs import RunFolder

        out = c.tmp / "out"
        out.mkdir()
        prepare(out)
        before = sorted(p.name for p in out.rglob("*"))
        try:
            RunFolder(out, config={"stage": "tokenizer"}, resume=False, mixed_precision="no")
        finally:
            assert sorted(p.name for p in out.rglob("*")) == before  # refused before a single write
    return action


def users_files(out: Path) -> None:
    (out / "config.json").write_text('{"my": "settings"}')
    (out / "model.safetensors").write_bytes(b"my model")
    (out / "checkpoints" / "step_0000001").mkdir(parents=True)


def users_run_json(out: Path) -> None:
    (out / "run.json").write_text('{"experiment": "mine"}')


def generator_run(out: Path) -> None:
    from parti.runs import RunFolder

    RunFolder(out, config={"stage": "generator"}, resume=False, mixed_precision="no")


def output_check(out: str, *protected: str):
    def action(c: Ctx) -> None:
        from parti.runs import check_output_not_inside

        check_output_not_inside(c.path(out), *(c.path(p) for p in protected))
    return action


def image_output(out: str):
    def action(c: Ctx) -> None:
        from parti.runs import check_image_output

        (c.tmp / "notes.png").write_text("not a picture")
        check_image_output(c.path(out))
    return action


def jpg_is_jpeg(c: Ctx) -> None:
    from parti.runs import save_image

    save_image(Image.new("RGBA", (8, 8), (1, 2, 3, 4)), c.tmp / "x.jpg")
    save_image(Image.new("RGB", (8, 8)), c.tmp / "x.webp")
    assert (c.tmp / "x.jpg").read_bytes()[:2] == b"\xff\xd8" and Image.open(c.tmp / "x.webp").format == "WEBP"


def lock_held_by(pid_of):
    def action(c: Ctx) -> None:
        import os
        import socket

        from parti.runs import LOCK_NAME, RunLock

        (c.tmp / "run").mkdir()
        boot = Path("/proc/sys/kernel/random/boot_id")
        holder = {"pid": pid_of(), "host": socket.gethostname(), "started": "earlier",
                  "boot": boot.read_text().strip() if boot.exists() else None}
        (c.tmp / "run" / LOCK_NAME).write_text(json.dumps(holder))
        with RunLock(c.tmp / "run"):
            assert json.loads((c.tmp / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert not (c.tmp / "run" / LOCK_NAME).exists()
    return action


def dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def parent_pid() -> int:
    import os

    return os.getppid()  # alive: it waits for this test process


# -- exports --

def export_killed(at: str):
    """An export into a copy of the generator folder with another tokenizer, killed `at` a point."""
    def action(c: Ctx) -> None:
        import os

        import parti.checkpoint as ck
        from parti.pipeline import load_pipeline
        from parti.tokenizer import build_tokenizer, save_tokenizer

        gen = c.copy("gen")
        (gen / "run.json").write_text("{}")
        torch.manual_seed(5)
        other = build_tokenizer("tiny")
        if at == "before-commit":
            with pytest.raises(KeyboardInterrupt), ck.atomic_export(gen) as stage:
                save_tokenizer(other, stage / "tokenizer")
                raise KeyboardInterrupt
            assert not (gen / ck.EXPORT_STAGING).exists() and (gen / "run.json").exists()
            load_pipeline(gen, device="cpu")  # the old export, whole
            return
        real = os.replace

        def dies_moving_the_new_tokenizer_in(src, dst):  # the old one is already moved aside
            if Path(dst) == gen / "tokenizer":
                raise KeyboardInterrupt
            return real(src, dst)

        c.monkeypatch.setattr(ck.os, "replace", dies_moving_the_new_tokenizer_in)
        with pytest.raises(KeyboardInterrupt), ck.atomic_export(gen) as stage:
            save_tokenizer(other, stage / "tokenizer")
        c.monkeypatch.undo()
        if at == "mid-swap-then-finish":
            ck.finish_export(gen)  # what the next export (or a --resume) does first
            from parti.tokenizer import load_tokenizer
            assert load_tokenizer(gen / "tokenizer").fingerprint() == other.fingerprint()
            assert not (gen / ck.EXPORT_READY).exists() and not (gen / ck.EXPORT_OLD).exists()
            return
        load_pipeline(gen, device="cpu")
    return action


def lost_tokenizer(folder: Path) -> None:
    (folder / "run.json").write_text("{}")
    shutil.rmtree(folder / "tokenizer")


# -- text and data --

def spm(captions, vocab_size: int):
    def action(c: Ctx) -> None:
        from parti.text import train_sentencepiece

        train_sentencepiece(captions, c.tmp, vocab_size=vocab_size)
    return action


def table_with_image_paths(c: Ctx) -> None:
    """A parquet table whose image column names files anywhere on the machine, not its own images."""
    import datasets

    from parti.data import open_source

    outside = c.tmp / "private"
    outside.mkdir()
    Image.new("RGB", (12, 12), "red").save(outside / "secret.png")
    (c.tmp / "table").mkdir()
    table = datasets.Dataset.from_dict({"image": [str(outside / "secret.png")] * 20, "text": ["x"] * 20})
    table.to_parquet(str(c.tmp / "table" / "t.parquet"))
    source = open_source(str(c.tmp / "table" / "t.parquet"), image_size=8)
    source[0]


def relative_paths_inside(c: Ctx) -> None:
    import datasets

    from parti.data import open_source

    (c.tmp / "table").mkdir()
    for i in range(20):
        Image.new("RGB", (12, 12), (i, 0, 0)).save(c.tmp / "table" / f"{i}.png")
    table = datasets.Dataset.from_dict({"image": [f"{i}.png" for i in range(20)], "text": ["x"] * 20})
    table.to_parquet(str(c.tmp / "table" / "t.parquet"))
    assert open_source(str(c.tmp / "table" / "t.parquet"), image_size=8)[0]["image"].shape == (3, 8, 8)


def synthetic_with(**columns):
    def action(c: Ctx) -> None:
        from parti.data import open_source

        open_source("synthetic", **columns)
    return action


def corrupt_inception(c: Ctx) -> None:
    from parti.inception import load_fid_inception

    (c.tmp / "inception.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    load_fid_inception(path=c.tmp / "inception.safetensors", allow_download=False)


def corrupt_clip(c: Ctx) -> None:
    from transformers import CLIPConfig, CLIPModel

    from parti.metrics import load_clip

    config = CLIPConfig(text_config={"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                                     "num_attention_heads": 1, "vocab_size": 10},
                        vision_config={"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                                       "num_attention_heads": 1, "image_size": 8, "patch_size": 4},
                        projection_dim=4)
    CLIPModel(config).save_pretrained(c.tmp / "clip")
    weights_file = c.tmp / "clip" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:64])
    load_clip(str(c.tmp / "clip"), device="cpu")


def lead(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(reason=f"needs lead: {reason}", strict=True)


def no_sampling(c: Ctx) -> None:
    """Rows about sampling arguments must be refused before any image is generated."""
    import parti.pipeline

    def reached(*a, **k):
        raise AssertionError("the arguments were not refused: sampling started")

    c.monkeypatch.setattr(parti.pipeline, "generate", reached)


def sample(*argv: str):
    run = cli("sample", "--checkpoint", "{gen}", "--prompt", "a face", *argv)

    def action(c: Ctx) -> None:
        no_sampling(c)
        run(c)
    return action


TOK_TRAIN = ("train-tokenizer", "--preset", "tiny", "--steps", "1", "--batch-size", "2", "--synthetic-length", "4",
             "--val-images", "2", "--perceptual-weight", "0", "--adversarial-weight", "0", "--cpu", "--no-progress",
             "--out", "{tmp}/run")
GEN_TRAIN = ("train", "--tokenizer", "{tok}", "--data", "{cache}", "--preset", "tiny", "--text-preset", "tiny",
             "--text-tokenizer", "bytes", "--steps", "1", "--batch-size", "2", "--val-batches", "1", "--cpu",
             "--no-progress", "--sample-every", "100", "--out", "{tmp}/run")


def on_cpu_only(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(torch.cuda.is_available(), reason=reason)


CASES = [
    # code caches (issue items 1, 2 and the one-line list)
    pytest.param(reencode_killed_before_manifest, "not a code cache", id="cache-reencode-killed-before-manifest"),
    pytest.param(cache_edit(put("codes_00000.npy", lambda a: (a + 1) % 256, record=False)), "checksum",
                 id="cache-shard-changed-after-encoding"),
    pytest.param(cache_edit(put("codes_00000.npy", lambda a: a.tobytes()[:40], record=False)), "truncated",
                 id="cache-shard-truncated"),
    pytest.param(cache_edit(put("captions_00000.jsonl", lambda b: b.split(b"\n", 1)[1])), "captions for",
                 id="cache-captions-one-line-short"),
    pytest.param(cache_edit(put("codes_00000.npy", lambda a: np.zeros((4, 10), np.uint16))), r"not \(4, 64\)",
                 id="cache-codes-of-the-wrong-width"),
    pytest.param(cache_edit(put("codes_00000.npy", lambda a: a.reshape(4, 8, 8))), r"not \(4, 64\)",
                 id="cache-3d-codes"),
    pytest.param(cache_edit(put("codes_00000.npy", lambda a: np.full_like(a, 300))), "outside the tokenizer",
                 id="cache-codes-above-num-codes"),
    pytest.param(cache_edit(manifest(lambda m: m.pop("splits"))), "no 'splits'", id="cache-manifest-without-splits"),
    pytest.param(cache_edit(manifest(lambda m: m["splits"]["train"].update(count=99))), "manifest says 99",
                 id="cache-manifest-count-wrong"),
    pytest.param(cache_edit(lambda root: (root / "train" / "codes_00001.npy").unlink()), "is missing",
                 id="cache-missing-shard"),
    pytest.param(cache_edit(put("codes_00000.npy", lambda a: a.tobytes()[:200])), "not a readable array",
                 id="cache-truncated-npy"),
    pytest.param(cache_edit(put("codes_00000.npy", lambda a: b"")), "not a readable array", id="cache-empty-npy"),
    pytest.param(cache_edit(put("codes_00000.npy", npy_header_rows(10**12))), "not a readable array",
                 id="cache-npy-header-of-1e12-rows"),
    pytest.param(cache_edit(put("codes_00000.npy", lambda a: np.array([{"a": 1}] * 4, dtype=object))),
                 "not a readable array", id="cache-object-npy"),
    pytest.param(cache_edit(put("captions_00000.jsonl", lambda b: b"not json\n" + b.split(b"\n", 1)[1])),
                 "line 1 .* not a JSON string", id="cache-bad-json-captions-line"),
    pytest.param(cache_edit(manifest(lambda m: m.pop("version"))), "older parti", id="cache-manifest-without-checksums"),
    pytest.param(cache_grid_check, "grid_size 8, the tokenizer has 16", id="cache-of-another-grid"),
    pytest.param(encode_into("{tmp}/user_files"), "not a code cache", id="encode-into-a-folder-of-other-files"),
    pytest.param(cli("encode", "--data", "synthetic", "--tokenizer", "{tok}", "--out", "{tmp}/c", "--batch-size", "0"),
                 "batch_size must be", id="encode-batch-size-0"),
    pytest.param(cli("encode", "--data", "synthetic", "--tokenizer", "{tok}", "--out", "{tok}/config.json"), "is a file",
                 id="encode-out-a-file"),
    # model folders (items 10, 11, 13)
    pytest.param(tok_edit(weights(other_tokenizer_weights, keep_metadata=False)), "fingerprint differs",
                 id="tokenizer-weights-swapped-keep-the-fingerprint"),
    pytest.param(tok_edit(weights(floats(lambda v: torch.full_like(v, float("nan"))))), "NaN or inf",
                 id="weights-all-nan"),
    pytest.param(tok_edit(weights(floats(lambda v: v.to(torch.int64)))), "stored as I64", id="weights-cast-to-int64"),
    pytest.param(tok_edit(config(lambda d: d.update(comment="edited"))), "unknown top-level keys",
                 id="config-unknown-top-level-key"),
    pytest.param(tok_edit(config(lambda d: d.update(config=5))), "must be an object", id="config-is-a-number"),
    pytest.param(tok_edit(model_config(dim=10**9)), "'dim' = 1000000000 is out of range", id="tokenizer-dim-1e9"),
    pytest.param(tok_edit(model_config(image_size=10**6)), "'image_size' .* out of range",
                 id="tokenizer-image-size-1e6"),
    pytest.param(tok_edit(model_config(encoder_depth=10**6)), "'encoder_depth' .* out of range",
                 id="tokenizer-depth-1e6"),
    pytest.param(tok_edit(model_config(codebook_size=10**9)), "'codebook_size' .* out of range",
                 id="tokenizer-codebook-1e9"),
    pytest.param(tok_edit(model_config(beta=float("nan"))), "must be finite", id="config-nan-value"),
    pytest.param(tok_edit(model_config(dim=16384, encoder_depth=256, heads=1)), "GiB limit",
                 id="config-too-many-parameters"),
    pytest.param(tok_edit(model_config(dim=128)), "config implies", id="config-shapes-checked-against-the-header"),
    pytest.param(tok_edit(config_is_a_folder), "could not read", id="config-unreadable"),
    pytest.param(gen_edit(model_config(grid_size=10**5)), "'grid_size' .* out of range", id="generator-grid-1e5"),
    pytest.param(gen_edit(model_config(num_codes=10**9)), "'num_codes' .* out of range",
                 id="generator-num-codes-1e9"),
    pytest.param(gen_edit(model_config(depth=10**6)), "'depth' .* out of range", id="generator-depth-1e6"),
    pytest.param(gen_edit(config(lambda d: d.pop("text_encoder"))), "does not record its text encoder",
                 id="generator-text-encoder-record-deleted"),
    # exports (item 12)
    pytest.param(gen_edit(lost_tokenizer), "--resume", id="export-missing-tokenizer-says-resume"),
    pytest.param(export_killed("before-commit"), None, id="export-killed-before-commit-keeps-the-old"),
    pytest.param(export_killed("mid-swap"), "interrupted .* --resume", id="export-killed-mid-swap-says-resume"),
    pytest.param(export_killed("mid-swap-then-finish"), None, id="export-killed-mid-swap-is-finished-later"),
    # writes (items 4, 5, 6, 8 and the one-line list)
    pytest.param(write_under("/proc/parti"), "could not write", id="write-under-proc"),
    pytest.param(write_under("{tmp}/a_file/sub"), "could not write", id="write-under-a-file"),
    pytest.param(claim(users_files), "not a parti run", id="out-is-a-folder-of-the-users-files"),
    pytest.param(claim(users_run_json), "did not write", id="out-holds-another-tools-run-json"),
    pytest.param(claim(generator_run), "holds a generator run", id="out-holds-a-run-of-the-other-stage"),
    pytest.param(output_check("{tok}", "{tok}"), "which this command reads", id="out-equals-the-tokenizer-folder"),
    pytest.param(output_check("{gen}/tokenizer"), "the tokenizer folder", id="out-is-a-generators-tokenizer"),
    pytest.param(output_check("{gen}/tokenizer/sub"), "inside the tokenizer folder", id="out-inside-a-model"),
    pytest.param(image_output("{gen}/model.safetensors"), "must end in", id="image-out-is-the-weights"),
    pytest.param(image_output("{gen}/grid.png"), "inside the checkpoint folder", id="image-out-in-a-checkpoint"),
    pytest.param(image_output("{tmp}/notes.png"), "not an image", id="image-out-replaces-a-non-image"),
    pytest.param(jpg_is_jpeg, None, id="image-out-suffix-picks-the-format"),
    pytest.param(lock_held_by(parent_pid), r"in use by another training \(pid", id="lock-held-by-a-live-training"),
    pytest.param(lock_held_by(dead_pid), None, id="lock-of-a-dead-training-is-taken-over"),
    # text encoders and data (item 11 and the one-line list)
    pytest.param(spm(["a face"] * 10, 1), "vocab_size must be", id="sentencepiece-vocab-size-1"),
    pytest.param(spm(["\u200b", "\ufeff "] * 5, 300), "needs non-empty captions",
                 id="sentencepiece-captions-empty-once-normalised"),
    pytest.param(table_with_image_paths, "outside the dataset's folder", id="image-column-of-absolute-paths"),
    pytest.param(relative_paths_inside, None, id="image-column-of-relative-paths-inside"),
    pytest.param(synthetic_with(image_column="img"), "--image-column", id="image-column-with-synthetic-data"),
    pytest.param(corrupt_inception, "corrupt or truncated", id="inception-weights-corrupt"),
    pytest.param(corrupt_clip, "could not load CLIP", id="clip-weights-corrupt"),
    # the lead's files: the trainers, the CLI, the pipeline (flip each on once wired)
    pytest.param(cli(*TOK_TRAIN, "--lr", "inf"), "lr", id="train-lr-inf"),
    pytest.param(cli(*TOK_TRAIN, "--grad-clip", "nan"), "grad_clip", id="train-grad-clip-nan",),
    pytest.param(cli(*TOK_TRAIN, "--weight-decay", "-1"), "weight_decay", id="train-negative-weight-decay",),
    pytest.param(cli(*GEN_TRAIN, "--ema-decay", "1.5"), "ema_decay", id="train-ema-decay-1.5",),
    pytest.param(cli(*TOK_TRAIN, "--num-workers", "-1"), "num_workers", id="train-num-workers-negative",),
    pytest.param(cli(*TOK_TRAIN, "--seed", str(2**70)), "seed", id="train-seed-2-70",),
    pytest.param(sample("--num-images", "100000", "--out", "{tmp}/a.png"), "num_images", id="sample-num-images-1e5",),
    pytest.param(sample("--seed", str(2**70), "--out", "{tmp}/a.png"), "seed", id="sample-seed-2-70",),
    pytest.param(sample("--device", "cuda", "--out", "{tmp}/a.png"), "cuda", id="sample-device-cuda-without-gpu",
                 marks=on_cpu_only("a GPU is present")),
    pytest.param(sample("--out", "{gen}/model.safetensors"), "must end in", id="sample-out-is-the-weights",),
    pytest.param(sample("--text-encoder-path", "{tmp}/missing", "--out", "{tmp}/a.png"), "does not exist",
                 id="sample-text-encoder-path-missing",),
    pytest.param(cli("demo", "--out", "{tok}/config.json", "--size", "smoke"), "is a file", id="demo-out-a-file",),
    pytest.param(cli(*TOK_TRAIN[:-1], "{gen}/tokenizer"), "tokenizer folder", id="train-tokenizer-out-gen-tokenizer"),
    pytest.param(cli(*GEN_TRAIN[:-1], "{tok}"), "which this command reads", id="train-out-equals-tokenizer",),
]


@pytest.mark.parametrize("action, needle", CASES)
def test_hostile_input(ctx, action, needle):
    if needle is None:
        action(ctx)
        return
    with pytest.raises(PartiError, match=needle):
        action(ctx)


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
    """Images without captions: stage 2 learns from captions, so it stops before any work (one line, says
    what to do), whichever tokenizer the text encoder would use; nothing is encoded to be reused later."""
    folder = odd_folder(tmp_path / "faces")
    common = ["train", "--data", str(folder), "--tokenizer", str(models / "tok"), "--preset", "tiny",
              "--text-preset", "tiny", "--steps", "2", "--batch-size", "4", "--val-batches", "1", "--cpu",
              "--no-progress", "--sample-every", "100", "--log-every", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for out, extra in (("spm", []), ("bytes", ["--text-tokenizer", "bytes"])):
            code = main([*common, "--out", str(tmp_path / out), *extra])
            one_line_error(capsys, code, "has no captions")
            assert not (tmp_path / out / "cache").exists()


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
    """load_pipeline: tests/test_pipeline.py::test_generator_refuses_another_tokenizer.
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
    from parti.sampling import SamplingParams

    with pytest.raises(PartiError, match=message):
        if "num_images_per_prompt" in kwargs:
            pipe(["a face"], **kwargs)
        else:
            pipe(["a face"], SamplingParams(**kwargs))


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
    from parti.sampling import SamplingParams
    from parti.text import TruncationWarning

    long = "a person with long red hair on a blue background " * 10  # > 16 tokens of this encoder
    with pytest.warns(TruncationWarning, match="1 of 2 prompts were longer than 16 tokens"):
        result = pipe([long, "red hair"], SamplingParams(temperature=0), seed=0)
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


def test_weights_that_overflow_stop_the_run_before_any_save(tmp_path, monkeypatch, capsys):
    """A step whose loss is finite can still leave inf weights (a huge learning rate): the loop checks the
    weights before every save, so no checkpoint or export of a broken model is written."""
    import torch.optim

    real_step = torch.optim.AdamW.step

    def overflowing(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    code = main(["train-tokenizer", "--preset", "tiny", "--steps", "2", "--batch-size", "4", "--synthetic-length", "8",
                 "--val-images", "2", "--cpu", "--no-progress", "--save-every", "1", "--out", str(tmp_path / "t")])
    one_line_error(capsys, code, "weights became NaN/inf by step 1", "nothing was saved", "--lr")
    assert not list((tmp_path / "t" / "checkpoints").glob("step_*")) and not (tmp_path / "t" / "config.json").exists()


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
