"""Opening and reading a Hub-shaped parquet dataset: through `datasets.load_dataset` (the old path, which
writes an Arrow copy into its cache first) vs pyarrow in place (`parti.data.open_source`, `ParquetRows`).

The fixture has the captioned FFHQ's layout: data/train-0000k-of-00008-<hash>.parquet shards, row groups of
100 rows (as `datasets` writes image tables), columns `image` and `conditioning_image` (HF Image structs of PNG
bytes, faces with grain so they weigh what photos do) and `image_caption`, with the HF features in the schema metadata. Each path runs in a fresh process with
an empty HF_HOME and temp folder of its own; "old, warm" runs again on the old path's cache.

Measured per path: open (footers / the Arrow copy), a pass over every train row's cells (no decoding), a pass
decoding every train item to a (3, 128, 128) tensor (what training reads), and the bytes the process wrote:
`wchar` from /proc/self/io (all write calls) and the size of what was left under HF_HOME and the temp folder.

    python benchmarks/bench_table_read.py               # 2000 rows x 128 px in 8 shards
    python benchmarks/bench_table_read.py --rows 400    # quicker
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

import common  # noqa: I001 - puts the repository on sys.path
from parti import synthetic
from parti.data import VAL_EVERY, TableSource, open_source

SIZE, SHARDS, GROUP_ROWS = 128, 8, 100
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
FEATURES = {"image": {"_type": "Image"}, "conditioning_image": {"_type": "Image"},
            "image_caption": {"dtype": "string", "_type": "Value"}}


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_fixture(folder: Path, rows: int) -> int:
    """The shards; returns their total size in bytes."""
    (folder / "data").mkdir(parents=True)
    schema = pa.schema([("image", IMAGE), ("conditioning_image", IMAGE), ("image_caption", pa.string())],
                       metadata={"huggingface": json.dumps({"info": {"features": FEATURES}})})
    per = -(-rows // SHARDS)
    for s in range(SHARDS):
        records = []
        for i in range(s * per, min(rows, (s + 1) * per)):
            face = synthetic.render_face(synthetic.sample_attributes(random.Random(i)), SIZE)
            grain = np.random.default_rng(i).integers(-6, 7, (SIZE, SIZE, 3))  # photo-like PNG sizes (~30 KB)
            face = Image.fromarray(np.clip(np.asarray(face, dtype=np.int16) + grain, 0, 255).astype(np.uint8))
            records.append({"image": {"bytes": _png(face), "path": None},
                            "conditioning_image": {"bytes": _png(face.convert("L").rotate(90)), "path": None},
                            "image_caption": f"a face, number {i}"})
        pq.write_table(pa.Table.from_pylist(records, schema=schema),
                       folder / "data" / f"train-{s:05d}-of-{SHARDS:05d}-0a1b2c3d{s}.parquet", row_group_size=GROUP_ROWS)
    return sum(f.stat().st_size for f in (folder / "data").iterdir())


def _wchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


def _open_old(folder: Path):
    """The path parti took before: load_dataset("parquet") (the Arrow copy), then the columns it read."""
    import datasets

    files = sorted(str(p) for p in (folder / "data").glob("*.parquet"))
    table = datasets.load_dataset("parquet", data_files={"train": files})["train"]
    table = table.cast_column("image", datasets.Image(decode=False)).select_columns(["image", "image_caption"])
    n = len(table)
    kept = np.arange(n)[np.arange(n) % VAL_EVERY != VAL_EVERY - 1]
    return TableSource(table, kept, image_column="image", caption_column="image_caption", name="old",
                       split="train", image_size=SIZE, roots=(folder,))


def child(path: str, folder: Path) -> dict:
    """One path in this (fresh) process: timings and what it wrote."""
    w0, t0 = _wchar(), time.perf_counter()
    source = _open_old(folder) if path == "old" else open_source(f"hf:{folder}", image_size=SIZE)
    t1 = time.perf_counter()
    for r in source.rows:
        source.table[int(r)]
    t2 = time.perf_counter()
    decoded = sum(source[i] is not None for i in range(len(source)))
    t3 = time.perf_counter()
    return {"items": len(source), "decoded": decoded, "open_s": t1 - t0, "cells_s": t2 - t1, "decode_s": t3 - t2,
            "wchar": _wchar() - w0}


def _tree_bytes(*roots: Path) -> int:
    return sum(p.stat().st_size for r in roots for p in r.rglob("*") if p.is_file() and not p.is_symlink())


def run(path: str, folder: Path, home: Path) -> dict:
    tmp = home / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HOME": str(home / "hf"), "TMPDIR": str(tmp), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "PYTHONPATH": str(common.ROOT)}
    out = subprocess.run([sys.executable, __file__, "--child", path, "--data", str(folder)], env=env,
                         capture_output=True, text=True, check=True)
    record = json.loads(out.stdout.strip().splitlines()[-1])
    record["left_on_disk"] = _tree_bytes(home)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--child", choices=["old", "new"])
    parser.add_argument("--data", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.data)))
        return
    info = common.setup()
    with tempfile.TemporaryDirectory(prefix="bench-table-") as tmp:
        folder = Path(tmp) / "ffhq_like"
        shard_bytes = write_fixture(folder, args.rows)
        results = {"new": run("new", folder, Path(tmp) / "home_new"),
                   "old, cold": run("old", folder, Path(tmp) / "home_old"),
                   "old, warm": run("old", folder, Path(tmp) / "home_old")}
    rows = [[name, str(r["items"]), common.fmt_s(r["open_s"]), common.fmt_s(r["cells_s"]), common.fmt_s(r["decode_s"]),
             f"{r['wchar'] / 2**20:.1f}", f"{r['left_on_disk'] / 2**20:.1f}"] for name, r in results.items()]
    print(common.table(["path", "items", "open", "read cells", "read + decode", "MiB written", "MiB left on disk"],
                       rows, title=f"{args.rows} rows x {SIZE} px PNG in {SHARDS} shards "
                                   f"({shard_bytes / 2**20:.1f} MiB of parquet); {common.describe(info)}"))
    common.emit_json({"bench": "table_read", "rows": args.rows, "shards": SHARDS, "shard_bytes": shard_bytes,
                      **{name.replace(", ", "_"): r for name, r in results.items()}})


if __name__ == "__main__":
    main()
