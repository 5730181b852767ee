"""Stage-1 tokenizer: encode, decode and a full training step, ours vs the anchor's VitVQGanVAE, alternated.

Equal autoencoder size: the anchor at its reference widths (dim 256, patch 8, 128 px, 4 layers each side,
8192 codes in a 32-d cosine lookup) has a heavy convolutional decoder head, so ours gets the same
encoder/decoder split in parameters: build_tokenizer("base", encoder_depth=4, decoder_depth=10). Both
training steps use a frozen, randomly initialised VGG16 for the perceptual loss (timing only) and a
discriminator of about 6M parameters on each side (the anchor's own default would be 100M: dim x 8 wide).

    python benchmarks/bench_tokenizer.py            # ~5 min on 2 cores
    python benchmarks/bench_tokenizer.py --quick    # ~2 min

Our step: forward, TokenizerLoss.generator_loss (L2 + L1 + LPIPS + commitment + adaptive-weight hinge GAN),
backward, AdamW; discriminator_loss, backward, AdamW. The anchor's step is its trainer's: vae(img,
return_loss=True), backward, Adam(W) step; vae(img, return_discr_loss=True) (a second autoencoder
forward, and a gradient penalty), backward, step.
"""

from __future__ import annotations

import argparse
import copy

import torch

import common  # noqa: I001 - puts the repository on sys.path
from parti.losses import LossConfig, TokenizerLoss
from parti.tokenizer import build_tokenizer
from parti.optim import make_adamw

ANCHOR_DISCR_DIMS = (64, 128, 256, 256, 384)  # 6.1M parameters, its default depth (4 downsamples)


def images(batch: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def build_ours(depths: tuple[int, int]):
    tok = build_tokenizer("base", encoder_depth=depths[0], decoder_depth=depths[1])
    loss_fn = TokenizerLoss(LossConfig(perceptual_weight=0.1, adversarial_weight=0.1, disc_start=0),
                            image_size=tok.config.image_size, pretrained_vgg=False)
    return tok, loss_fn


def ours_train_step(tok, loss_fn, opt_g, opt_d, x, step):
    out = tok(x)
    total, _ = loss_fn.generator_loss(x, out.reconstruction, commit_loss=out.commit_loss, step=step,
                                      last_layer=tok.last_layer)
    opt_g.zero_grad(set_to_none=True)
    total.backward()
    opt_g.step()
    d_loss, _ = loss_fn.discriminator_loss(x, out.reconstruction, step=step)
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()


def anchor_train_step(vae, opt_g, opt_d, x):
    # Fresh copies: its discriminator step sets requires_grad on the image it is given.
    loss = vae(x.clone(), return_loss=True)
    loss.backward()
    opt_g.step()
    opt_g.zero_grad(set_to_none=True)
    d_loss = vae(x.clone(), return_discr_loss=True)
    d_loss.backward()
    opt_d.step()
    opt_d.zero_grad(set_to_none=True)


def anchor_optimizers(vae, **kwargs):
    """The anchor trainer's pair: AdamW over the autoencoder's trainable parameters, and over its discriminator."""
    d_params = set(vae.discr.parameters())
    g_params = [p for p in vae.parameters() if p.requires_grad and p not in d_params]
    return torch.optim.AdamW(g_params, lr=1e-4, **kwargs), torch.optim.AdamW(list(d_params), lr=1e-4, **kwargs)


def stepper(tok, loss_fn, x):
    """A no-argument training step of `tok` with `loss_fn`, its own AdamW pair (the fused AdamW `parti
    train-tokenizer` runs) and step counter."""
    opt_g = make_adamw(tok.parameters(), lr=1e-4, weight_decay=0.05, betas=(0.9, 0.99))
    opt_d = make_adamw(loss_fn.discriminator.parameters(), lr=1e-4, weight_decay=0.05, betas=(0.9, 0.99))
    step = [0]

    def fn():
        ours_train_step(tok, loss_fn, opt_g, opt_d, x, step[0])
        step[0] += 1

    return fn


def what_if_steps(tok, x) -> dict:
    """What-if (not parti's defaults): the training step of an independent copy of our tokenizer with a
    32-channel discriminator (1.5M parameters instead of 6M)."""
    t = copy.deepcopy(tok)
    lf = TokenizerLoss(LossConfig(perceptual_weight=0.1, adversarial_weight=0.1, disc_start=0, disc_channels=32),
                       image_size=t.config.image_size, pretrained_vgg=False)
    return {"what-if: disc 32 ch": stepper(t, lf, x)}


def profile(fn, *, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=common.DEFAULT_THREADS)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None, help="training-step rounds (default 5, quick 3)")
    p.add_argument("--infer-repeats", type=int, default=None, help="encode/decode rounds (default 10, quick 5)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ours-depths", default="4,10", help="our encoder,decoder depth (default matches the anchor)")
    p.add_argument("--no-anchor", action="store_true")
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of one training step each")
    p.add_argument("--what-if", action="store_true",
                   help="also time our step with a 32-channel discriminator (1.5M parameters instead of 6M)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.infer_repeats = args.infer_repeats or (5 if args.quick else 10)
    args.ours_depths = tuple(int(x) for x in args.ours_depths.split(","))
    return args


def main(argv=None):
    args = parse_args(argv)
    info = common.setup(args.threads)
    tok, loss_fn = build_ours(args.ours_depths)
    size = tok.config.image_size
    x = images(args.batch, size, seed=0)
    vae = None
    if not args.no_anchor:
        try:
            from anchor import autoencoder_parameters, build_anchor_vae

            vae = build_anchor_vae(dim=tok.config.dim, layers=4, image_size=size, patch_size=tok.config.patch_size,
                                   codebook_size=tok.config.codebook_size, codebook_dim=tok.config.codebook_dim,
                                   perceptual_and_gan=True, discr_dims=ANCHOR_DISCR_DIMS)
        except Exception as e:
            common.log(f"anchor unavailable ({e}); measuring ours only")
    params = {"ours_autoencoder": common.num_params(tok),
              "ours_discriminator": common.num_params(loss_fn.discriminator),
              "ours_vgg_frozen": common.num_params(loss_fn.lpips)}
    if vae is not None:
        params.update(anchor_autoencoder=autoencoder_parameters(vae), anchor_discriminator=common.num_params(vae.discr),
                      anchor_vgg_frozen=common.num_params(vae.vgg))

    # ---- encode / decode (eval, no grad) ----
    tok.eval()
    codes = tok.encode(x)
    results = {}
    fns = {"encode": {"ours": lambda: tok.encode(x)}, "decode": {"ours": lambda: tok.decode(codes)}}
    if vae is not None:
        from anchor import anchor_vae_decode

        vae.eval()
        with torch.no_grad():
            _, a_codes, _ = vae.encode(x)

        def a_encode():
            with torch.no_grad():
                return vae.encode(x)[1]

        def a_decode():
            with torch.no_grad():
                return anchor_vae_decode(vae, a_codes)

        fns["encode"]["anchor"], fns["decode"]["anchor"] = a_encode, a_decode
    for what in ("encode", "decode"):
        common.log(f"{what}, batch {args.batch}: {args.infer_repeats} alternating rounds")
        results[what] = common.alternate(fns[what], repeats=args.infer_repeats, warmup=2)

    # ---- full training step ----
    tok.train()
    ours_step = stepper(tok, loss_fn, x)
    train = {"ours": ours_step}
    if vae is not None:
        vae.train()
        a_opt_g, a_opt_d = anchor_optimizers(vae)
        train["anchor"] = lambda: anchor_train_step(vae, a_opt_g, a_opt_d, x)
        # The same fused AdamW as ours, on its own copy of the anchor, to show the optimizer's part of the ratio.
        vae_f = copy.deepcopy(vae)
        f_opt_g, f_opt_d = anchor_optimizers(vae_f, fused=True)
        train["anchor, fused AdamW"] = lambda: anchor_train_step(vae_f, f_opt_g, f_opt_d, x)
    if args.what_if:
        train.update(what_if_steps(tok, x))
    common.log(f"training step, batch {args.batch}: {args.repeats} alternating rounds")
    results["train"] = common.alternate(train, repeats=args.repeats, warmup=1, log=common.log)

    # ---- report ----
    print(f"\nMachine: {common.describe(info)}")
    print("Parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in params.items()))
    rows, ratios, targets = [], {}, []
    for what, label in (("encode", "encode"), ("decode", "decode"), ("train", "training step")):
        s = results[what]
        ratio = common.paired_ratio(s["anchor"], s["ours"]) if "anchor" in s else None
        ratios[what] = ratio
        rows.append([label, common.fmt_s(s["ours"].median), common.fmt_spread(s["ours"]), common.fmt_mib(s["ours"].peak),
                     common.fmt_s(s["anchor"].median) if "anchor" in s else "-",
                     common.fmt_spread(s["anchor"]) if "anchor" in s else "-",
                     common.fmt_mib(s["anchor"].peak) if "anchor" in s else "-", common.fmt_ratio(ratio)])
    for name in [k for k in results["train"] if k.startswith("what-if")]:
        s = results["train"]
        ratio = common.paired_ratio(s["anchor"], s[name]) if "anchor" in s else None
        ratios[name] = ratio
        rows.append([name, common.fmt_s(s[name].median), common.fmt_spread(s[name]), common.fmt_mib(s[name].peak),
                     "", "", "", common.fmt_ratio(ratio)])
    if "anchor, fused AdamW" in results["train"]:
        s = results["train"]
        name = "anchor, fused AdamW"
        ratios[name] = common.paired_ratio(s[name], s["ours"])
        rows.append(["training step, anchor with fused AdamW", "", "", "", common.fmt_s(s[name].median),
                     common.fmt_spread(s[name]), common.fmt_mib(s[name].peak), common.fmt_ratio(ratios[name])])
    print()
    print(common.table(["figure", "ours", "ours IQR", "ours MiB", "anchor", "anchor IQR", "anchor MiB",
                        "speed-up [IQR]"], rows,
                       title=f"Tokenizer at batch {args.batch}, {size} px (peak MiB above the resident baseline)"))
    if ratios["train"]:
        r = ratios["train"]["median"]
        targets.append({"target": "tokenizer training step >= 2x", "measured": r, "needed": 2.0, "met": r >= 2.0})
        print(f"\nTarget: tokenizer training step >= 2x: measured {r:.2f}x -> {'met' if r >= 2 else 'NOT met'}")
    if args.profile:
        print("\nProfile, one training step of ours:\n" + profile(ours_step))
        if vae is not None:
            print("\nProfile, one training step of the anchor:\n" + profile(train["anchor"]))
    common.emit_json({"benchmark": "tokenizer", "machine": info, "threads": args.threads, "quick": args.quick,
                      "config": {"dim": tok.config.dim, "patch": tok.config.patch_size, "image_size": size,
                                 "ours_depths": list(args.ours_depths), "anchor_layers": 4, "batch": args.batch,
                                 "codes": tok.config.codebook_size, "lookup_dim": tok.config.codebook_dim,
                                 "anchor_discr_dims": list(ANCHOR_DISCR_DIMS)},
                      "params": params,
                      "results": {w: {k: common.summary(v) for k, v in s.items()} for w, s in results.items()},
                      "ratios_anchor_over_ours": ratios, "targets": targets})


if __name__ == "__main__":
    main()
