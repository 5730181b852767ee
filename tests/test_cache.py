"""The code cache's memory, held-out images, reopen checks and encode precision (issue 27).

Most encodes run a tiny tokenizer over a fake source (plain tensors, no rendering) with a fake frozen text
encoder whose states are a known function of the caption, so what comes back can be checked exactly; one runs
a tiny random T5 as stage 2 does.
"""

import logging
import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import parti.cache as cache_mod
from parti.cache import CodeCache, HeldOutImages, cache_inputs, collate_codes, encode_dataset, held_out_source
from parti.errors import PartiError
from parti.tokenizer import load_tokenizer

S = 32  # the tiny tokenizer's image size


class FakeSource(Dataset):
    """`open_source`'s items from plain tensors: image i is a flat grey level, caption i is given."""

    def __init__(self, captions: list[str], *, split: str = "train", image_size: int = S):
        self.captions, self.split, self.image_size = captions, split, image_size
        self.has_captions, self.skipped = True, 0

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        level = (i % 200) / 100.0 - 1.0
        return {"image": torch.full((3, self.image_size, self.image_size), level), "caption": self.captions[i],
                "index": i}


class WideEncoder:
    """A frozen text encoder: one token per word plus eos, states (B, L, dim) a fixed function of the caption."""

    trainable = False

    def __init__(self, dim: int = 256):
        self.dim, self.seen = dim, []

    @staticmethod
    def states_of(caption: str, dim: int) -> torch.Tensor:
        n = len(caption.split()) + 1
        t, d = torch.arange(n)[:, None].float(), torch.arange(dim)[None].float()
        return torch.sin(t * 0.37 + d * 0.011 + len(caption) * 0.13)  # (n, dim)

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        rows = [self.states_of(c, self.dim) for c in captions]
        width = max(len(r) for r in rows)
        states = torch.zeros(len(rows), width, self.dim)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for b, r in enumerate(rows):
            states[b, :len(r)], mask[b, :len(r)] = r, True
        return states, mask

    def identity(self) -> dict:
        return {"kind": "fake", "dim": self.dim}


@pytest.fixture
def fake_data(monkeypatch):
    """encode_dataset's sources become FakeSource(captions[split]); returns the dict to fill."""
    captions: dict[str, list[str]] = {}
    monkeypatch.setattr(cache_mod.data_mod, "open_source",
                        lambda spec, *, split, image_size, **kw: FakeSource(captions[split], split=split,
                                                                             image_size=image_size))
    return captions


def test_text_states_memory_is_bounded_by_the_batch_not_the_shard(tiny_folders, tmp_path, fake_data):
    # One shard of 200 two-word captions and one of 127 words (128 tokens): the old encode padded every row
    # to 128 tokens in fp32 (201 x 128 x 256 x 4 bytes = 26 MB, then a copy and an fp16 copy). tracemalloc
    # sees numpy's buffers, where those copies lived (torch's own are not traced).
    long = " ".join(["word"] * 127)
    fake_data["train"] = [f"face {i}" for i in range(100)] + [long] + [f"face {i}" for i in range(100, 200)]
    encoder, batch = WideEncoder(dim=256), 8
    tok = load_tokenizer(tiny_folders / "tok")  # loaded outside the measure, as stage 2 passes its own
    args = dict(data="fake", tokenizer=tiny_folders / "tok", tokenizer_model=tok, text_encoder=encoder,
                splits=("train",), device="cpu", progress=False)
    tracemalloc.start()
    try:  # a first small encode imports what an encode imports lazily; then the memory of the real one
        encode_dataset(out=tmp_path / "warm", max_items=2, **args)
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        encode_dataset(out=tmp_path / "cache", batch_size=batch, shard_size=10_000, **args)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    one_batch = batch * 128 * encoder.dim * 4  # the widest batch's fp32 states: 1 MiB
    assert peak < 4 * one_batch, f"peak {peak / 2**20:.1f} MiB grows with the shard, not the batch"
    cache = CodeCache(tmp_path / "cache", "train")
    assert len(cache) == 201 and len(cache.codes) == 1  # one shard
    for i in (0, 100, 200):
        want = WideEncoder.states_of(fake_data["train"][i], encoder.dim).half()
        assert torch.equal(cache[i]["text"], want) and cache[i]["caption"] == fake_data["train"][i]
    batch_items = collate_codes([cache[99], cache[100]])
    assert batch_items["text"].shape == (2, 128, 256) and batch_items["text_mask"].sum(1).tolist() == [3, 128]


def write_table(folder: Path, n: int, *, shade: int) -> Path:
    """A parquet table of n captioned 12 px images (every 20th row is the val split)."""
    import datasets
    from PIL import Image

    folder.mkdir(parents=True)
    images = [Image.new("RGB", (12, 12), ((i * 7 + shade) % 256, shade, 200 - i)) for i in range(n)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": images, "text": [f"f{i} s{shade}" for i in range(n)]},
                               features=features).to_parquet(str(folder / "data.parquet"))
    return folder


def test_evaluation_reads_held_out_images_from_the_runs_cache_alone(tiny_folders, tmp_path, caplog, monkeypatch):
    import parti.evaluate as evaluate_mod
    from parti.data import open_source
    from parti.evaluate import GeneratorEvalConfig, evaluate_generator

    run = tmp_path / "run"
    shutil.copytree(tiny_folders / "gen", run)
    table, other = write_table(tmp_path / "faces", 60, shade=40), write_table(tmp_path / "other", 80, shade=90)

    def evaluate(data: Path) -> dict:
        return evaluate_generator(GeneratorEvalConfig(checkpoint=str(run), data=str(data), num_images=10,
                                                      batch_size=4, download=False, attribute_prompts=0))

    from_data = evaluate(table)  # no cache yet: the dataset itself
    encode_dataset(data=str(table), tokenizer=run / "tokenizer", out=run / "cache", device="cpu", progress=False)
    val = HeldOutImages(run / "cache")
    source = open_source(str(table), split="val", image_size=S)
    assert len(val) == len(source) == 3
    for i in range(3):
        assert torch.equal(val[i]["image"], source[i]["image"]) and val[i]["caption"] == source[i]["caption"]

    shutil.rmtree(table)  # the dataset and every copy of it are gone
    shutil.rmtree(Path(os.environ["HF_HOME"]) / "datasets", ignore_errors=True)
    with pytest.raises(PartiError):
        open_source(str(table), split="val", image_size=S)
    with monkeypatch.context() as m, caplog.at_level(logging.INFO, logger="parti.cache"):
        m.setattr(evaluate_mod, "open_source", lambda *a, **k: pytest.fail("the dataset was opened"))
        from_cache = evaluate(table)
    assert "3 from the code cache" in caplog.text
    assert from_cache["num_images"] == 3 and from_cache["val_loss"] == from_data["val_loss"]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="parti.cache"):
        from_other = evaluate(other)  # a cache of other data is not used
    assert "made from other data" in caplog.text and from_other["num_images"] == 4


def test_held_out_images_need_enough_items_and_the_same_size(tiny_folders, tmp_path, fake_data, caplog):
    fake_data.update(train=[f"t {i}" for i in range(6)], val=[f"v {i}" for i in range(9)])
    encode_dataset(data="fake", tokenizer=tiny_folders / "tok", out=tmp_path / "cache", max_items=5, device="cpu",
                   batch_size=2, shard_size=2, progress=False)  # val: 5 of 9 items, in 3 shards
    inputs = cache_inputs(data="fake")
    found = held_out_source((tmp_path / "cache",), data="fake", inputs=inputs, image_size=S, num_images=4)
    assert [found[i]["caption"] for i in range(len(found))] == ["v 0", "v 1", "v 2", "v 3"]
    with caplog.at_level(logging.INFO, logger="parti.cache"):
        assert held_out_source((tmp_path / "cache",), data="fake", inputs=inputs, image_size=S, num_images=6) is None
        assert held_out_source((tmp_path / "cache",), data="fake", inputs=inputs, image_size=64, num_images=4) is None
    assert "not the 6 asked for" in caplog.text and "not 64" in caplog.text
    train_only = encode_dataset(data="fake", tokenizer=tiny_folders / "tok", out=tmp_path / "train_only",
                                splits=("train",), device="cpu", progress=False)
    assert held_out_source((train_only,), data="fake", inputs=inputs, image_size=S, num_images=4) is None


def small_cache(tiny_folders, root: Path, fake_data) -> Path:
    """8 train and 4 val items with 16-wide text states, in shards of 4."""
    fake_data.update(train=[f"face {i} " + "word " * i for i in range(8)], val=[f"val {i}" for i in range(4)])
    return encode_dataset(data="fake", tokenizer=tiny_folders / "tok", out=root, text_encoder=WideEncoder(dim=16),
                          batch_size=4, shard_size=4, device="cpu", progress=False)


def test_reopen_hashes_only_files_whose_stamp_moved(tiny_folders, tmp_path, fake_data, monkeypatch):
    root = small_cache(tiny_folders, tmp_path / "cache", fake_data)
    hashed, record = [], cache_mod._file_record
    monkeypatch.setattr(cache_mod, "_file_record", lambda path: hashed.append(path.name) or record(path))
    CodeCache(root, "train")
    assert hashed == []  # as written: sizes and mtimes only
    CodeCache(root, "train", verify="full")
    assert len(hashed) == 8  # 2 shards x (codes, captions, text, text_len)
    hashed.clear()
    copy = shutil.copytree(root, tmp_path / "copy", copy_function=shutil.copy)  # a copy: every mtime moves
    CodeCache(copy, "train")
    assert len(hashed) == 8 and (copy / cache_mod.STAMPS).is_file()
    hashed.clear()
    cache = CodeCache(copy, "train")
    assert hashed == []  # the copy's stamps were kept: hashed once
    assert torch.equal(cache[5]["text"], WideEncoder.states_of(fake_data["train"][5], 16).half())

    path = copy / "train" / "text_00000.npy"  # a byte changed after encoding, the size kept
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(PartiError, match="checksum"):
        CodeCache(copy, "train")
    # The same edit with its mtime put back is what the cheap check cannot see; verify="full" does.
    stat = (root / "train" / "text_00000.npy").stat()
    (root / "train" / "text_00000.npy").write_bytes(bytes(data))
    os.utime(root / "train" / "text_00000.npy", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    CodeCache(root, "train")
    with pytest.raises(PartiError, match="checksum"):
        CodeCache(root, "train", verify="full")
    with pytest.raises(PartiError, match="verify must be one of"):
        CodeCache(root, "train", verify=True)


def rewrite(root: Path, name: str, array: np.ndarray) -> None:
    """Replace train/NAME and its manifest record, as a consistent (but wrong) writer would."""
    import json

    np.save(root / "train" / name, array)
    manifest = json.loads((root / "manifest.json").read_text())
    shard = next(s for s in manifest["splits"]["train"]["shards"] if name in s["files"])
    shard["files"][name] = {k: v for k, v in cache_mod._file_record(root / "train" / name).items() if k != "mtime_ns"}
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name, make, match", [
    ("text_len_00000.npy", lambda a: a + np.int32(1), "not adding up"),
    ("text_len_00000.npy", lambda a: np.zeros_like(a), "lengths below 1"),
    ("text_00000.npy", lambda a: a[:, :8], r"not \(tokens, 16\) float16"),
    ("text_00000.npy", lambda a: a.reshape(-1, 2, 8), r"not \(tokens, 16\) float16"),
])
def test_ragged_text_that_disagrees_with_its_lengths_is_refused(tiny_folders, tmp_path, fake_data, name, make,
                                                                match):
    root = small_cache(tiny_folders, tmp_path / "cache", fake_data)
    rewrite(root, name, make(np.load(root / "train" / name)))
    with pytest.raises(PartiError, match=match):
        CodeCache(root, "train")


def test_a_cache_of_the_padded_format_is_refused_in_one_line(tiny_folders, tmp_path, fake_data):
    import json

    root = small_cache(tiny_folders, tmp_path / "cache", fake_data)
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "version": 3}))
    with pytest.raises(PartiError, match=r"older parti \(manifest version 3.*re-run `parti encode`"):
        CodeCache(root, "train")


@pytest.mark.parametrize("capability, want", [((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16),
                                              ((7, 5), torch.float32)])
def test_t5_runs_in_bf16_where_the_gpu_has_fast_bf16_else_fp32(monkeypatch, capability, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert cache_mod.text_precision(torch.device("cuda", 0)) == want  # an A100 / H100 / T4, faked
    assert cache_mod.text_precision(torch.device("cpu")) == torch.float32


def test_the_encode_runs_the_text_encoder_in_the_chosen_precision(tiny_folders, tmp_path, fake_data, monkeypatch):
    fake_data.update(train=["a face", "another face"])
    encoder = WideEncoder(dim=16)
    args = dict(data="fake", tokenizer=tiny_folders / "tok", text_encoder=encoder, splits=("train",), device="cpu",
                progress=False)
    encode_dataset(out=tmp_path / "fp32", **args)
    assert encoder.seen == [torch.float32]
    assert CodeCache(tmp_path / "fp32").manifest["text_precision"] == "float32"
    monkeypatch.setattr(cache_mod, "text_precision", lambda device: torch.bfloat16)  # what an Ampere GPU gets
    encode_dataset(out=tmp_path / "bf16", **args)
    assert encoder.seen[-1] == torch.bfloat16
    cache = CodeCache(tmp_path / "bf16")
    assert cache.manifest["text_precision"] == "bfloat16" and cache[0]["text"].dtype == torch.float16


def test_images_are_decoded_in_worker_processes(tiny_folders, tmp_path, fake_data, monkeypatch):
    assert cache_mod.encode_workers(None, torch.device("cuda", 0)) == min(4, os.cpu_count() or 1)
    assert cache_mod.encode_workers(None, torch.device("cpu")) == 0  # the tokenizer needs the cores
    assert cache_mod.encode_workers(3, torch.device("cpu")) == 3
    loaders = []
    real = cache_mod.DataLoader
    monkeypatch.setattr(cache_mod, "DataLoader", lambda *a, **k: loaders.append(k) or real(*a, **k))
    fake_data.update(train=[f"face {i}" for i in range(6)], val=[f"val {i}" for i in range(3)])
    encode_dataset(data="fake", tokenizer=tiny_folders / "tok", out=tmp_path / "cache", batch_size=2, num_workers=1,
                   device="cpu", progress=False)
    assert [k["num_workers"] for k in loaders] == [1, 1]
    assert [CodeCache(tmp_path / "cache", "val")[i]["caption"] for i in range(3)] == fake_data["val"]


def test_a_frozen_t5s_cached_states_are_its_own_real_tokens(tiny_folders, tmp_path, fake_data):
    from t5folder import save_random_t5

    from parti.text import load_t5

    captions = ["a smiling woman with blond hair", "an old man", "a face", "a young man with short black hair",
                "a woman with glasses and a red background"]
    t5 = load_t5(str(save_random_t5(tmp_path / "t5", captions * 4, vocab_size=60, d_model=32, num_layers=1, d_kv=16)),
                 max_length=32)
    fake_data["train"] = captions
    encode_dataset(data="fake", tokenizer=tiny_folders / "tok", out=tmp_path / "cache", text_encoder=t5,
                   splits=("train",), batch_size=2, shard_size=2, device="cpu", progress=False)
    cache = CodeCache(tmp_path / "cache")
    assert len(cache.text) == 3  # shards of 2, 2, 1 rows
    for k in range(0, len(captions), 2):  # the encode's batches: the same float rounding
        states, mask = t5.encode(captions[k:k + 2])
        for i in range(len(states)):
            assert torch.equal(cache[k + i]["text"], states[i, :int(mask[i].sum())].half())
    states, mask = t5.encode(captions)
    batch = collate_codes([cache[i] for i in range(len(captions))])
    assert torch.equal(batch["text_mask"], mask[:, :batch["text"].shape[1]])
    assert torch.allclose(batch["text"].float(), states[:, :batch["text"].shape[1]], atol=2e-3)


def test_an_encode_killed_mid_shard_leaves_no_shard_and_the_next_one_cleans_up(tiny_folders, tmp_path, fake_data):
    class Killed(WideEncoder):
        def encode(self, captions):
            if len(self.seen) == 2:
                raise KeyboardInterrupt
            return super().encode(captions)

    fake_data["train"] = [f"face {i}" for i in range(8)]
    args = dict(data="fake", tokenizer=tiny_folders / "tok", out=tmp_path / "cache", splits=("train",),
                batch_size=2, device="cpu", progress=False)
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(text_encoder=Killed(dim=16), **args)
    names = sorted(p.name for p in (tmp_path / "cache" / "train").iterdir())
    assert names == [".codes_00000.npy.partial.tmp", ".text_00000.npy.partial.tmp", ".text_len_00000.npy.partial.tmp"]
    assert not cache_mod.is_cache(tmp_path / "cache")
    encode_dataset(text_encoder=WideEncoder(dim=16), **args)
    assert not list((tmp_path / "cache" / "train").glob(".*")) and len(CodeCache(tmp_path / "cache")) == 8
