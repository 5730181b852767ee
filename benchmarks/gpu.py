"""GPU benchmark of the reference generator: bf16 training images/s and model FLOP utilisation, sampling
images/s at batch 64 (guided), with attention through SDPA's fused kernels and optional torch.compile.

    python benchmarks/gpu.py                       # on a CUDA machine
    python benchmarks/gpu.py --compile             # torch.compile the training forward
    python benchmarks/gpu.py --dry-run             # tiny sizes on any device (CPU included): proves it runs

Precision: bf16 autocast for training (fp32 master weights, fp32 logits, AdamW fused where available); a
bf16 copy of the weights for sampling (its KV cache is then bf16 too). fp16 GPUs without bf16 fall back to
fp32 (logged). Attention: SDPA restricted to FlashAttention, memory-efficient and cuDNN kernels (no math
fallback on CUDA): the causal self-attention and the cached decoding steps take FlashAttention; the
cross-attention carries a padding mask, which FlashAttention does not take, so it runs memory-efficient.
MFU = model FLOPs (analytic, benchmarks/common.py) / time / the card's dense bf16 peak, where the card is
known; the bf16 matmul peak measured in the same run is reported beside it.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import common  # noqa: I001 - puts the repository on sys.path
from parti.generator import build_generator
from parti.pipeline import as_sampling_dtype
from parti.sampling import SamplingParams, generate

TEXT_LEN = 32
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched on the device name.
NOMINAL_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0,
                       "H100 NVL": 835.0, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0,
                       "RTX 4090": 165.2, "RTX 3090": 71.0}


def nominal_peak(name: str) -> float | None:
    for key, tflops in NOMINAL_BF16_TFLOPS.items():  # ordered: specific names first
        if key in name:
            return tflops * 1e12
    return None


def sdpa_context(device: torch.device):
    """Fused attention kernels only on CUDA; on CPU (dry runs) the math kernel may also run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    if device.type != "cuda":
        backends.append(SDPBackend.MATH)
    return sdpa_kernel(backends)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, *, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def peak_memory_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def measured_matmul_peak(device, dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = timed(lambda: a @ b, device, steps=10, warmup=3)
    return 2 * n ** 3 / min(times)


def text_inputs(batch, width, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, TEXT_LEN, width, generator=g)
    lengths = torch.randint(12, TEXT_LEN + 1, (batch,), generator=g)
    mask = torch.arange(TEXT_LEN)[None] < lengths[:, None]
    return (states * mask[..., None]).to(device), mask.to(device)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench", help="generator preset (default: the reference 'bench')")
    p.add_argument("--batch", type=int, default=64, help="training batch")
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--sample-runs", type=int, default=3, help="timed sampling runs")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--compile-sample", action="store_true", help="also compile the decode step (dynamic shapes)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dry-run", action="store_true", help="tiny model and sizes, 2 steps: a smoke test anywhere")
    args = p.parse_args(argv)
    if args.dry_run:
        args.preset, args.batch, args.sample_batch, args.steps, args.sample_runs = "tiny", 4, 4, 2, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = common.machine_info()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else common.cpu_model()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    elif device.type == "cpu":
        dtype = torch.bfloat16  # CPU autocast supports bf16; dry runs exercise the same code path
    else:
        dtype = torch.float32
    common.log(f"device {name}, compute dtype {dtype}, compile {args.compile}")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    gen = build_generator(args.preset).to(device)
    c = gen.config
    codes = torch.randint(0, c.num_codes, (args.batch, c.seq_len), device=device)
    states, mask = text_inputs(args.batch, c.text_dim, device)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-4, **fused)
    model = torch.compile(gen) if args.compile else gen

    def train_step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32), sdpa_context(device):
            drop = torch.rand(args.batch, device=device) < c.cond_drop_prob
            ctx, ctx_mask = gen.encode_condition(states, mask, drop=drop)
            logits = model(codes, ctx, ctx_mask)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    gen.train()
    peak_memory_reset(device)
    train_times = timed(train_step, device, steps=args.steps, warmup=3 if args.compile else 2)
    train_mem = peak_memory_mib(device)
    step_s = statistics.median(train_times)
    train_flops = 3 * common.generator_forward_flops(c, batch=args.batch, text_len=TEXT_LEN)

    # Sampling: a bf16 copy of the weights (KV cache in bf16), guidance rows batched with the prompts.
    sampler = as_sampling_dtype(copy.deepcopy(gen), dtype).eval()  # as load_pipeline(dtype="auto") on a GPU
    if args.compile_sample:
        sampler.decode = torch.compile(sampler.decode, dynamic=True)
    s_states, s_mask = text_inputs(args.sample_batch, c.text_dim, device, seed=1)
    params = SamplingParams(guidance_scale=args.guidance, temperature=1.0)

    def sample():
        with torch.no_grad(), sdpa_context(device):
            ctx, ctx_mask = sampler.encode_condition(s_states, s_mask)
            return generate(sampler, ctx, ctx_mask, params=params, generator=None)

    peak_memory_reset(device)
    sample_times = timed(sample, device, steps=args.sample_runs, warmup=1)
    sample_mem = peak_memory_mib(device)
    sample_s = statistics.median(sample_times)
    sample_flops = common.generator_sample_flops(c, batch=args.sample_batch, text_len=TEXT_LEN,
                                                 guided=args.guidance != 1)

    measured = measured_matmul_peak(device, dtype, 256 if args.dry_run else 8192)
    nominal = nominal_peak(name) if device.type == "cuda" else None
    train_rate = train_flops / step_s
    rows = [["training step", f"batch {args.batch}", common.fmt_s(step_s), f"{args.batch / step_s:.1f} img/s",
             f"{train_rate / 1e12:.1f}", "-" if nominal is None else f"{100 * train_rate / nominal:.1f}%",
             f"{100 * train_rate / measured:.1f}%", "-" if train_mem is None else f"{train_mem:.0f}"],
            [f"sampling {c.seq_len} tokens", f"batch {args.sample_batch}, scale {args.guidance:g}", common.fmt_s(sample_s),
             f"{args.sample_batch / sample_s:.2f} img/s", f"{sample_flops / sample_s / 1e12:.2f}",
             "-" if nominal is None else f"{100 * sample_flops / sample_s / nominal:.1f}%",
             f"{100 * sample_flops / sample_s / measured:.1f}%", "-" if sample_mem is None else f"{sample_mem:.0f}"]]
    print(f"\nDevice: {name}; torch {torch.__version__}; {dtype}; compile={args.compile}; preset {args.preset} "
          f"({common.num_params(gen) / 1e6:.1f}M parameters){' [DRY RUN]' if args.dry_run else ''}")
    print(f"bf16 matmul peak measured here: {measured / 1e12:.1f} TFLOP/s; nominal dense bf16: "
          f"{'unknown' if nominal is None else f'{nominal / 1e12:.0f} TFLOP/s'}\n")
    print(common.table(["figure", "size", "median", "throughput", "TFLOP/s", "MFU (nominal)", "of measured peak",
                        "peak MiB"], rows))
    common.emit_json({"benchmark": "gpu", "device": name, "dtype": str(dtype).removeprefix("torch."),
                      "compile": args.compile, "dry_run": args.dry_run, "preset": args.preset, "torch": torch.__version__,
                      "date": info["date"], "train": {"batch": args.batch, "median_s": step_s,
                                                      "images_per_s": args.batch / step_s, "flops": train_flops,
                                                      "mfu_nominal": None if nominal is None else train_rate / nominal,
                                                      "share_of_measured_peak": train_rate / measured,
                                                      "peak_mib": train_mem},
                      "sample": {"batch": args.sample_batch, "guidance": args.guidance, "median_s": sample_s,
                                 "images_per_s": args.sample_batch / sample_s, "flops": sample_flops,
                                 "mfu_nominal": None if nominal is None else sample_flops / sample_s / nominal,
                                 "peak_mib": sample_mem},
                      "matmul_peak_measured_flops": measured, "nominal_peak_flops": nominal})


if __name__ == "__main__":
    main()
