"""GPU benchmark, one prepared run: the compiled decoding step with CUDA graphs at batch 1, 16 and 64
(guided, images/s, against eager), and a bf16 training step at the `ffhq` preset (images/s and MFU).

    python benchmarks/gpu.py                       # on a CUDA machine
    python benchmarks/gpu.py --compile-train       # also torch.compile the training forward
    python benchmarks/gpu.py --dry-run             # tiny sizes on any device (CPU included): proves it runs

Sampling: the `bench` generator (the CPU benchmarks' reference) with weights in the dtype
`load_pipeline(dtype="auto")` picks (bf16 from compute capability 8.0), through
`generate(..., compile=...)`: eager, then compiled (`parti.compiled`: static shapes, CUDA graphs via
mode="reduce-overhead"), alternated per round; the compilation time of each shape is reported.
Training: bf16 autocast (fp32 master weights, fp32 logits, fused AdamW), SDPA restricted to fused kernels
(FlashAttention, memory-efficient, cuDNN; no math fallback on CUDA); sampling lets SDPA choose. MFU = model FLOPs (analytic,
benchmarks/common.py) / time / the card's dense bf16 peak where the card is known; the share of the bf16
matmul peak measured in the same run is reported beside it. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import common  # noqa: I001 - puts the repository on sys.path
from parti.compiled import decoder_for
from parti.generator import build_generator
from parti.pipeline import as_sampling_dtype
from parti.device import sampling_dtype
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


def peak_memory_mib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def measured_matmul_peak(device, dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / min(timed(lambda: a @ b, device, steps=10, warmup=3))


def text_inputs(batch, width, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, TEXT_LEN, width, generator=g)
    lengths = torch.randint(12, TEXT_LEN + 1, (batch,), generator=g)
    mask = torch.arange(TEXT_LEN)[None] < lengths[:, None]
    return (states * mask[..., None]).to(device), mask.to(device)


def bench_train(args, device, dtype) -> dict:
    """bf16-autocast training steps of the `--train-preset` generator: images/s and FLOPs."""
    gen = build_generator(args.train_preset).to(device).train()
    c = gen.config
    codes = torch.randint(0, c.num_codes, (args.batch, c.seq_len), device=device)
    states, mask = text_inputs(args.batch, c.text_dim, device)
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    model = torch.compile(gen) if args.compile_train else gen

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32), sdpa_context(device):
            ctx, ctx_mask = gen.encode_condition(states, mask,
                                                 drop=torch.rand(args.batch, device=device) < c.cond_drop_prob)
            F.cross_entropy(model(codes, ctx, ctx_mask).flatten(0, 1), codes.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = timed(step, device, steps=args.steps, warmup=3 if args.compile_train else 2)
    s = statistics.median(times)
    flops = 3 * common.generator_forward_flops(c, batch=args.batch, text_len=TEXT_LEN)
    return {"preset": args.train_preset, "params": common.num_params(gen), "batch": args.batch, "median_s": s,
            "images_per_s": args.batch / s, "flops": flops, "peak_mib": peak_memory_mib(device)}


def bench_sample(args, device, batch: int, sampler) -> dict:
    """Guided sampling at `batch`: eager and compiled `generate`, alternated per round."""
    c = sampler.config
    states, mask = text_inputs(batch, c.text_dim, device, seed=1)
    params = SamplingParams(guidance_scale=args.guidance, temperature=1.0)
    with torch.no_grad():
        ctx, ctx_mask = sampler.encode_condition(states, mask)
    with torch.inference_mode():  # compile now, outside the timed runs, and keep the time it took
        decoder = decoder_for(sampler, batch=batch, guided=args.guidance != 1, context_len=TEXT_LEN,
                              compile=args.sample_compile)
    fns = {}
    for name, compiled in (("eager", False), ("compiled", args.sample_compile)):
        def run(compiled=compiled):  # SDPA picks its kernels as it does for users
            return generate(sampler, ctx, ctx_mask, params=params, compile=compiled)
        fns[name] = run
    out = {name: [] for name in fns}
    for name in fns:
        fns[name]()  # warm-up
    for r in range(args.sample_runs):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            out[name] += timed(fns[name], device, steps=1, warmup=0)
    flops = common.generator_sample_flops(c, batch=batch, text_len=TEXT_LEN, guided=args.guidance != 1)
    row = {"batch": batch, "guidance": args.guidance, "step_compiled": decoder.compiled is not None,
           "compile_s": decoder.compile_s, "flops": flops}
    for name, times in out.items():
        row[name] = {"median_s": statistics.median(times), "images_per_s": batch / statistics.median(times)}
    row["eager_over_compiled"] = statistics.median(e / k for e, k in zip(out["eager"], out["compiled"]))
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-preset", default="ffhq", help="generator preset of the training step")
    p.add_argument("--sample-preset", default="bench", help="generator preset of the sampling figures")
    p.add_argument("--batch", type=int, default=64, help="training batch")
    p.add_argument("--sample-batches", default="1,16,64")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--sample-runs", type=int, default=3, help="timed sampling runs per batch and path")
    p.add_argument("--compile-train", action="store_true", help="torch.compile the training forward")
    p.add_argument("--sample-compile", default="auto", choices=["auto", "on", "off"],
                   help="the compiled decoding step (auto: on CUDA; on CPU where it measured faster)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dry-run", action="store_true", help="tiny models and sizes, few steps: a smoke test anywhere")
    args = p.parse_args(argv)
    args.sample_batches = [int(x) for x in args.sample_batches.split(",")]
    args.sample_compile = {"auto": "auto", "on": True, "off": False}[args.sample_compile]
    if args.dry_run:
        args.train_preset, args.sample_preset, args.batch, args.steps, args.sample_runs = "tiny", "tiny", 4, 2, 1
        args.sample_batches = [1, 2]
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = common.machine_info()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else common.cpu_model()
    # Training: bf16 autocast where the card runs bf16 natively (and on CPU dry runs), else fp32.
    native_bf16 = device.type == "cpu" or torch.cuda.get_device_capability(device) >= (8, 0)
    dtype = torch.bfloat16 if native_bf16 else torch.float32
    weights = sampling_dtype("auto", device)
    common.log(f"device {name}, training dtype {dtype}, sampling weights {weights}, compile {args.sample_compile}")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    train = bench_train(args, device, dtype)
    torch.manual_seed(0)
    sampler = as_sampling_dtype(build_generator(args.sample_preset).to(device), weights).eval()
    sample = [bench_sample(args, device, b, sampler) for b in args.sample_batches]

    measured = measured_matmul_peak(device, dtype, 256 if args.dry_run else 8192)
    nominal = nominal_peak(name) if device.type == "cuda" else None
    rate = train["flops"] / train["median_s"]
    train.update(mfu_nominal=None if nominal is None else rate / nominal, share_of_measured_peak=rate / measured)
    for r in sample:
        for k in ("eager", "compiled"):
            r[k]["mfu_nominal"] = None if nominal is None else r["flops"] / r[k]["median_s"] / nominal
    report(args, name, dtype, train, sample, measured, nominal)
    common.emit_json({"benchmark": "gpu", "device": name, "train_dtype": str(dtype).removeprefix("torch."),
                      "sample_dtype": str(weights).removeprefix("torch."), "dry_run": args.dry_run,
                      "compile_train": args.compile_train, "torch": torch.__version__, "date": info["date"],
                      "train": train, "sample_preset": args.sample_preset, "sample": sample,
                      "matmul_peak_measured_flops": measured, "nominal_peak_flops": nominal})


def report(args, name, dtype, train, sample, measured, nominal) -> None:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    print(f"\nDevice: {name}; torch {torch.__version__}{' [DRY RUN]' if args.dry_run else ''}")
    print(f"bf16 matmul peak measured here: {measured / 1e12:.1f} TFLOP/s; nominal dense bf16: "
          f"{'unknown' if nominal is None else f'{nominal / 1e12:.0f} TFLOP/s'}\n")
    print(common.table(
        ["training step", "batch", "median", "img/s", "MFU (nominal)", "of measured peak", "peak MiB"],
        [[f"{train['preset']} ({train['params'] / 1e6:.1f}M), {dtype}, compile={args.compile_train}",
          str(train["batch"]), common.fmt_s(train["median_s"]), f"{train['images_per_s']:.1f}",
          pct(train["mfu_nominal"]), pct(train["share_of_measured_peak"]), common.fmt_mib(train["peak_mib"])]]))
    print()
    print(common.table(
        ["sampling (guided)", "batch", "eager", "eager img/s", "compiled", "compiled img/s", "eager / compiled",
         "compile s"],
        [[args.sample_preset, str(r["batch"]), common.fmt_s(r["eager"]["median_s"]),
          f"{r['eager']['images_per_s']:.2f}", common.fmt_s(r["compiled"]["median_s"]) if r["step_compiled"] else "(eager)",
          f"{r['compiled']['images_per_s']:.2f}", f"{r['eager_over_compiled']:.2f}x",
          "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"] for r in sample]))


if __name__ == "__main__":
    main()
