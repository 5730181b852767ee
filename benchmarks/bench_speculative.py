"""Speculative Jacobi decoding (SJD) and int8 weights on CPU, against today's fp32 eager sampler, alternated.

    python benchmarks/bench_speculative.py                      # bench preset (random weights) + the demo checkpoint
    python benchmarks/bench_speculative.py --quick              # fewer rounds, batch 1 only
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/bench_speculative.py

For each model and batch, in the same rounds: `generate` in fp32 (eager: the reference), SJD at each window
(`generate_speculative`, new drafts copied from the left neighbour; plain, and coupled at the largest window),
int8 weights (`parti.quantize`, as `--dtype int8` loads them) alone and with SJD, and bf16 weights. Reported:
seconds per call (median, quartiles), the paired speed-up over fp32, forward passes per image, tokens a pass
commits and the mean accepted drafts, and MBU: the bytes a call must read (weights once a pass, KV caches;
`common.decode_bytes`) per second over a streaming read of 1 GiB timed in the same rounds. With --anchor,
parti-pytorch 0.2.0's generate() joins the bench preset's rounds (paired speed-up over it). Models: the `bench` preset with random weights (guidance 3, top-k 819,
as benchmarks/bench_generator.py samples), and, where it exists, the demo's trained generator
(checkpoints/demo/generator, made by `parti demo`) with the demo's sampling (guidance 1.5), prompts from
its text encoder. With --accuracy, the demo's attribute accuracy (`parti.evaluate.attribute_accuracy`) for
fp32, SJD and int8 at the same seeds. The ISA comes with a matmul probe (fp32 and bf16 GFLOP/s: bf16
without native bf16 instructions is many times slower), so that a run under AVX2 limits shows it took.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics

import common  # puts the repository on sys.path (before `parti` imports)
import torch

from parti.generator import build_generator
from parti.pipeline import as_sampling_dtype, load_pipeline
from parti.prompts import DEMO_PROMPTS
from parti.quantize import fixed_inputs, load_int8, logits_error
from parti.sampling import SamplingParams, generate
from parti.speculative import generate_speculative

TEXT_LEN = 32
TOP_K = 819  # as benchmarks/bench_generator.py: the anchor's top_k(filter_thres=0.9) of 8192 codes
DEMO = common.ROOT / "checkpoints" / "demo" / "generator"


def isa_probe() -> dict:
    """The ISA torch dispatches to, the limits asked for, and fp32 / bf16 matmul GFLOP/s (1024^2)."""
    out = {"capability": torch.backends.cpu.get_cpu_capability(),
           "env": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")}}
    for dtype in (torch.float32, torch.bfloat16):
        fn, flops = common.matmul_probe(1024, inner=4, dtype=dtype)
        fn()
        out[f"{str(dtype).removeprefix('torch.')}_gflops"] = round(
            max(flops / common.time_call(fn, memory=False)[0] for _ in range(3)) / 1e9, 1)
    return out


def bench_inputs(gen, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    states = torch.randn(batch, TEXT_LEN, gen.config.text_dim, generator=g)
    with torch.inference_mode():
        ctx, mask = gen.encode_condition(states, torch.ones(batch, TEXT_LEN, dtype=torch.bool))
    return ctx.clone(), mask.clone()


def demo_inputs(pipe, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(batch)]
    with torch.inference_mode():
        states, mask = pipe.text_encoder.encode(prompts)
        ctx, mask = pipe.generator.encode_condition(states, mask)
    return ctx.clone(), mask.clone()


def contenders(models: dict, params: SamplingParams, windows: list[int]) -> dict:
    """name -> (model, params with the window); window 1 runs `generate`, others `generate_speculative`."""
    out = {"fp32": (models["fp32"], params)}
    for L in windows:
        out[f"fp32 sjd L={L}"] = (models["fp32"], SamplingParams(**{**vars(params), "sjd_window": L}))
    out[f"fp32 sjd L={windows[-1]} coupled"] = (models["fp32"], SamplingParams(
        **{**vars(params), "sjd_window": windows[-1], "sjd_coupled": True}))
    out["int8"] = (models["int8"], params)
    for coupled in (False, True):
        out[f"int8 sjd L={windows[-1]}" + (" coupled" if coupled else "")] = (models["int8"], SamplingParams(
            **{**vars(params), "sjd_window": windows[-1], "sjd_coupled": coupled}))
    out["bf16"] = (models["bf16"], params)
    return out


def run_one(model, params: SamplingParams, ctx, mask, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ctx = ctx.to(next(model.layers.parameters()).dtype)  # bf16 weights: a bf16 context, as the pipeline gives
    if (params.sjd_window or 1) == 1:
        generate(model, ctx, mask, params=params, generator=g)
        return {"forwards": model.config.seq_len, "passes": model.config.seq_len, "accepted": None}
    r = generate_speculative(model, ctx, mask, params=params, generator=g)
    # The batch runs until its slowest row is done: its weight reads are the most passes of any row.
    return {"forwards": float(r.forwards.float().mean()), "passes": int(r.forwards.max()),
            "accepted": r.accepted.tolist(), "tokens_per_forward": r.tokens_per_forward}


def bench_model(name: str, models: dict, inputs, params: SamplingParams, args, anchor=None) -> list[dict]:
    """Every contender at each batch, alternated round by round with a streaming read (MBU's denominator) and,
    given `anchor` (batch -> fn, for the batches it runs at), parti-pytorch's generate() on the same states."""
    rows = []
    stream, stream_bytes = common.stream_probe()
    for batch in args.batches:
        ctx, mask = inputs(batch)
        runs = contenders(models, params, args.windows)
        stats: dict[str, dict] = {}

        def call(label, runs=runs, stats=stats, ctx=ctx, mask=mask):
            def fn():
                stats[label] = run_one(*runs[label], ctx, mask, seed=0)
            return fn

        fns = {label: call(label) for label in runs}
        fns["stream read"] = stream
        if anchor is not None and batch in anchor:
            fns["parti-pytorch"] = anchor[batch]
        common.log(f"{name}, batch {batch}: {len(fns)} contenders x {args.repeats} rounds")
        samples = common.alternate(fns, repeats=args.repeats, warmup=1, memory=False)
        guided = params.guidance_scale != 1.0
        for label in runs:
            s, st = samples[label], stats[label]
            acc = st["accepted"]
            mean_acc = None if acc is None else sum(i * n for i, n in enumerate(acc)) / max(sum(acc), 1)
            nbytes = common.decode_bytes(runs[label][0], batch=batch, guided=guided, passes=st["passes"],
                                         text_len=ctx.shape[1])
            rows.append({"model": name, "batch": batch, "sampler": label, "time": common.summary(s),
                         "speedup_vs_fp32": common.paired_ratio(samples["fp32"], s),
                         "forwards_per_image": st["forwards"], "tokens_per_forward": st.get("tokens_per_forward", 1.0),
                         "mean_accepted_drafts": mean_acc, "accepted_histogram": acc,
                         "bytes_read": nbytes, "read_gb_per_s": nbytes / s.median / 1e9,
                         "mbu": common.mbu(nbytes, s.seconds, samples["stream read"].seconds, stream_bytes),
                         "stream_gb_per_s": stream_bytes / samples["stream read"].median / 1e9,
                         "speedup_vs_parti_pytorch": common.paired_ratio(samples["parti-pytorch"], s)
                         if "parti-pytorch" in samples else None})
    return rows


def anchor_calls(gen, batches: list[int]) -> dict | None:
    """batch -> parti-pytorch 0.2.0's generate() (always guided at scale 3, top-k 0.9) on the bench inputs' text
    states, at the bench preset's shape; None when it is not installed (see benchmarks/anchor.py)."""
    try:
        from anchor import build_anchor_parti, set_anchor_text
    except Exception as e:  # noqa: BLE001 - not installed: ours alone
        common.log(f"parti-pytorch unavailable ({e}); ours alone")
        return None
    c = gen.config
    model = build_anchor_parti(dim=c.dim, depth=c.depth, heads=c.heads, num_codes=c.num_codes,
                               grid_size=c.grid_size, text_dim=c.text_dim)
    calls = {}
    for b in batches:
        states = torch.randn(b, TEXT_LEN, c.text_dim, generator=torch.Generator().manual_seed(b))

        def fn(b=b, states=states):
            set_anchor_text(model, states, torch.ones(b, TEXT_LEN, dtype=torch.bool))
            with torch.inference_mode():
                model.generate([""] * b)

        calls[b] = fn
    return calls


def demo_accuracy(args) -> dict:
    """Attribute accuracy of the demo generator: fp32, SJD, int8 at the same seeds and prompts."""
    from parti.evaluate import attribute_accuracy

    out = {}
    base = SamplingParams(guidance_scale=1.5)
    for label, dtype, params in (("fp32", "fp32", base),
                                 (f"fp32 sjd L={args.windows[-1]}", "fp32",
                                  SamplingParams(guidance_scale=1.5, sjd_window=args.windows[-1])),
                                 ("int8", "int8", base)):
        pipe = load_pipeline(DEMO, device="cpu", dtype=dtype, compile=False)
        for seed in range(args.accuracy_seeds):
            acc = attribute_accuracy(pipe, params, num_prompts=48, seed=seed)
            out.setdefault(label, []).append(acc["attribute_accuracy.overall"])
    return {k: {"per_seed": v, "mean": statistics.mean(v)} for k, v in out.items()}


def model_set(gen) -> dict:
    """fp32, int8 (guarded, as `--dtype int8` loads it) and bf16 copies of `gen`; -> models and int8's error."""
    with torch.inference_mode():
        reference = gen(*fixed_inputs(gen))
    int8 = load_int8(copy.deepcopy(gen))
    models = {"fp32": gen, "int8": int8, "bf16": as_sampling_dtype(copy.deepcopy(gen), torch.bfloat16).eval()}
    return models, logits_error(int8, reference)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    p.add_argument("--windows", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8])
    p.add_argument("--quick", action="store_true", help="3 rounds, batch 1")
    p.add_argument("--no-demo", action="store_true", help="leave out the demo checkpoint")
    p.add_argument("--no-bench", action="store_true", help="leave out the bench preset")
    p.add_argument("--accuracy", action="store_true", help="the demo's attribute accuracy: fp32, SJD, int8")
    p.add_argument("--accuracy-seeds", type=int, default=2)
    p.add_argument("--anchor", action="store_true",
                   help="also parti-pytorch 0.2.0 (the `bench` extra) in the bench preset's rounds: minutes a call")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.batches = 3, [1]
    return args


def main(argv=None):
    args = parse_args(argv)
    info = common.setup(args.threads)
    info["isa"] = isa_probe()
    common.log(f"{common.describe(info)}; ISA {info['isa']}")
    rows, int8_error = [], {}
    if not args.no_bench:
        torch.manual_seed(0)
        models, int8_error["bench"] = model_set(build_generator("bench").eval())
        anchor = anchor_calls(models["fp32"], args.batches) if args.anchor else None
        rows += bench_model("bench (random)", models, lambda b: bench_inputs(models["fp32"], b),
                            SamplingParams(guidance_scale=3.0, top_k=TOP_K), args, anchor)
    demo = DEMO.is_dir() and not args.no_demo
    if demo:
        pipe = load_pipeline(DEMO, device="cpu", dtype="fp32", compile=False)
        models, int8_error["demo"] = model_set(pipe.generator)
        rows += bench_model("demo (trained)", models, lambda b: demo_inputs(pipe, b), SamplingParams(guidance_scale=1.5),
                            args)
    accuracy = demo_accuracy(args) if demo and args.accuracy else None
    table = [[r["model"], r["batch"], r["sampler"], common.fmt_s(r["time"]["median_s"]),
              f"{common.fmt_s(r['time']['q25_s'])} - {common.fmt_s(r['time']['q75_s'])}",
              common.fmt_ratio(r["speedup_vs_fp32"]), f"{r['forwards_per_image']:.1f}",
              f"{r['tokens_per_forward']:.2f}",
              "-" if r["mean_accepted_drafts"] is None else f"{r['mean_accepted_drafts']:.2f}",
              f"{r['read_gb_per_s']:.1f}", f"{100 * r['mbu']:.0f}%",
              common.fmt_ratio(r["speedup_vs_parti_pytorch"]) if r["speedup_vs_parti_pytorch"] else "-"]
             for r in rows]
    print(common.table(["model", "batch", "sampler", "median", "q25 - q75", "speed-up vs fp32", "passes/image",
                        "tokens/pass", "accepted/pass", "GB/s read", "MBU", "vs parti-pytorch"], table,
                       title=f"SJD and int8 sampling on CPU ({info['isa']['capability']}, {args.threads} threads)"))
    print(f"int8 logits' relative error on fixed inputs: {int8_error}")
    if accuracy:
        print("demo attribute accuracy (overall, per seed): "
              + "; ".join(f"{k} {v['mean']:.3f} {v['per_seed']}" for k, v in accuracy.items()))
    common.emit_json({"benchmark": "speculative", **info, "rows": rows, "int8_logits_error": int8_error,
                      "demo_accuracy": accuracy, "checkpoint": str(DEMO.relative_to(common.ROOT)) if demo else None})


if __name__ == "__main__":
    main()
