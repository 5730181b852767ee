"""One training step of each CPU demo stage, timed: the tokenizer and the generator (with its trainable
text encoder and the BPE vocabulary learned from the synthetic captions) at the presets, batches and
captions `parti demo` trains with, and a matmul probe that shows which kernels run.

Run it twice to compare ISAs on one machine (the limits take effect when the probe's GFLOP/s drop):

    python benchmarks/bench_demo_steps.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/bench_demo_steps.py

--compile also times each step with its forward and loss under `torch.compile` (the backward through
AOTAutograd), after the compilation, which it reports. --dim N overrides the generator's width. One JSON
line last.
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


def tokenizer_step_fn(preset: str, batch: int, compiled: bool):
    from parti.losses import LossConfig, TokenizerLoss
    from parti.optim import make_adamw
    from parti.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(preset)
    size = tok.config.image_size
    loss_fn = TokenizerLoss(LossConfig(perceptual_weight=0, adversarial_weight=0), image_size=size)
    opt = make_adamw(tok.parameters(), lr=1e-3, weight_decay=0.0)
    x = torch.rand(batch, 3, size, size) * 2 - 1

    def loss_of(images):
        res = tok(images)
        loss, _ = loss_fn.generator_loss(images, res.reconstruction, commit_loss=res.commit_loss, step=0,
                                         last_layer=tok.last_layer)
        return loss

    forward = torch.compile(loss_of) if compiled else loss_of

    def step():
        loss = forward(x)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def generator_step_fn(gen_cfg, dim: int | None, compiled: bool):
    """gen_cfg: the demo's GeneratorTrainConfig (preset, batch, text encoder and vocabulary)."""
    from parti.generator import build_generator
    from parti.optim import make_adamw
    from parti.synthetic import SyntheticFaces
    from parti.train_generator import Objective, _trainable_text_encoder

    torch.manual_seed(0)
    batch = gen_cfg.batch_size
    faces = SyntheticFaces(length=2000, size=32)
    captions = [faces[i]["caption"] for i in range(len(faces))]
    encoder = _trainable_text_encoder(gen_cfg, captions, "cpu", None)  # as the trainer builds it
    gen = build_generator(gen_cfg.preset, text_dim=encoder.dim, **({} if dim is None else {"dim": dim}))
    objective = Objective(gen, encoder)
    opt = make_adamw(objective.parameters(), lr=1e-3, weight_decay=0.05)
    codes = torch.randint(0, gen.config.num_codes, (batch, gen.config.seq_len))
    ids, mask = encoder.tokenizer(captions[:batch])
    drop = torch.zeros(batch, dtype=torch.bool)
    forward = torch.compile(objective) if compiled else objective

    def step():
        loss = forward(codes, ids, mask, drop)
        opt.zero_grad()
        loss.backward()
        opt.step()

    params = sum(p.numel() for p in gen.parameters())
    return step, params, ids.shape[1]


def main() -> None:
    from parti.demo import DemoConfig, stage_configs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=None, help="a generator width override")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time the steps under torch.compile")
    parser.add_argument("--word-pieces", action="store_true",
                        help="also time the generator step with captions in word pieces (phrase_pieces off)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    probe = matmul_gflops()
    tok_cfg, gen_cfg = stage_configs(DemoConfig(progress=False), "cpu")  # the demo's settings; nothing is written
    result = {"matmul_gflops": round(probe, 1), "tokenizer": tok_cfg.preset, "generator": gen_cfg.preset,
              "tokenizer_batch": tok_cfg.batch_size, "generator_batch": gen_cfg.batch_size}
    print(f"matmul probe {probe:.0f} GFLOP/s (fp32, 512x512)")
    for compiled in (False, True) if args.compile else (False,):
        tag = "_compiled" if compiled else ""
        t0 = time.perf_counter()
        tok_step = tokenizer_step_fn(tok_cfg.preset, tok_cfg.batch_size, compiled)
        tok_step()  # compiles, when compiled
        first = time.perf_counter() - t0
        t_tok = timed(tok_step)
        t0 = time.perf_counter()
        gen_step, params, text_len = generator_step_fn(gen_cfg, args.dim, compiled)
        gen_step()
        first_g = time.perf_counter() - t0
        t_gen = timed(gen_step)
        label = " (compiled)" if compiled else ""
        print(f"tokenizer {tok_cfg.preset} step{label}, batch {tok_cfg.batch_size}: {t_tok * 1e3:.1f} ms"
              + (f" (first step with compilation {first:.1f} s)" if compiled else ""))
        print(f"generator {gen_cfg.preset} ({params / 1e6:.2f}M, captions of {text_len} tokens) step{label}, "
              f"batch {gen_cfg.batch_size}: {t_gen * 1e3:.1f} ms"
              + (f" (first step with compilation {first_g:.1f} s)" if compiled else ""))
        result.update({f"tokenizer_step_ms{tag}": round(t_tok * 1e3, 1), f"generator_step_ms{tag}": round(t_gen * 1e3, 1),
                       "generator_params": params, "text_tokens": text_len})
        if args.word_pieces and not compiled:
            words_step, _, words_len = generator_step_fn(dataclasses.replace(gen_cfg, phrase_pieces=False), args.dim,
                                                         False)
            words_step()
            t_words = timed(words_step)
            print(f"generator step with word pieces (captions of {words_len} tokens): {t_words * 1e3:.1f} ms "
                  f"({t_words / t_gen:.2f}x the phrase pieces' time)")
            result.update({"generator_step_ms_word_pieces": round(t_words * 1e3, 1), "text_tokens_word_pieces": words_len})
        if compiled:
            result.update({"tokenizer_compile_s": round(first, 1), "generator_compile_s": round(first_g, 1)})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
