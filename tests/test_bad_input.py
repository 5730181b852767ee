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
        (tmp / "a_file").write_text("x")  # a file where a folder is expected: {tmp}/a_file/...

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


# -- round two: one output guard for every writer --

def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def as_run(folder: Path, stage: str = "generator") -> None:
    """Mark `folder` as one of our runs, as RunFolder's run.json does (with a metrics log)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps({"kind": "parti_run", "config": {"stage": stage}}))
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')


def untouched(*folders: str, before=None):
    """Run `action`; every file under `folders` ({gen}, {tmp}/run) must be byte for byte as before, and
    `before(c)` (optional) prepares them first."""
    def wrap(action):
        def run(c: Ctx) -> None:
            if before is not None:
                before(c)
            paths = [Path(c.path(f)) for f in folders]
            snapshot = [files_of(p) for p in paths]
            try:
                action(c)
            finally:
                assert [files_of(p) for p in paths] == snapshot, "a refused write changed files"
        return run
    return wrap


def gen_as_run(c: Ctx) -> None:
    as_run(c.copy("gen"))


def tmp_run(c: Ctx) -> None:
    as_run(c.tmp / "run", stage="tokenizer")


def no_scoring(c: Ctx) -> None:
    import parti.cli

    def reached(*a, **k):
        raise AssertionError("the evaluation ran before its --out was checked")

    c.monkeypatch.setattr(parti.cli, "evaluate_generator", reached)
    c.monkeypatch.setattr(parti.cli, "evaluate_tokenizer", reached)


def evaluate(command: str, out: str, *, before=gen_as_run):
    """`parti evaluate[-tokenizer] --checkpoint {gen} ... --out OUT` (the issue's repro), refused before any
    scoring, with every file of the checkpoint and of {tmp}/run untouched."""
    run = cli(command, "--checkpoint", "{gen}", "--data", "synthetic", "--num-images", "8", "--no-download",
              "--out", out)

    def prepared(c: Ctx) -> None:
        before(c)
        tmp_run(c)
        no_scoring(c)

    return untouched("{gen}", "{tmp}/run", before=prepared)(run)


def results_twice(out: str):
    def action(c: Ctx) -> None:
        from parti.evaluate import write_results

        gen_as_run(c)
        results = {"val_loss": 1.0, "errors": {}, "settings": {"checkpoint": "gen"}}
        for _ in range(2):  # its own slot, then over its own earlier results
            write_results(Path(c.path(out)), results)
        assert json.loads(Path(c.path(out)).read_text())["val_loss"] == 1.0
    return action


def plot_into(out: str, *, prepare=None):
    run = cli("plot", "{tmp}/run", "--out", out) if out else cli("plot", "{tmp}/run")

    def action(c: Ctx) -> None:
        tmp_run(c)
        if prepare is not None:
            prepare(c)
        run(c)
        run(c)  # again: over its own pictures
    return action


def fifo_grid(c: Ctx) -> None:
    import os

    os.mkfifo(c.tmp / "grid.png")


def users_folder(c: Ctx) -> None:
    (c.tmp / "mine").mkdir()
    (c.tmp / "mine" / "notes.txt").write_text("my notes")


def upload_into(where: str):
    def action(c: Ctx) -> None:
        from parti.push import prepare_upload

        prepare_upload(c.copy("gen"), Path(c.path(where)))
    return action


def train_after(prepare, *argv: str):
    run = cli(*argv)

    def action(c: Ctx) -> None:
        prepare(c)
        run(c)
    return action


# -- round two: caches record every input --

def own_cache(checkpoints: bool = False, **change):
    """OUT/cache as a killed run left it (synthetic, 8 faces, seed 0), checked against a run asking `change`:
    the same inputs keep it, other ones drop its manifest (it is encoded again), or with checkpoints refuse."""
    def action(c: Ctx) -> None:
        from parti.cache import CodeCache, encode_dataset, is_cache
        from parti.train_generator import GeneratorTrainConfig, _check_own_cache

        run = c.tmp / "run"
        encode_dataset(data="synthetic", tokenizer=c.models / "tok", out=run / "cache", synthetic_length=8,
                       splits=("train",), device="cpu", progress=False)
        if checkpoints:
            (run / "checkpoints" / "step_0000002").mkdir(parents=True)
        fingerprint = CodeCache(run / "cache").manifest["tokenizer_fingerprint"]
        if "version" in change:  # a cache an older parti wrote: what made it is unknown
            manifest(lambda m: m.update(version=change["version"]))(run / "cache")
        cfg = GeneratorTrainConfig(**{**TINY_GENERATOR, "data": "synthetic", "synthetic_length": 8,
                                      "tokenizer": str(c.models / "tok"), "out": str(run),
                                      **{k: v for k, v in change.items() if k not in ("tokenizer_fingerprint",
                                                                                      "version")}})
        _check_own_cache(run / "cache", cfg, text_identity=None,
                         tokenizer_fingerprint=change.get("tokenizer_fingerprint", fingerprint))
        assert is_cache(run / "cache") == (not change), "a stale cache was kept, or a good one dropped"
    return action


def killed_run_rerun_with_another_length(c: Ctx) -> None:
    """The issue's repro: a generator run killed once OUT/cache/manifest.json exists, run again with another
    --synthetic-length, trains on the new length (the cache is encoded again), not on the old 8 faces."""
    import parti.data
    import parti.train_generator as tg
    from parti.cache import CodeCache

    c.monkeypatch.setitem(parti.data.SYNTHETIC_LENGTHS, "val", 4)  # a small val split: seconds, not minutes
    cfg = tg.GeneratorTrainConfig(**TINY_GENERATOR, data="synthetic", synthetic_length=8, steps=1,
                                  tokenizer=str(c.models / "tok"), text_tokenizer="bytes", out=str(c.tmp / "s"))

    def killed(*a, **k):
        raise KeyboardInterrupt

    with c.monkeypatch.context() as m:
        m.setattr(tg, "build_generator", killed)  # right after the cache is made
        with pytest.raises(KeyboardInterrupt):
            tg.train_generator(cfg)
    assert len(CodeCache(c.tmp / "s" / "cache")) == 8
    tg.train_generator(dataclasses.replace(cfg, synthetic_length=12))
    cache = CodeCache(c.tmp / "s" / "cache")
    assert len(cache) == 12 and cache.manifest["inputs"]["synthetic_length"] == 12


def given_cache_inputs(c: Ctx) -> None:
    from parti.cache import CodeCache

    cache = CodeCache(c.copy("cache"), "train")
    cache.check(tokenizer_fingerprint=cache.manifest["tokenizer_fingerprint"], text_identity=None,
                inputs={"synthetic_length": 20000})


# -- round two: sizes --

# Run in a process of its own: a reader blocked inside Rust or C code (safetensors) may hold the GIL.
WATCHDOG = """
import os, stat, sys, time
root, seconds, marker = sys.argv[1], float(sys.argv[2]), sys.argv[3]
while True:
    time.sleep(seconds)
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            try:
                if stat.S_ISFIFO(os.lstat(path).st_mode):
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO when no reader waits
                    open(marker, "a").write(path + "\\n")
            except OSError:
                pass
"""


def alarm(action, seconds: float = 10):
    """Fail, rather than hang the suite, if `action` blocks opening a FIFO under the test's folder: after
    `seconds` a watchdog process opens each FIFO there for writing, which lets a blocked reader (even one
    deaf to signals, inside Rust or C code) go on to an empty file; the row then fails here."""
    def run(c: Ctx) -> None:
        import subprocess
        import sys

        marker = c.tmp.parent / f"{c.tmp.name}.unblocked"
        watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG, str(c.tmp), str(seconds), str(marker)])
        try:
            action(c)
        finally:
            watchdog.kill()
            watchdog.wait()
            assert not marker.exists(), f"blocked opening a FIFO: {marker.read_text().strip()}"
    return run


def replace_with(name: str, kind: str):
    """folder/NAME replaced by a FIFO, a symlink to /dev/zero or to a FIFO, or a sparse 65 MiB file."""
    def mutate(folder: Path) -> None:
        import os

        path = folder / name
        path.unlink()
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "zero":
            path.symlink_to("/dev/zero")
        elif kind == "link-to-fifo":
            os.mkfifo(folder / "pipe")
            path.symlink_to(folder / "pipe")
        else:
            with open(path, "wb") as f:
                f.truncate(65 << 20)
    return mutate


def thumbs_zip(c: Ctx, members: dict[str, bytes], *, stored: bool = False) -> Path:
    import zipfile

    path = c.tmp / "thumbnails128x128.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(f"thumbnails128x128/{name}", data)
    return path


PNG = __import__("random").Random(0).randbytes(10_000)  # stands for a thumbnail: 10 KB that does not compress


def fetch_zip(members: dict[str, bytes], *, damage=None, stored: bool = False):
    def action(c: Ctx) -> None:
        from parti.fetch import fetch_ffhq_thumbnails

        path = thumbs_zip(c, {k: v() if callable(v) else v for k, v in members.items()}, stored=stored)
        if damage is not None:
            path.write_bytes(damage(path.read_bytes()))
        fetch_ffhq_thumbnails(c.tmp / "ffhq", source=path, progress=False)
    return action


def fetch_to(dest: str, **kw):
    def action(c: Ctx) -> None:
        from parti.fetch import fetch_ffhq_thumbnails

        fetch_ffhq_thumbnails(c.path(dest), source=thumbs_zip(c, {"00000/00000.png": PNG}),
                              **{k: c.path(v) for k, v in kw.items()}, progress=False)
    return action


def keep_copy_killed_mid_copy(c: Ctx) -> None:
    """A kill while the zip is copied to Drive leaves no truncated zip under its name for later runs."""
    from parti import fetch

    zip_path, kept = thumbs_zip(c, {"00000/00000.png": PNG}), c.tmp / "drive" / "thumbnails128x128.zip"

    def killed_half_way(src, dst):
        Path(dst).write_bytes(Path(src).read_bytes()[:100])
        raise KeyboardInterrupt

    with c.monkeypatch.context() as m:
        m.setattr(fetch.shutil, "copyfile", killed_half_way)
        with pytest.raises(KeyboardInterrupt):
            fetch._keep_copy(zip_path, kept)
    assert not kept.exists()
    fetch._keep_copy(zip_path, kept)  # the next runtime copies it whole
    assert kept.read_bytes() == zip_path.read_bytes()


def huge_prompt(c: Ctx) -> None:
    """50 MB prompts cost what a long one does: cut to MAX_TEXT_BYTES before tokenizing, then to 16 tokens."""
    import tracemalloc

    from parti.pipeline import load_pipeline
    from parti.text import ByteTokenizer, TruncationWarning

    prompt = "a face " * 7_000_000
    tracemalloc.start()
    try:
        with pytest.warns(TruncationWarning):
            ids, mask = ByteTokenizer(max_length=16)([prompt, "red hair"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ids.shape == (2, 16) and peak < 1 << 20, f"tokenizing took {peak / 2**20:.0f} MiB"  # not the 49 MB
    with pytest.warns(TruncationWarning):
        images = load_pipeline(c.models / "gen", device="cpu")([prompt], seed=0).images
    assert images.shape == (1, 3, 32, 32)


def parse(**change):
    def action(c: Ctx) -> None:
        from parti.app import parse_request

        values = dict(prompt_text="a face", num_images=1, guidance_scale=3.0, temperature=1.0, top_k="", top_p="",
                      seed=0)
        parse_request(**{**values, **{k: v() if callable(v) else v for k, v in change.items()}})
    return action


# -- round two: columns chosen on purpose --

def table(columns: dict[str, str], **open_kw):
    """A 20-row parquet table of `columns` (name -> image | text | texts | struct | int | long-text), opened."""
    def action(c: Ctx) -> None:
        import datasets

        from parti.data import open_source

        kinds = {"image": datasets.Image(), "text": datasets.Value("string"), "long-text": datasets.Value("string"),
                 "texts": datasets.List(datasets.Value("string")), "struct": {"a": datasets.Value("int32")},
                 "int": datasets.Value("int64")}
        values = {"image": lambda i: Image.new("RGB", (12, 12), (i, 0, 0)), "text": lambda i: f"face {i}",
                  "long-text": lambda i: "long " * 200_000, "texts": lambda i: [f"face {i}", "other"],
                  "struct": lambda i: {"a": i}, "int": lambda i: i}
        data = {name: [values[kind](i) for i in range(20)] for name, kind in columns.items()}
        features = datasets.Features({name: kinds[kind] for name, kind in columns.items()})
        (c.tmp / "t").mkdir()
        datasets.Dataset.from_dict(data, features=features).to_parquet(str(c.tmp / "t" / "t.parquet"))
        item = open_source(str(c.tmp / "t" / "t.parquet"), image_size=8, **open_kw)[0]
        assert item["image"].shape == (3, 8, 8)
        assert item["caption"] is None or item["caption"].startswith(("face", "long")) and len(item["caption"]) <= 8192
    return action


def source(spec: str):
    def action(c: Ctx) -> None:
        from parti.data import open_source

        open_source(spec.format(tmp=c.tmp))
    return action


def folder_with(extra):
    """A folder of 5 images (captions in sidecars), `extra(folder)` added; its first item is read."""
    def action(c: Ctx) -> None:
        from parti.data import UnreadableImageWarning, open_source

        root = c.tmp / "faces"
        root.mkdir()
        for i in range(5):
            Image.new("RGB", (12, 12), (i, 0, 0)).save(root / f"1{i}.png")
            (root / f"1{i}.txt").write_text(f"face {i}")
        extra(root)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnreadableImageWarning)
            items = [open_source(str(root), image_size=8)[i] for i in range(2)]
        assert all(len(it["caption"]) <= 8192 for it in items if it is not None)
    return action


def huge_caption_file(root: Path) -> None:
    (root / "10.txt").write_text("a very long caption " * 1_000_000)  # 20 MB


def fifo_image(root: Path) -> None:
    import os

    os.mkfifo(root / "00_pipe.png")  # sorts first: the first item read


# -- round two: resume and push --

def resume_without_checkpoint(c: Ctx) -> None:
    """A tokenizer run whose checkpoints are all gone, resumed: it says so, starts at step 0, and each step
    keeps one row in metrics.jsonl."""
    import logging

    from parti.train_tokenizer import TokenizerTrainConfig, train_tokenizer

    cfg = TokenizerTrainConfig(**{**TINY_TOKENIZER, "save_every": 100}, steps=2, out=str(c.tmp / "r"))
    train_tokenizer(cfg)
    shutil.rmtree(c.tmp / "r" / "checkpoints")
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("parti").addHandler(handler)
    try:
        train_tokenizer(dataclasses.replace(cfg, steps=3, resume=True))
    finally:
        logging.getLogger("parti").removeHandler(handler)
    assert any("no checkpoint in" in m and "starting at step 0" in m for m in said), said
    assert [r["step"] for r in rows(c.tmp / "r")] == [1, 2, 3]
    train_tokenizer(dataclasses.replace(cfg, steps=4, resume=True))
    assert [r["step"] for r in rows(c.tmp / "r")] == [1, 2, 3, 4]


def push_sample_links_to_a_secret(c: Ctx) -> None:
    from parti.push import SAMPLE_NAME, prepare_upload

    gen = c.copy("gen")
    (c.tmp / "id_ed25519").write_text("PRIVATE KEY")
    (gen / "samples").mkdir()
    (gen / "samples" / "step_0000010.png").write_bytes(b"\x89PNG grid")
    (gen / "samples" / "step_0000020.png").symlink_to(c.tmp / "id_ed25519")
    folder = prepare_upload(gen, c.tmp / "up")
    assert (folder / SAMPLE_NAME).read_bytes() == b"\x89PNG grid"
    assert not any(b"PRIVATE KEY" in data for data in files_of(folder).values())


def push_card_of_local_data(c: Ctx) -> None:
    from parti.push import prepare_upload

    gen = c.copy("gen")
    config = json.loads((gen / "config.json").read_text())
    config["data"] = "/home/someone/private/ffhq-128"
    config["text_encoder_source"] = "/home/someone/models/t5-small/"
    (gen / "config.json").write_text(json.dumps(config))
    folder = prepare_upload(gen, c.tmp / "up")
    card = (folder / "README.md").read_text()
    assert "/home/someone" not in card and "ffhq-128" in card and "FFHQ" in card
    assert not any(b"/home/someone" in data for data in files_of(folder).values())  # config.json neither
    published = json.loads((folder / "config.json").read_text())
    assert published["data"] == "./ffhq-128" and published["text_encoder_source"] == "./t5-small"
    assert {k: v for k, v in published.items() if k not in ("data", "text_encoder_source")} == \
        {k: v for k, v in config.items() if k not in ("data", "text_encoder_source")}


def image_out_over_our_own_picture(c: Ctx) -> None:
    from PIL import Image

    from parti.runs import save_image

    for suffix in (".png", ".jpg", ".webp"):
        grid = c.tmp / f"grid{suffix}"
        save_image(Image.new("RGB", (8, 8), (0, 0, 0)), grid)
        save_image(Image.new("RGB", (8, 8), (255, 255, 255)), grid)  # a rerun replaces its own picture
        with Image.open(grid) as img:
            assert img.convert("RGB").getpixel((4, 4))[0] > 200


def plot_copies_no_symlinked_grid(c: Ctx) -> None:
    from parti.plots import plot_run

    run = c.copy("gen")
    (run / "metrics.jsonl").write_text('{"step": 1, "time": 0, "loss": 1.0}\n')
    (c.tmp / "id_ed25519").write_text("PRIVATE KEY")
    (run / "samples").mkdir()
    (run / "samples" / "step_0000010.png").symlink_to(c.tmp / "id_ed25519")
    written = plot_run(run)
    assert not any(b"PRIVATE KEY" in p.read_bytes() for p in written) and written  # the curves, not the key


def image_out_over_a_foreign_picture(c: Ctx) -> None:
    from PIL import Image

    from parti.runs import save_image

    photo = c.tmp / "holiday.jpg"
    Image.new("RGB", (4, 4), (200, 10, 10)).save(photo)
    before = photo.read_bytes()
    try:
        save_image(Image.new("RGB", (8, 8)), photo)
    finally:
        assert photo.read_bytes() == before  # refused, untouched


def push_failing(error):
    def action(c: Ctx) -> None:
        import huggingface_hub

        from parti.push import push_to_hub

        class Api:
            def __init__(self, token=None):
                pass

            def create_repo(self, *a, **k):
                raise error()

        if error is not None:
            c.monkeypatch.setattr(huggingface_hub, "HfApi", Api)
        push_to_hub(c.copy("gen"), "user/faces")
    return action


def unreachable():
    import httpx

    return httpx.ConnectError("[Errno -3] Temporary failure in name resolution")


def not_logged_in():
    from huggingface_hub.errors import LocalTokenNotFoundError

    return LocalTokenNotFoundError("Token is required (`token=True`), but no token found.")


def offline():
    from huggingface_hub.errors import OfflineModeIsEnabled

    return OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled.")


# -- round two: the one-line list --

def call_pipe(*args, **kwargs):
    def action(c: Ctx) -> None:
        from parti.pipeline import load_pipeline

        load_pipeline(c.models / "gen", device="cpu")(*args, **kwargs)
    return action


def unreadable(prepare, target: str, action):
    """`action` with `target` (made by prepare(c)) unreadable: mode 000 and, as root, who reads anything, an
    effective uid of nobody while it runs."""
    def run(c: Ctx) -> None:
        import os

        prepare(c)
        path = Path(c.path(target))
        mode = path.stat().st_mode
        os.chmod(path, 0)
        root = os.geteuid() == 0
        try:
            if root:
                os.seteuid(65534)
            action(c)
        finally:
            if root:
                os.seteuid(0)
            os.chmod(path, mode)
    return run


def load_tok(c: Ctx) -> None:
    from parti.tokenizer import load_tokenizer

    load_tokenizer(c.tmp / "tok")


def copy_tok(c: Ctx) -> None:
    import parti.tokenizer  # noqa: F401 - imported before the uid changes

    c.copy("tok")


def image_dir(c: Ctx) -> None:
    import parti.data  # noqa: F401

    (c.tmp / "faces").mkdir()
    for i in range(3):
        Image.new("RGB", (12, 12)).save(c.tmp / "faces" / f"{i}.png")


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
    # ---- round two (issue 28) ----
    # one output guard for every writer: refused before any work, nothing written
    pytest.param(evaluate("evaluate", "{gen}/model.safetensors"), "inside the generator folder",
                 id="evaluate-out-is-the-weights"),
    pytest.param(evaluate("evaluate-tokenizer", "{gen}/tokenizer/model.safetensors"), "inside the tokenizer folder",
                 id="evaluate-tokenizer-out-is-the-weights"),
    pytest.param(evaluate("evaluate", "{tmp}/run/run.json"), "inside the run folder", id="evaluate-out-is-run-json"),
    pytest.param(evaluate("evaluate", "{tmp}/run/metrics.jsonl"), "inside the run folder",
                 id="evaluate-out-is-metrics-jsonl"),
    pytest.param(evaluate("evaluate", "{gen}/eval_tokenizer.json"), "only eval.json is this command's",
                 id="evaluate-out-is-another-commands-slot"),
    pytest.param(evaluate("evaluate", "{tmp}/a_file"), "not a results file parti wrote",
                 id="evaluate-out-is-a-users-file"),
    pytest.param(evaluate("evaluate", "{tmp}"), "is a folder", id="evaluate-out-is-a-folder"),
    pytest.param(evaluate("evaluate", "{tmp}/a_file/eval.json"), "which is a file", id="evaluate-out-under-a-file"),
    pytest.param(evaluate("evaluate", "/proc/parti-eval.json"), "cannot be written", id="evaluate-out-in-proc"),
    pytest.param(results_twice("{gen}/eval.json"), None, id="results-in-their-own-slot-twice"),
    pytest.param(results_twice("{gen}/run.json"), "inside the generator folder", id="results-over-run-json"),
    pytest.param(plot_into(""), None, id="plot-into-the-runs-own-plots-twice"),
    pytest.param(plot_into("{gen}/tokenizer"), "the tokenizer folder", id="plot-out-is-a-model"),
    pytest.param(plot_into("{tmp}/mine", prepare=users_folder), "did not write", id="plot-out-holds-users-files"),
    pytest.param(plot_into("{tmp}/a_file"), "is a file", id="plot-out-is-a-file"),
    pytest.param(untouched("{gen}")(cli("encode", "--data", "synthetic", "--tokenizer", "{tok}", "--text-encoder",
                                        "t5-small", "--out", "{gen}/codes")), "inside the generator folder",
                 id="encode-out-inside-a-model-before-t5-loads"),
    pytest.param(cli("encode", "--data", "synthetic", "--tokenizer", "{tok}", "--out", "{tok}/cache"),
                 "which this command reads", id="encode-out-inside-the-tokenizer-read"),
    pytest.param(untouched("{tmp}/run", before=tmp_run)(sample("--out", "{tmp}/run/grid.png")),
                 "inside the run folder", id="sample-out-inside-a-run-folder"),
    pytest.param(sample("--out", "{tmp}/a_file/grid.png"), "which is a file", id="sample-out-under-a-file"),
    pytest.param(alarm(train_after(fifo_grid, "sample", "--checkpoint", "{gen}", "--prompt", "a face", "--out",
                                   "{tmp}/grid.png")), "is not an image", id="sample-out-is-a-fifo"),
    pytest.param(sample("--out", "{tmp}/" + "a" * 5000 + ".png"), "cannot be used",
                 id="sample-out-name-of-5000-characters"),
    pytest.param(evaluate("evaluate", "{tmp}/" + "a" * 5000 + ".json"), "cannot be used",
                 id="evaluate-out-name-of-5000-characters"),
    pytest.param(cli("demo", "--size", "smoke", "--out", "{tmp}/demo", "--images", "{tmp}/a_file"),
                 "--images .* is a file", id="demo-images-is-a-file"),
    pytest.param(cli("demo", "--size", "smoke", "--out", "{gen}/demo"), "inside the generator folder",
                 id="demo-out-inside-a-model"),
    pytest.param(train_after(tmp_run, *TOK_TRAIN[:-1], "{tmp}/run/sub"), "inside the run folder",
                 id="train-out-inside-a-run-folder"),
    pytest.param(cli(*TOK_TRAIN[:-1], "/proc/parti-run"), "cannot be written", id="train-out-in-proc"),
    pytest.param(upload_into("{gen}/upload"), "which this command reads", id="push-staging-inside-the-checkpoint"),
    pytest.param(fetch_to("{tmp}/a_file/ffhq"), "which is a file", id="fetch-destination-under-a-file"),
    pytest.param(fetch_to("{tmp}/ffhq", keep_copy="{tmp}/a_file"), "keep_copy .* is a file",
                 id="fetch-keep-copy-is-a-file"),
    # caches and runs record every input that shapes them
    pytest.param(killed_run_rerun_with_another_length, None, id="cache-of-a-killed-run-rerun-with-another-length"),
    pytest.param(own_cache(), None, id="cache-own-same-inputs-reused"),
    pytest.param(own_cache(synthetic_length=20000), None, id="cache-own-other-length-encoded-again"),
    pytest.param(own_cache(seed=3), None, id="cache-own-other-seed-encoded-again"),
    pytest.param(own_cache(holdout=True), None, id="cache-own-other-holdout-encoded-again"),
    pytest.param(own_cache(tokenizer_fingerprint="0123456789abcdef"), None,
                 id="cache-own-other-tokenizer-encoded-again"),
    pytest.param(own_cache(checkpoints=True, synthetic_length=20000), "checkpoints were trained on it",
                 id="cache-own-stale-with-checkpoints-refused"),
    pytest.param(own_cache(version=2), None, id="cache-own-from-an-older-parti-encoded-again"),
    pytest.param(given_cache_inputs, "encoded from other inputs", id="cache-given-checked-against-inputs"),
    pytest.param(cache_edit(manifest(lambda m: m.pop("inputs"))), "does not record the inputs",
                 id="cache-manifest-without-inputs"),
    # columns chosen on purpose
    pytest.param(table({"conditioning_image": "image", "text": "text"}), "named like a condition",
                 id="table-conditioning-image-only"),
    pytest.param(table({"mask": "image", "depth_map": "image", "text": "text"}), "no image column named like one",
                 id="table-mask-and-depth-only"),
    pytest.param(table({"conditioning_image": "image", "text": "text"}, image_column="conditioning_image"), None,
                 id="table-conditioning-image-asked-for"),
    pytest.param(table({"photo": "image", "text": "text"}), None, id="table-only-image-column-of-another-name"),
    pytest.param(table({"image": "image", "meta": "struct"}, caption_column="meta"), "holds struct values",
                 id="table-caption-column-of-structs"),
    pytest.param(table({"image": "image", "caption": "struct"}), "holds struct values",
                 id="table-caption-named-column-of-structs"),
    pytest.param(table({"image": "image", "text": "int"}), "holds int64 values", id="table-caption-column-of-ints"),
    pytest.param(table({"image": "image", "captions": "texts"}), None, id="table-caption-column-of-lists"),
    pytest.param(table({"image": "image", "text": "long-text"}), None, id="table-caption-of-1-mb-bounded"),
    pytest.param(source("hf:"), "names no data", id="data-hf-empty-name"),
    pytest.param(source("hf:   "), "names no data", id="data-hf-whitespace-name"),
    pytest.param(source(""), "names no data", id="data-empty"),
    pytest.param(cli(*TOK_TRAIN, "--data", "hf:"), "names no data", id="train-data-hf-unset-variable"),
    # bounded sizes
    pytest.param(huge_prompt, None, id="prompt-of-50-mb-bounded"),
    pytest.param(folder_with(huge_caption_file), None, id="caption-file-of-20-mb-bounded"),
    pytest.param(alarm(folder_with(fifo_image)), None, id="image-file-that-is-a-fifo-skipped"),
    pytest.param(alarm(tok_edit(replace_with("config.json", "fifo"))), "not a regular file", id="config-json-a-fifo"),
    pytest.param(alarm(tok_edit(replace_with("config.json", "zero"))), "not a regular file",
                 id="config-json-links-to-dev-zero"),
    pytest.param(alarm(tok_edit(replace_with("config.json", "big"))), "more than a JSON file may",
                 id="config-json-of-65-mib"),
    pytest.param(alarm(tok_edit(replace_with("model.safetensors", "link-to-fifo"))), "not a regular file",
                 id="weights-link-to-a-fifo"),
    pytest.param(alarm(tok_edit(replace_with("model.safetensors", "zero"))), "not a regular file",
                 id="weights-link-to-dev-zero"),
    pytest.param(fetch_zip({"00000/00000.png": lambda: bytes(8 << 20)}), "inflates to", id="zip-bomb-member"),
    pytest.param(fetch_zip({"00000/00000.png": PNG, "00000/00001.png": lambda: bytes(1 << 20)}), "inflates to",
                 id="zip-member-compressed-1000-to-1"),
    pytest.param(fetch_zip({"00000/00000.png": PNG}, stored=True,
                           damage=lambda b: b.replace(PNG[:512], bytes(512), 1)), "is corrupt",
                 id="zip-member-corrupt"),
    pytest.param(fetch_zip({"00000/00000.png": PNG}, damage=lambda b: b[: len(b) // 2]), "not a readable zip",
                 id="zip-truncated"),
    pytest.param(keep_copy_killed_mid_copy, None, id="zip-copy-to-drive-killed-leaves-no-truncated-zip"),
    pytest.param(parse(prompt_text="a face " * 200), "at most 1000", id="web-prompt-too-long"),
    pytest.param(parse(prompt_text=lambda: "a face\n" * 10_000_000), "too long", id="web-prompts-of-70-mb"),
    pytest.param(parse(num_images=float("nan")), "finite", id="web-number-of-images-nan"),
    pytest.param(parse(seed=float("inf")), "finite", id="web-seed-inf"),
    pytest.param(parse(guidance_scale=None), "finite", id="web-guidance-empty"),
    pytest.param(parse(temperature=float("nan")), "finite", id="web-temperature-nan"),
    # --resume says what it did; push publishes no link and no machine path
    pytest.param(resume_without_checkpoint, None, id="resume-without-a-checkpoint-says-so-and-keeps-one-history"),
    pytest.param(push_sample_links_to_a_secret, None, id="push-sample-grid-symlink-not-published"),
    pytest.param(push_card_of_local_data, None, id="push-card-names-no-machine-path"),
    pytest.param(plot_copies_no_symlinked_grid, None, id="plot-copies-no-symlinked-grid"),
    pytest.param(image_out_over_a_foreign_picture, "parti did not write", id="image-out-over-a-foreign-picture"),
    pytest.param(image_out_over_our_own_picture, None, id="image-out-over-our-own-picture"),
    pytest.param(push_failing(unreachable), "could not reach the Hub", id="push-hub-unreachable"),
    pytest.param(push_failing(not_logged_in), "hf auth login", id="push-not-logged-in"),
    pytest.param(push_failing(offline), "offline", id="push-offline"),
    # the one-line list
    pytest.param(call_pipe(None), "prompts must be a string or a list", id="pipe-none"),
    pytest.param(call_pipe({"a": 1}), "prompts must be a string or a list", id="pipe-dict"),
    pytest.param(call_pipe(["a face", None]), "prompts must be strings", id="pipe-list-with-none"),
    pytest.param(call_pipe(["a face"], return_codes="yes"), "return_codes", id="pipe-return-codes-a-string"),
    pytest.param(sample("--checkpoint", "user/name@" + "a" * 5000, "--out", "{tmp}/a.png"), "at most 255",
                 id="revision-of-5000-characters"),
    pytest.param(sample("--checkpoint", "a" * 5000, "--out", "{tmp}/a.png"), "could not read checkpoint folder",
                 id="checkpoint-name-of-5000-characters"),
    pytest.param(gen_edit(config(lambda d: (d.pop("text_encoder"), d.update(text_encoder_source="trainable")))),
                 "does not record its text encoder", id="generator-text-encoder-record-deleted-trained-run"),
    pytest.param(unreadable(copy_tok, "{tmp}/tok/config.json", load_tok), "(?i)permission denied",
                 id="config-unreadable-said-as-permission-denied"),
    pytest.param(unreadable(image_dir, "{tmp}/faces", source("{tmp}/faces")), "(?i)permission denied",
                 id="data-folder-unreadable-said-as-permission-denied"),
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
