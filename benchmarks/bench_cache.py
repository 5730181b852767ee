"""Stage-2 epoch time: training from the code cache vs running the frozen encoders on every batch.

Both paths train the reference generator (build_generator("bench"), batch 8, loss + backward + AdamW) on
the same images and captions in the same order:

- cache: a real cache folder written once by `parti.cache.encode_dataset` (uint16 codes, fp16 text states),
  read back through `CodeCache` + `collate_codes` in a DataLoader (what stage 2 does);
- per batch: the images (already decoded in memory, so image loading costs nothing here) go through
  build_tokenizer("base").encode and the captions through a frozen text encoder, every step.

The text encoder is a T5 encoder with t5-v1_1-base's shapes (12 layers, 768 wide, gated-GELU) and random
weights over a byte vocabulary: the anchor's default T5 at the reference width, with nothing downloaded.

    python benchmarks/bench_cache.py            # 64 images, 3 alternating epochs each (~4 min on 2 cores)
    python benchmarks/bench_cache.py --quick    # 32 images, 2 epochs each

--reopen measures instead what opening a cache costs (`CodeCache(verify=...)`) on one of realistic size, written
directly with random contents: `--rows` items (default 40,000: captioned FFHQ), 256 codes each, ragged fp16 text
states of width `--dim` (1024: t5-large) and `--tokens` real tokens on average, shards of 10,000 rows:

    python benchmarks/bench_cache.py --reopen                    # ~2.5 GB in a temporary folder (--dir to choose)
    python benchmarks/bench_cache.py --reopen --rows 4000        # ~0.25 GB

The files were just written, so they are read from the page cache: the "full" figures are the hashing cost
alone, a lower bound for a cache read from a network disk (Google Drive: tens of MB/s).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import common  # noqa: I001 - puts the repository on sys.path
from parti import cache as cache_mod
from parti.cache import CodeCache, collate_codes, encode_dataset
from parti.data import open_source
from parti.generator import build_generator
from parti.text import ByteTokenizer
from parti.tokenizer import build_tokenizer, save_tokenizer

TEXT_LEN = 32


class RandomT5Base:
    """A frozen text encoder with t5-v1_1-base's compute: `encode(captions) -> (B, L, 768), (B, L)`."""

    trainable = False

    def __init__(self, *, max_length: int = TEXT_LEN, seed: int = 0):
        from transformers import T5Config, T5EncoderModel

        torch.manual_seed(seed)
        self.tokenizer = ByteTokenizer(max_length=max_length)
        config = T5Config(vocab_size=ByteTokenizer.vocab_size, d_model=768, d_kv=64, d_ff=2048, num_layers=12,
                          num_heads=12, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                          pad_token_id=ByteTokenizer.pad_id, eos_token_id=ByteTokenizer.eos_id)
        self.model = T5EncoderModel(config).eval().requires_grad_(False)
        self.dim, self.max_length = 768, max_length

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(texts)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return states * mask[..., None].to(states.dtype), mask

    def identity(self) -> dict:
        return {"kind": "bench", "name": "random-t5-v1_1-base-shape", "dim": self.dim, "max_length": self.max_length}


def train_step(gen, opt, codes, states, mask, rng):
    drop = torch.rand(codes.shape[0], generator=rng) < gen.config.cond_drop_prob
    ctx, ctx_mask = gen.encode_condition(states.float(), mask, drop=drop)
    logits = gen(codes, ctx, ctx_mask)
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--images", type=int, default=None, help="images per epoch (default 64, quick 32)")
    p.add_argument("--repeats", type=int, default=None, help="epochs per path (default 3, quick 2)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reopen", action="store_true", help="measure opening a cache of realistic size instead")
    p.add_argument("--rows", type=int, default=40_000, help="--reopen: items in the cache")
    p.add_argument("--dim", type=int, default=1024, help="--reopen: text state width")
    p.add_argument("--tokens", type=int, default=30, help="--reopen: mean real tokens per caption")
    p.add_argument("--dir", default=None, help="--reopen: where to write the cache (default: a temporary folder)")
    args = p.parse_args(argv)
    args.images = args.images or (32 if args.quick else 64)
    args.repeats = args.repeats or (2 if args.quick else 3)
    return args


def write_cache(root: Path, *, rows: int, dim: int, tokens: int, seed: int = 0) -> int:
    """A train split of `rows` random items written as `encode_dataset` writes them (`_ShardWriter`), and its
    manifest; returns the bytes of its shard files."""
    rng = np.random.default_rng(seed)
    writer = cache_mod._ShardWriter(root / "train", shard_size=10_000, tokens=256, text_dim=dim, image_size=None)
    for start in range(0, rows, 256):
        b = min(256, rows - start)
        lengths = rng.integers(tokens // 2, tokens * 3 // 2 + 1, b).astype(np.int32)
        states = rng.standard_normal((int(lengths.sum()), dim), dtype=np.float32).astype(np.float16)
        writer.add(codes=rng.integers(0, 8192, (b, 256), dtype=np.uint16), text=states, text_len=lengths,
                   captions=[f"a face, number {start + i}" for i in range(b)])
    writer.flush()
    manifest = {"kind": "code_cache", "version": cache_mod.MANIFEST_VERSION, "data": "bench", "tokenizer": "bench",
                "tokenizer_fingerprint": "bench", "image_size": 256, "grid_size": 16, "num_codes": 8192,
                "text_encoder": {"kind": "bench", "dim": dim}, "text_dim": dim, "holdout": False,
                "inputs": {"data": "bench"}, "splits": {"train": {"count": rows, "shards": writer.shards}}}
    cache_mod.write_json(root / cache_mod.MANIFEST, manifest)
    return sum(f["bytes"] for shard in writer.shards for f in shard["files"].values())


def reopen(args, info) -> None:
    """Time `CodeCache(root, "train", verify=...)` for each mode, and the first and second reopen of a copy."""
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "cache"
        t0 = time.perf_counter()
        size = write_cache(root, rows=args.rows, dim=args.dim, tokens=args.tokens)
        common.log(f"wrote {size / 1e9:.2f} GB ({args.rows} rows) in {time.perf_counter() - t0:.1f} s")
        times: dict[str, list[float]] = {}

        def timed(name: str, verify: str) -> None:
            t = time.perf_counter()
            CodeCache(root, "train", verify=verify)
            times.setdefault(name, []).append(time.perf_counter() - t)

        for _ in range(args.repeats):
            for verify in cache_mod.VERIFY:
                timed(verify, verify)
        for _ in range(args.repeats):  # a copy (Drive to local, rsync without -t): every mtime moves
            (root / cache_mod.STAMPS).unlink(missing_ok=True)
            for path in (root / "train").iterdir():
                os.utime(path, ns=(time.time_ns(), time.time_ns()))
            timed("copied, 1st open", "changed")
            timed("copied, 2nd open", "changed")
    med = {name: sorted(xs)[len(xs) // 2] for name, xs in times.items()}
    labels = {"full": "verify='full' (every file hashed: every reopen before)", "changed": "verify='changed' (default)",
              "size": "verify='size'", "copied, 1st open": "a copy, 1st open (hashed, stamps kept)",
              "copied, 2nd open": "a copy, 2nd open"}
    print(f"\nMachine: {common.describe(info)}")
    print(common.table(["reopen", "median", "per GB"],
                       [[labels[n], common.fmt_s(t), common.fmt_s(t / (size / 1e9))] for n, t in med.items()],
                       title=f"CodeCache reopen, {args.rows} rows, text {args.dim} wide, {size / 1e9:.2f} GB, "
                             f"{args.repeats} repeats"))
    common.emit_json({"benchmark": "cache_reopen", "machine": info, "rows": args.rows, "dim": args.dim,
                      "tokens": args.tokens, "bytes": size, "repeats": args.repeats, "median_s": med,
                      "seconds_per_gb": {n: t / (size / 1e9) for n, t in med.items()}})


def main(argv=None):
    args = parse_args(argv)
    info = common.setup(args.threads)
    if args.reopen:
        return reopen(args, info)
    tok = build_tokenizer("base").eval()
    text = RandomT5Base()
    gen = build_generator("bench")
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-4)
    rng = torch.Generator().manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_tokenizer(tok, tmp / "tokenizer")
        common.log(f"building the cache of {args.images} synthetic faces (one-off)")
        t0 = time.perf_counter()
        encode_dataset(data="synthetic", tokenizer=tmp / "tokenizer", out=tmp / "cache", text_encoder=text,
                       splits=("train",), batch_size=args.batch, synthetic_length=args.images,
                       max_items=args.images, progress=False, device="cpu")
        build_s = time.perf_counter() - t0
        cache = CodeCache(tmp / "cache", "train")
        cache.check(tokenizer_fingerprint=tok.fingerprint(), text_identity=text.identity())

        # The same images, decoded once into memory, for the per-batch path.
        source = open_source("synthetic", split="train", image_size=tok.config.image_size,
                             synthetic_length=args.images)
        items = [source[i] for i in range(args.images)]
        images = torch.stack([it["image"] for it in items])
        captions = [it["caption"] or "" for it in items]
        if captions != [cache[i]["caption"] for i in range(args.images)]:
            raise RuntimeError("cache and source disagree on the captions; the comparison would be unfair")

        epoch = [0]

        def order() -> list[list[int]]:
            perm = torch.randperm(args.images, generator=torch.Generator().manual_seed(epoch[0])).tolist()
            return [perm[i:i + args.batch] for i in range(0, args.images, args.batch)]

        class Batches(torch.utils.data.Sampler):
            def __iter__(self):
                return iter(order())

            def __len__(self):
                return -(-args.images // args.batch)

        def from_cache():
            loader = DataLoader(cache, batch_sampler=Batches(), collate_fn=collate_codes)
            for batch in loader:
                train_step(gen, opt, batch["codes"], batch["text"], batch["text_mask"], rng)
            epoch[0] += 1

        encoder_s = []

        def per_batch():
            for idx in order():
                t = time.perf_counter()
                with torch.no_grad():
                    codes = tok.encode(images[idx]).flatten(1)
                    states, mask = text.encode([captions[i] for i in idx])
                encoder_s.append(time.perf_counter() - t)
                train_step(gen, opt, codes, states, mask, rng)
            epoch[0] += 1

        common.log(f"{args.repeats} alternating epochs per path, {args.images} images, batch {args.batch}")
        s = common.alternate({"cache": from_cache, "per_batch": per_batch}, repeats=args.repeats, warmup=1,
                             log=common.log)

    ratio = common.paired_ratio(s["per_batch"], s["cache"])
    steps = -(-args.images // args.batch)
    enc = sorted(encoder_s)[len(encoder_s) // 2]
    print(f"\nMachine: {common.describe(info)}")
    print(f"Text encoder: random T5 encoder of t5-v1_1-base shape, {common.num_params(text.model) / 1e6:.0f}M "
          f"parameters; tokenizer 'base' {common.num_params(tok) / 1e6:.1f}M; generator 'bench' "
          f"{common.num_params(gen) / 1e6:.1f}M")
    print(f"One-off cache build ({args.images} synthetic faces rendered, encoded, written): {common.fmt_s(build_s)}\n")
    print(common.table(
        ["path", "epoch median", "IQR", "per step", "peak MiB"],
        [["from the cache", common.fmt_s(s["cache"].median), common.fmt_spread(s["cache"]),
          common.fmt_s(s["cache"].median / steps), common.fmt_mib(s["cache"].peak)],
         ["encoders per batch", common.fmt_s(s["per_batch"].median), common.fmt_spread(s["per_batch"]),
          common.fmt_s(s["per_batch"].median / steps), common.fmt_mib(s["per_batch"].peak)]],
        title=f"Stage-2 epoch, {args.images} images, batch {args.batch} ({steps} steps)"))
    print(f"\nper-batch / cache epoch time (paired): {common.fmt_ratio(ratio)}; "
          f"tokenizer + text encoder per batch: {common.fmt_s(enc)} (median)")
    common.emit_json({"benchmark": "cache", "machine": info, "threads": args.threads, "quick": args.quick,
                      "images": args.images, "batch": args.batch, "cache_build_s": build_s,
                      "cache": common.summary(s["cache"]), "per_batch": common.summary(s["per_batch"]),
                      "ratio_per_batch_over_cache": ratio, "encoders_per_batch_median_s": enc})


if __name__ == "__main__":
    main()
