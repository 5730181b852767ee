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
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import common  # noqa: I001 - puts the repository on sys.path
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
    args = p.parse_args(argv)
    args.images = args.images or (32 if args.quick else 64)
    args.repeats = args.repeats or (2 if args.quick else 3)
    return args


def main(argv=None):
    args = parse_args(argv)
    info = common.setup(args.threads)
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
