"""Tables read with pyarrow where they lie (issue 27): parquet shards in the Hub's layout, several row groups a
shard, read a row group and only the needed columns at a time, nothing written to disk, no `datasets` import.
Fixtures are written with pyarrow directly, with and without the features `datasets` keeps in the schema."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from parti.data import ParquetRows, UnreadableImageWarning, open_source, to_tensor
from parti.errors import PartiError

S = 8
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # how an HF Image column is stored
HF_FEATURES = {"image": {"_type": "Image"}, "conditioning_image": {"_type": "Image"},
               "image_caption": {"dtype": "string", "_type": "Value"}}


def png(i: int) -> bytes:
    """A solid 8x8 picture whose colour says its row."""
    buf = io.BytesIO()
    Image.new("RGB", (S, S), (i % 256, i // 256 * 40, 77)).save(buf, format="PNG")
    return buf.getvalue()


def hub_rows(n: int) -> list[dict]:
    return [{"image": {"bytes": png(i), "path": None}, "conditioning_image": {"bytes": png(255 - i % 256), "path": None},
             "image_caption": f"face {i}"} for i in range(n)]


def write_shards(folder: Path, rows: list[dict], *, shards: int, group_rows: int, features: bool = True,
                 split: str = "train") -> list[Path]:
    """`rows` as the Hub lays them out: data/SPLIT-0000k-of-0000N-<hash>.parquet, row groups of `group_rows`."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("image", IMAGE), ("conditioning_image", IMAGE), ("image_caption", pa.string())])
    if features:
        schema = schema.with_metadata({"huggingface": json.dumps({"info": {"features": HF_FEATURES}})})
    per, paths = -(-len(rows) // shards), []
    for s in range(shards):
        path = folder / "data" / f"{split}-{s:05d}-of-{shards:05d}-9f3a2c{s}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[s * per:(s + 1) * per], schema=schema), path,
                       row_group_size=group_rows)
        paths.append(path)
    return paths


def spoil_column(path: Path, column: str, row_group: int | None = None) -> None:
    """Overwrite the bytes of `column`'s chunks (every row group's, or one's) in place: reading them fails."""
    meta = pq.ParquetFile(path).metadata
    with open(path, "r+b") as f:
        for g in range(meta.num_row_groups) if row_group is None else [row_group]:
            for j in range(meta.num_columns):
                chunk = meta.row_group(g).column(j)
                if chunk.path_in_schema.split(".")[0] == column:
                    start = chunk.dictionary_page_offset or chunk.data_page_offset
                    f.seek(start)
                    f.write(b"\xff" * chunk.total_compressed_size)


@pytest.mark.parametrize("features", [True, False], ids=["hf-features", "bare-schema"])
def test_hub_shards_read_by_row_in_any_order(tmp_path, features):
    rows = hub_rows(150)
    files = write_shards(tmp_path / "ds", rows, shards=3, group_rows=7, features=features)  # 3 x 8 groups
    table = ParquetRows(files, spec="x")
    assert len(table) == 150 and len(table.starts) - 1 == 3 * 8
    assert table.locate(49) == (7, 0) and table.locate(50) == (8, 0) and table.locate(56) == (8, 6)
    order = np.random.default_rng(0).permutation(150)
    assert all(table[int(r)] == rows[r] for r in order)  # every column, as written
    train = open_source(f"hf:{tmp_path / 'ds'}", image_size=S)
    val = open_source(f"hf:{tmp_path / 'ds'}", split="val", image_size=S)
    assert (len(train), len(val)) == (143, 7)  # no val shards: every 20th row is val
    for i in np.random.default_rng(1).permutation(len(train))[:40]:
        row = int(train.rows[i])
        item = train[int(i)]
        assert item["caption"] == f"face {row}"
        assert torch.equal(item["image"], to_tensor(Image.open(io.BytesIO(png(row))), S))  # `image`, not the condition
    assert [val[i]["caption"] for i in range(len(val))] == [f"face {r}" for r in range(19, 150, 20)]


def test_a_named_val_split_is_used(tmp_path):
    rows = hub_rows(60)
    write_shards(tmp_path / "ds", rows[:40], shards=2, group_rows=9)
    write_shards(tmp_path / "ds", rows[40:], shards=1, group_rows=9, split="test")
    train = open_source(str(tmp_path / "ds"), image_size=S)
    val = open_source(str(tmp_path / "ds"), split="val", image_size=S)
    assert (len(train), len(val)) == (40, 20) and val[0]["caption"] == "face 40"


def test_only_the_needed_columns_are_read(tmp_path):
    """The condition column's bytes on disk are garbage: reading it fails, yet every item reads."""
    files = write_shards(tmp_path / "ds", hub_rows(60), shards=2, group_rows=8)
    for f in files:
        spoil_column(f, "conditioning_image")
    with pytest.raises((OSError, pa.ArrowException)):
        pq.read_table(files[0], columns=["conditioning_image"])
    source = open_source(f"hf:{tmp_path / 'ds'}", image_size=S)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnreadableImageWarning)
        items = [source[i] for i in range(len(source))]
    assert all(it is not None for it in items) and source.table.columns == ["image", "image_caption"]


def test_a_damaged_row_group_skips_its_rows_only(tmp_path):
    files = write_shards(tmp_path / "ds", hub_rows(40), shards=1, group_rows=10)
    spoil_column(files[0], "image", row_group=1)  # rows 10-19
    source = open_source(str(files[0]), image_size=S, caption_column="none")
    with pytest.warns(UnreadableImageWarning, match="row group 1 of .*train-00000"):
        items = [source[i] for i in range(len(source))]
    assert [int(source.rows[i]) for i, it in enumerate(items) if it is None] == list(range(10, 19))  # 19 is val


def tree(*roots: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for r in roots if r.exists() for p in r.rglob("*")}


def test_opening_and_reading_a_table_writes_nothing(tmp_path, monkeypatch):
    """No Arrow copy: the folders a cache could go to (HF_HOME, the temp folder, the working folder, the
    dataset's) are as they were after a table is opened and read through, in both splits."""
    write_shards(tmp_path / "ds", hub_rows(50), shards=2, group_rows=6)
    for sub in ("tmp", "cwd"):
        (tmp_path / sub).mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.chdir(tmp_path / "cwd")
    hf_home = Path(os.environ["HF_HOME"])  # conftest's: where the datasets cache would be
    before = tree(tmp_path, hf_home)
    for split in ("train", "val"):
        source = open_source(f"hf:{tmp_path / 'ds'}", split=split, image_size=S)
        assert all(source[i] is not None for i in range(len(source)))
    assert tree(tmp_path, hf_home) == before and not (hf_home / "datasets").exists()


def test_no_reading_path_imports_datasets(tmp_path):
    """hf:, a .parquet file and an imagefolder read in a fresh process that never imports `datasets`."""
    write_shards(tmp_path / "ds", hub_rows(30), shards=2, group_rows=6)
    (tmp_path / "imf").mkdir()
    with open(tmp_path / "imf" / "metadata.jsonl", "w") as f:
        for i in range(20):
            Image.open(io.BytesIO(png(i))).save(tmp_path / "imf" / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"face {i}"}) + "\n")
    code = ("import sys; from parti.data import open_source\n"
            f"for spec in ['hf:{tmp_path / 'ds'}', '{tmp_path / 'ds' / 'data'}', '{tmp_path / 'imf'}']:\n"
            "    s = open_source(spec, image_size=8); assert s[len(s) - 1]['caption'].startswith('face')\n"
            "print('datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_the_row_group_cache_is_bounded_in_bytes(tmp_path):
    files = write_shards(tmp_path / "ds", hub_rows(120), shards=2, group_rows=10)  # 12 groups
    reads = []

    def counting(table: ParquetRows) -> ParquetRows:
        read = table._read
        table._read = lambda group, columns: reads.append(group) or read(group, columns)
        return table

    table = counting(ParquetRows(files, spec="x"))
    table.select(["image", "image_caption"])
    group_bytes = table._group(0).nbytes
    table.cache_bytes = 3 * group_bytes + group_bytes // 2  # room for three groups
    table.select(["image", "image_caption"])  # empties the cache
    reads.clear()
    for r in range(120):  # in order: each group decoded once
        table[r]
    assert reads == list(range(12)) and len(table._cache) == 3
    assert sum(t.nbytes for t in table._cache.values()) <= table.cache_bytes
    reads.clear()
    for r in (119, 105, 95, 0):  # the last three groups are kept; the first was dropped
        table[r]
    assert reads == [0]
    table.cache_bytes = 0  # even with no room, the group just read is kept
    table[50]
    assert list(table._cache) == [5]


def test_a_truncated_shard_is_one_line_naming_it(tmp_path, capsys):
    from parti.cli import main

    files = write_shards(tmp_path / "ds", hub_rows(40), shards=2, group_rows=10)
    files[1].write_bytes(files[1].read_bytes()[: files[1].stat().st_size // 2])
    with pytest.raises(PartiError) as err:
        open_source(f"hf:{tmp_path / 'ds'}", image_size=S)
    message = str(err.value)
    assert "\n" not in message and str(files[1]) in message and "damaged" in message
    code = main(["train-tokenizer", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "run"), "--cpu"])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # logged lines may precede the error's one line
    assert code == 2 and last.startswith("parti: error: ") and str(files[1]) in last


def test_dataloader_workers_read_the_same_batches(tmp_path):
    """Forked workers open the shards themselves (no shared file position) and read what one process reads."""
    from parti.batches import batch_stream
    from parti.data import collate

    write_shards(tmp_path / "ds", hub_rows(60), shards=2, group_rows=7)
    source = open_source(f"hf:{tmp_path / 'ds'}", image_size=S)
    source[0]  # the parent has open files and a cached group when the workers fork

    def epoch(workers: int) -> list[tuple[list[int], list[str], torch.Tensor]]:
        stream = batch_stream(source, collate, batch_size=8, seed=3, epoch=0, start=0, num_workers=workers)
        return [(b["index"].tolist(), b["caption"], b["image"]) for _, _, b in (next(stream) for _ in range(7))]

    one, two = epoch(0), epoch(2)
    assert all(a[:2] == b[:2] and torch.equal(a[2], b[2]) for a, b in zip(one, two))
    captions = [c for _, batch, _ in one for c in batch]  # 57 train rows: 7 batches of 8, distinct
    assert len(set(captions)) == 56 and set(captions) <= {f"face {int(r)}" for r in source.rows}
