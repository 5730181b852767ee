"""Where guided sampling's time goes, piece by piece, against what this machine can do (fp32, no anchor).

    python benchmarks/bench_decode_parts.py              # batch 16 with guidance (32 rows), ~1 min
    python benchmarks/bench_decode_parts.py --batch 4

Each piece runs the work of a whole 256-token `generate` call, with the shapes and kernels `generate` uses,
on the reference generator (dim 512, depth 6, 8 heads, 8192 codes, 32 text tokens), in alternating rounds
with a matmul probe:

- linears: every decoding linear of every step (self-attention q/kv/out, MLP, head at 2B rows; the
  cross-attention q/out at the B conditional rows), from the weights `generate` packs (`PackedLinear`);
- weights read: one pass over those same weights per step (a sum): the memory floor of the linears;
- one layer's MLP weight, at 2B rows, from cache: the GEMM kernel's speed when the weights do not stream;
- self-attention: SDPA of the 2B rows over the KV cache, position 1..256, every layer; and the same bytes
  read by a sum (the floor for attention, which does almost no arithmetic);
- cross-attention: SDPA of the B conditional rows over the 32 text positions;
- the whole `generate` call.

The summary adds the pieces' best case: the linears as measured, attention at the read speed, and zero
time for everything else (norms, GELU, residuals, top-k, Python). That sum bounds the share of the matmul
peak any sampler built on these kernels can reach here; issue 6 asks for 30% at batch 16.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import common  # noqa: I001 - puts the repository on sys.path
from bench_generator import TEXT_LEN, TOP_K, text_inputs
from parti.decoding import PackedLinear
from parti.generator import build_generator
from parti.sampling import SamplingParams, generate


def decode_linears(gen, batch: int) -> list[tuple[torch.nn.Module, int]]:
    """(linear, rows) for every linear one guided decoding step multiplies."""
    rows = 2 * batch
    out = [(gen.head, rows)]
    for layer in gen.layers:
        out += [(m, rows) for m in (layer.self_attn.q, layer.self_attn.kv, layer.self_attn.out, layer.mlp.fc1,
                                    layer.mlp.fc2)]
        out += [(m, batch) for m in (layer.cross_attn.q, layer.cross_attn.out)]
    return out


def pieces(gen, batch: int) -> tuple[dict, dict]:
    """name -> no-argument function doing that piece's work for all T steps; name -> (bytes, flops)."""
    c = gen.config
    T, H, dh, rows = c.seq_len, c.heads, c.dim // c.heads, 2 * batch
    linears = decode_linears(gen, batch)
    inputs = [torch.randn(r, m.in_features) for m, r in linears]
    weights = [m.weight for m, _ in linears]
    w_bytes = sum(w.numel() * w.element_size() for w in weights)
    lin_flops = sum(2.0 * r * m.in_features * m.out_features for m, r in linears)

    def run_linears():
        with torch.no_grad():
            packed = [PackedLinear(m, r) for m, r in linears]  # as each `generate` call packs them
            for _ in range(T):
                for f, x in zip(packed, inputs):
                    f(x)

    def read_weights():
        for _ in range(T):
            for w in weights:
                w.sum()

    fc1 = gen.layers[0].mlp.fc1
    x1 = torch.randn(rows, fc1.in_features)
    repeats = round(lin_flops / (2.0 * rows * fc1.in_features * fc1.out_features))  # the linears' FLOPs

    def in_cache():
        with torch.no_grad():
            packed = PackedLinear(fc1, rows)
            for _ in range(T):
                for _ in range(repeats):
                    packed(x1)

    cache = [torch.randn(2, rows, H, T, dh) for _ in range(c.depth)]
    q = torch.randn(rows, H, 1, dh)
    kv_bytes = sum(2 * rows * H * (p + 1) * dh * 4 for p in range(T)) * c.depth

    def self_attention():
        for p in range(T):
            for kv in cache:
                F.scaled_dot_product_attention(q, kv[0].narrow(2, 0, p + 1), kv[1].narrow(2, 0, p + 1))

    def read_cache():
        for p in range(T):
            for kv in cache:
                kv[0].narrow(2, 0, p + 1).sum()
                kv[1].narrow(2, 0, p + 1).sum()

    ctx = [torch.randn(2, batch, H, TEXT_LEN, dh) for _ in range(c.depth)]
    qc = torch.randn(batch, H, 1, dh)
    mask = torch.zeros(batch, 1, 1, TEXT_LEN)

    def cross_attention():
        for _ in range(T):
            for kv in ctx:
                F.scaled_dot_product_attention(qc, kv[0], kv[1], attn_mask=mask)

    states, text_mask = text_inputs(batch, c.text_dim, seed=10 + batch)  # the sampling benchmark's prompts
    params = SamplingParams(guidance_scale=3.0, top_k=TOP_K)

    def whole():
        with torch.no_grad():
            ctx_states, ctx_mask = gen.encode_condition(states, text_mask)
        generate(gen, ctx_states, ctx_mask, params=params, generator=torch.Generator().manual_seed(0))

    fns = {"generate": whole, "linears": run_linears, "weights read": read_weights,
           "one MLP weight from cache": in_cache, "self-attention (SDPA)": self_attention,
           "KV cache read": read_cache, "cross-attention (SDPA)": cross_attention}
    work = {"linears": (T * w_bytes, T * lin_flops), "weights read": (T * w_bytes, 0.0),
            "one MLP weight from cache": (0.0, T * repeats * 2.0 * rows * fc1.in_features * fc1.out_features),
            "self-attention (SDPA)": (kv_bytes, 0.0), "KV cache read": (kv_bytes, 0.0),
            "cross-attention (SDPA)": (T * c.depth * 2 * batch * H * TEXT_LEN * dh * 4, 0.0),
            "generate": (0.0, common.generator_sample_flops(c, batch=batch, text_len=TEXT_LEN, guided=True))}
    return fns, work


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16, help="prompts (guided: twice as many rows)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    args = p.parse_args(argv)
    info = common.setup(args.threads)
    gen = build_generator("bench").eval()
    fns, work = pieces(gen, args.batch)
    probe, probe_flops = common.matmul_probe()
    common.log(f"batch {args.batch} with guidance: {args.repeats} alternating rounds")
    s = common.alternate({**fns, "matmul": probe}, repeats=args.repeats, warmup=1, memory=False, log=common.log)
    peak = statistics.median(probe_flops / t for t in s["matmul"].seconds)
    med = {k: s[k].median for k in fns}

    rows = []
    for k in fns:
        nbytes, flops = work[k]
        rows.append([k, common.fmt_s(med[k]), common.fmt_spread(s[k]),
                     f"{nbytes / med[k] / 1e9:.1f}" if nbytes else "-",
                     f"{flops / med[k] / 1e9:.0f}" if flops else "-",
                     f"{100 * flops / med[k] / peak:.0f}%" if flops else "-"])
    print(f"\nMachine: {common.describe(info)}")
    print(f"fp32 matmul peak (2048^2, same rounds): {peak / 1e9:.0f} GFLOP/s")
    print(common.table(["piece (all 256 steps)", "median", "IQR", "GB/s", "GFLOP/s", "of peak"], rows,
                       title=f"\nGuided sampling at batch {args.batch} ({2 * args.batch} rows), fp32, piece by piece"))

    flops = work["generate"][1]
    measured = med["linears"] + med["self-attention (SDPA)"] + med["cross-attention (SDPA)"]
    rest = med["generate"] - measured
    # Best case on these kernels: the linears as measured, attention at the speed of a plain read of the
    # same bytes, and nothing else costing any time.
    floor = (med["linears"] + med["KV cache read"]
             + med["cross-attention (SDPA)"] * med["KV cache read"] / med["self-attention (SDPA)"])
    summary = {
        "share_of_peak": flops / med["generate"] / peak,
        "rest_s": rest,
        "floor_s": floor,
        "ceiling_share_of_peak": flops / floor / peak,
        "linears_share_of_peak": work["linears"][1] / med["linears"] / peak,
        "linears_from_cache_share_of_peak": work["one MLP weight from cache"][1] / med["one MLP weight from cache"] / peak,
        "weights_read_gb_s": work["weights read"][0] / med["weights read"] / 1e9,
        "kv_cache_read_gb_s": work["KV cache read"][0] / med["KV cache read"] / 1e9,
    }
    print(f"\ngenerate: {common.fmt_s(med['generate'])} = {100 * summary['share_of_peak']:.0f}% of the peak; "
          f"linears + attention {common.fmt_s(measured)}, everything else (norms, GELU, residuals, top-k, "
          f"Python) {common.fmt_s(rest)}")
    print(f"best case on these kernels (linears as measured, attention at the read speed, nothing else): "
          f"{common.fmt_s(floor)} = {100 * summary['ceiling_share_of_peak']:.0f}% of the peak")
    print(f"the linears run at {100 * summary['linears_share_of_peak']:.0f}% of the peak streaming their weights "
          f"(read alone at {summary['weights_read_gb_s']:.0f} GB/s), "
          f"{100 * summary['linears_from_cache_share_of_peak']:.0f}% from cache")
    common.emit_json({"benchmark": "decode_parts", "machine": info, "threads": args.threads, "batch": args.batch,
                      "rows": 2 * args.batch, "matmul_peak_gflops": peak / 1e9,
                      "pieces": {k: {**common.summary(s[k]), "bytes": work[k][0], "flops": work[k][1]} for k in fns},
                      "generate_flops": flops, **summary})


if __name__ == "__main__":
    main()
