"""One training step of each demo stage, timed: the tokenizer and the generator (with the trainable text
encoder) at the presets and batch `parti demo` trains, and a matmul probe that shows which kernels run.

Run it twice to compare ISAs on one machine (the limits take effect when the probe's GFLOP/s drop):

    python benchmarks/bench_demo_steps.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/bench_demo_steps.py

Options: --tokenizer PRESET --generator PRESET --batch N --dim N (a generator width override). One JSON line last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch


def matmul_gflops(n: int = 512, repeats: int = 50) -> float:
    a = torch.randn(n, n)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return repeats * 2 * n**3 / (time.perf_counter() - t0) / 1e9


def timed(step, n: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def main() -> None:
    from parti.generator import build_generator
    from parti.losses import LossConfig, TokenizerLoss
    from parti.optim import make_adamw
    from parti.text import TEXT_ENCODER_PRESETS, ByteTokenizer, TrainableTextEncoder
    from parti.tokenizer import build_tokenizer
    from parti.train_generator import Objective

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default="demo")
    parser.add_argument("--generator", default="demo")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    probe = matmul_gflops()

    tok = build_tokenizer(args.tokenizer)
    size = tok.config.image_size
    loss_fn = TokenizerLoss(LossConfig(perceptual_weight=0, adversarial_weight=0), image_size=size)
    opt = make_adamw(tok.parameters(), lr=1e-3, weight_decay=0.0)
    x = torch.rand(args.batch, 3, size, size) * 2 - 1

    def tokenizer_step():
        res = tok(x)
        loss, _ = loss_fn.generator_loss(x, res.reconstruction, commit_loss=res.commit_loss, step=0,
                                         last_layer=tok.last_layer)
        opt.zero_grad()
        loss.backward()
        opt.step()

    config = dataclasses.replace(TEXT_ENCODER_PRESETS["tiny"], tokenizer="bytes", vocab_size=ByteTokenizer.vocab_size)
    encoder = TrainableTextEncoder(config)
    gen = build_generator(args.generator, num_codes=tok.config.codebook_size, grid_size=tok.config.grid_size,
                          text_dim=encoder.dim, **({} if args.dim is None else {"dim": args.dim}))
    objective = Objective(gen, encoder)
    opt_g = make_adamw(objective.parameters(), lr=1e-3, weight_decay=0.05)
    codes = torch.randint(0, tok.config.codebook_size, (args.batch, tok.config.grid_size ** 2))
    ids, mask = encoder.tokenizer(["a smiling person with long red hair and glasses on a blue background"] * args.batch)
    drop = torch.zeros(args.batch, dtype=torch.bool)

    def generator_step():
        loss = objective(codes, ids, mask, drop)
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()

    t_tok, t_gen = timed(tokenizer_step), timed(generator_step)
    params = sum(p.numel() for p in gen.parameters())
    print(f"matmul probe {probe:.0f} GFLOP/s (fp32, 512x512)")
    print(f"tokenizer {args.tokenizer} step, batch {args.batch}: {t_tok * 1e3:.1f} ms")
    print(f"generator {args.generator} ({params / 1e6:.2f}M) step, batch {args.batch}: {t_gen * 1e3:.1f} ms")
    print(json.dumps({"matmul_gflops": round(probe, 1), "tokenizer_step_ms": round(t_tok * 1e3, 1),
                      "generator_step_ms": round(t_gen * 1e3, 1), "generator_params": params,
                      "tokenizer": args.tokenizer, "generator": args.generator, "batch": args.batch}))


if __name__ == "__main__":
    main()
