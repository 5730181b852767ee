"""How long the notebook's FFHQ defaults take on Colab's GPUs: FLOPs per step counted here, over each GPU's peak.

Counts, with torch's FlopCounterMode on the real modules (batch 2, scaled to the notebook's batch), one
training step of stage 1 (the `base` tokenizer with LPIPS and the discriminator, batch 32) and of stage 2
(the `bench` generator over t5-large-width states, batch 64), and the frozen encoding of the captioned FFHQ
(t5-large's encoder over 39.6k captions, the tokenizer over their images). Time = FLOPs / (peak x MFU): these
are estimates, not measurements (no GPU was lent when they were made); docs/colab.md holds the table.
The default MFU is what the `bench` generator's training reached on an H100 (10-12%, docs/benchmarks.md).
Encoding is bound by decoding the 512-px images on Colab's two CPU cores, timed here per image.

    python benchmarks/colab_estimates.py [--mfu 0.12]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense fp16/bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; the T4 has no bf16 (fp16 is used).
GPUS = {"T4": 65.0, "L4": 121.0, "A100": 312.0, "H100": 989.0}
CAPTIONED_ROWS, CAPTION_TOKENS = 39_600, 48  # rows of cr7Por/ffhq_controlnet_5_2_23; tokens of a long caption
T5_LARGE_ENCODER_PARAMS = 335e6


def counted(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def tokenizer_step_flops(batch: int = 32, probe: int = 2) -> float:
    from parti.losses import LossConfig, TokenizerLoss
    from parti.tokenizer import build_tokenizer

    model = build_tokenizer("base")
    # adaptive_weight off: its autograd.grad calls cannot run under FlopCounterMode (they add a last-layer
    # backward, a sliver of the step)
    loss_fn = TokenizerLoss(LossConfig(disc_start=0, adaptive_weight=False), image_size=128, pretrained_vgg=False)
    x = torch.rand(probe, 3, 128, 128) * 2 - 1

    def step():
        res = model(x)
        loss, _ = loss_fn.generator_loss(x, res.reconstruction, commit_loss=res.commit_loss, step=1,
                                         last_layer=model.last_layer)
        loss.backward()
        d_loss, _ = loss_fn.discriminator_loss(x, res.reconstruction, step=1)
        d_loss.backward()

    return counted(step) * batch / probe


def generator_step_flops(batch: int = 64, probe: int = 2) -> float:
    from parti.generator import build_generator
    from parti.train_generator import Objective

    gen = build_generator("bench", num_codes=8192, grid_size=16, text_dim=1024)
    objective = Objective(gen, None)
    codes = torch.randint(0, 8192, (probe, 256))
    states, mask = torch.randn(probe, CAPTION_TOKENS, 1024), torch.ones(probe, CAPTION_TOKENS, dtype=torch.bool)
    return counted(lambda: objective(codes, states, mask, None).backward()) * batch / probe


def encode_flops() -> float:
    from parti.tokenizer import build_tokenizer

    tok = build_tokenizer("base")
    per_image = counted(lambda: tok.encode(torch.rand(1, 3, 128, 128) * 2 - 1))
    t5 = 2 * T5_LARGE_ENCODER_PARAMS * CAPTION_TOKENS  # one forward: 2 FLOPs per weight per token
    return CAPTIONED_ROWS * (per_image + t5)


def decode_seconds(repeats: int = 20) -> float:
    """Seconds to decode one 512-px PNG face and resize it to 128 px on this CPU (one core)."""
    import io
    import random
    import time

    from PIL import Image

    from parti import synthetic
    from parti.data import to_tensor

    buf = io.BytesIO()
    synthetic.render_face(synthetic.sample_attributes(random.Random(0)), 512).save(buf, format="PNG")
    t0 = time.perf_counter()
    for _ in range(repeats):
        to_tensor(Image.open(io.BytesIO(buf.getvalue())), 128)
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, default=0.12, help="share of the peak the steps reach")
    parser.add_argument("--loader-processes", type=int, default=2, help="CPU cores decoding images (Colab: 2)")
    parser.add_argument("--tokenizer-steps", type=int, default=20000)
    parser.add_argument("--generator-steps", type=int, default=30000)
    args = parser.parse_args()
    torch.manual_seed(0)
    flops = {"tokenizer_step": tokenizer_step_flops(), "generator_step": generator_step_flops(),
             "encode_captioned_ffhq": encode_flops()}
    decode_hours = CAPTIONED_ROWS * decode_seconds() / args.loader_processes / 3600
    rows = {}
    print(f"{'GPU':6} {'stage 1':>10} {'encode':>10} {'stage 2':>10}   (hours; {args.mfu:.0%} of the dense peak)")
    for gpu, peak in GPUS.items():
        rate = peak * 1e12 * args.mfu
        hours = {"tokenizer": flops["tokenizer_step"] * args.tokenizer_steps / rate / 3600,
                 "encode": max(flops["encode_captioned_ffhq"] / rate / 3600, decode_hours),
                 "generator": flops["generator_step"] * args.generator_steps / rate / 3600}
        rows[gpu] = {k: round(v, 3) for k, v in hours.items()}
        print(f"{gpu:6} {hours['tokenizer']:10.2f} {hours['encode']:10.3f} {hours['generator']:10.2f}")
    print(json.dumps({"flops": flops, "mfu": args.mfu, "decode_hours": round(decode_hours, 3), "hours": rows}))


if __name__ == "__main__":
    main()
