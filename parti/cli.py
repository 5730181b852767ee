"""The `parti` command: parses arguments and calls library functions; no model logic lives here.

Training flags are generated from the training config dataclasses, so every config field is a flag
and no flag is silently dropped. A user mistake prints one line (`parti: error: ...`) and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys


def _add_config_flags(parser: argparse.ArgumentParser, cls, *, positional: tuple[str, ...] = ()) -> None:
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            if f.default:
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                    help=f"turn off {f.name} (default on)")
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help="(default off)")
            continue
        kind = {"int": int, "float": float, "str": str}.get(str(f.type), str)
        parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=f"(default: {f.default!r})")


def _config(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (they set RANK), or a single process."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def cmd_train_tokenizer(args) -> None:
    from parti.train_tokenizer import TokenizerTrainConfig, train_tokenizer

    out = train_tokenizer(_config(TokenizerTrainConfig, args))
    if _main_process():
        print(f"tokenizer saved in {out} (load with parti.load_tokenizer({str(out)!r}))")


def cmd_train(args) -> None:
    from parti.train_generator import GeneratorTrainConfig, train_generator

    out = train_generator(_config(GeneratorTrainConfig, args))
    if _main_process():
        print(f"generator saved in {out}; sample with: parti sample --checkpoint {out} --prompt \"...\"")


def cmd_encode(args) -> None:
    from parti import text
    from parti.cache import encode_dataset

    encoder = None if args.text_encoder == "trainable" else text.load_t5(args.text_encoder, device=args.device or "cpu")
    out = encode_dataset(data=args.data, tokenizer=args.tokenizer, out=args.out, text_encoder=encoder,
                         batch_size=args.batch_size, device=args.device, synthetic_length=args.synthetic_length,
                         holdout=args.holdout, num_workers=args.num_workers, image_column=args.image_column,
                         caption_column=args.caption_column,
                         max_items=args.max_items)
    print(f"code cache written to {out}")


def cmd_sample(args) -> None:
    from parti.pipeline import load_pipeline
    from parti.plots import sample_grid

    if not args.prompt:
        raise_error("no prompts given; pass --prompt \"...\" (repeatable)")
    pipe = load_pipeline(args.checkpoint, device=args.device, text_encoder_path=args.text_encoder_path,
                         dtype=args.dtype)
    result = pipe(args.prompt, num_images_per_prompt=args.num_images, guidance_scale=args.guidance_scale,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    sample_grid(result.images.cpu(), args.prompt, images_per_prompt=args.num_images, path=args.out)
    print(f"wrote {args.out}")


def cmd_plot(args) -> None:
    from parti.plots import plot_run

    for path in plot_run(args.run_dir, out_dir=args.out):
        print(path)


def cmd_demo(args) -> None:
    from parti.demo import DemoConfig, run_demo

    summary = run_demo(DemoConfig(out=args.out, images=args.images, size=args.size, seed=args.seed,
                                  holdout=args.holdout, guidance_scale=args.guidance_scale,
                                  progress=not args.no_progress))
    acc = summary["attribute_accuracy"]
    sec = summary["seconds"]
    print(f"demo finished ({summary['size']} configuration): tokenizer {sec['tokenizer']:.0f} s, generator "
          f"{sec['generator']:.0f} s (times of the run that trained them), sampling and scoring "
          f"{sec['sampling_and_scoring']:.0f} s")
    for prefix in ("attribute_accuracy", "holdout_attribute_accuracy"):
        for key in ("background_color", "hair_color", "overall"):
            if f"{prefix}.{key}" in acc:
                label = f"{key} accuracy" + (" (held-out pairs)" if prefix.startswith("holdout") else "")
                print(f"  {label} {acc[f'{prefix}.{key}']:.2%} (chance {acc.get(f'chance.{key}', float('nan')):.2%})")
    print(f"  samples: {summary['images'][0]}\n  checkpoints: {summary['checkpoints']['generator']}")


def cmd_evaluate_tokenizer(args) -> None:
    from pathlib import Path

    from parti.evaluate import evaluate_tokenizer, format_table, write_results

    results = evaluate_tokenizer(checkpoint=args.checkpoint, data=args.data, num_images=args.num_images,
                                 batch_size=args.batch_size, device=args.device, vgg_weights=args.vgg_weights,
                                 inception=args.inception, allow_download=not args.no_download, seed=args.seed)
    out = write_results(args.out or Path(args.checkpoint) / "eval_tokenizer.json", results)
    print(format_table(results))
    print(f"wrote {out}")


def cmd_evaluate(args) -> None:
    from pathlib import Path

    from parti.evaluate import evaluate_generator, format_table, write_results
    from parti.prompts import eval_prompts

    results = evaluate_generator(checkpoint=args.checkpoint, data=args.data, num_images=args.num_images,
                                 prompts=list(eval_prompts(args.data)) if args.fixed_prompts else None,
                                 guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, seed=args.seed, batch_size=args.batch_size, device=args.device,
                                 inception=args.inception, clip=args.clip, allow_download=not args.no_download,
                                 holdout=args.holdout, num_attribute_prompts=args.attribute_prompts,
                                 phrasing=args.phrasing, data_seed=args.data_seed,
                                 text_encoder_path=args.text_encoder_path)
    out = write_results(args.out or Path(args.checkpoint) / "eval.json", results)
    print(format_table(results))
    print(f"wrote {out}")


def raise_error(message: str) -> None:
    from parti.errors import PartiError

    raise PartiError(message)


def build_parser() -> argparse.ArgumentParser:
    from parti import app, hub
    from parti.train_generator import GeneratorTrainConfig
    from parti.train_tokenizer import TokenizerTrainConfig

    parser = argparse.ArgumentParser(prog="parti", description="Parti text-to-image on faces.")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-tokenizer", help="train the ViT-VQGAN image tokenizer (stage 1)")
    _add_config_flags(p, TokenizerTrainConfig)
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("train", help="train the generator (stage 2) on a code cache or dataset")
    _add_config_flags(p, GeneratorTrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("encode", help="run the frozen tokenizer (and T5) over a dataset once: the code cache")
    p.add_argument("--data", required=True, help="synthetic, a folder, hf:NAME or a dataset path")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--text-encoder", default="trainable",
                   help="trainable (cache captions only) or a frozen T5: t5-small|t5-base|t5-large|hub name|folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--synthetic-length", type=int, default=20000)
    p.add_argument("--holdout", action="store_true",
                   help="synthetic: leave out the held-out (hair, background) pairs, as `parti train --holdout`")
    p.add_argument("--num-workers", type=int, default=0, help="data loader processes")
    p.add_argument("--image-column", default=None)
    p.add_argument("--caption-column", default=None)
    p.add_argument("--max-items", type=int, default=None, help="encode at most this many items per split")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("sample", help="generate a grid of images for prompts from a generator folder")
    p.add_argument("--checkpoint", required=True, help="generator run folder")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--text-encoder-path", default=None, help="local copy of the frozen T5 the generator used")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="generator weights while sampling (auto: bf16 on GPUs that have it, else fp32)")
    p.add_argument("--out", default="images/samples.png")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="the main job: train both stages on synthetic faces, sample, evaluate")
    p.add_argument("--out", default="", help="run folders go here (default: checkpoints/demo, or "
                   "checkpoints/demo_holdout with --holdout)")
    p.add_argument("--images", default="images", help="pictures go here")
    p.add_argument("--size", default="auto", choices=["auto", "cpu", "gpu", "smoke"], help="configuration (auto: by device)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", action="store_true",
                   help="train without the held-out (hair, background) pairs and report their accuracy apart")
    p.add_argument("--guidance-scale", type=float, default=2.0, help="classifier-free guidance of the grid and "
                   "the accuracy prompts (default 2.0)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("evaluate-tokenizer", help="PSNR, SSIM, LPIPS, rFID and code usage on held-out images")
    p.add_argument("--checkpoint", required=True, help="tokenizer folder (or a generator folder: its tokenizer/)")
    p.add_argument("--data", required=True, help="synthetic, a folder, hf:NAME or a dataset path (val split used)")
    p.add_argument("--num-images", type=int, default=1000, help="held-out images to reconstruct")
    p.add_argument("--out", default=None, help="JSON file (default CHECKPOINT/eval_tokenizer.json)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--vgg-weights", default=None, help="VGG16 weights for LPIPS (vgg16-397923af.pth or .safetensors)")
    p.add_argument("--inception", default=None, help="FID Inception weights (pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (synthetic faces)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-download", action="store_true", help="never download metric weights")
    p.set_defaults(func=cmd_evaluate_tokenizer)

    p = sub.add_parser("evaluate", help="validation loss, FID, CLIP score and (synthetic) attribute accuracy")
    p.add_argument("--checkpoint", required=True, help="generator run folder")
    p.add_argument("--data", required=True, help="synthetic, a folder, hf:NAME or a dataset path (val split used)")
    p.add_argument("--num-images", type=int, default=1000, help="held-out images (and generated images for FID)")
    p.add_argument("--out", default=None, help="JSON file (default CHECKPOINT/eval.json)")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--data-seed", type=int, default=0, help="dataset seed (synthetic faces)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--fixed-prompts", action="store_true",
                   help="generate from the fixed evaluation prompt list instead of the held-out captions")
    p.add_argument("--attribute-prompts", type=int, default=200, help="synthetic: attribute-accuracy prompts (0: skip)")
    p.add_argument("--phrasing", default="describe", choices=["describe", "captions"],
                   help="attribute prompts: one sentence naming every attribute, or the training captions' styles")
    p.add_argument("--holdout", action="store_true",
                   help="synthetic: also score prompts whose (hair, background) pair was held out of training")
    p.add_argument("--inception", default=None, help="FID Inception weights (pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--clip", default=None, help="CLIP hub name or local folder (default openai/clip-vit-base-patch32)")
    p.add_argument("--text-encoder-path", default=None, help="local copy of the frozen T5 the generator used")
    p.add_argument("--device", default=None)
    p.add_argument("--no-download", action="store_true", help="never download metric weights")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("plot", help="draw a run's loss curves and latest grids")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="folder for the pictures (default RUN_DIR/plots)")
    p.set_defaults(func=cmd_plot)
    hub.add_push_parser(sub)
    app.add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from parti.errors import PartiError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except PartiError as e:
        # One write per message: ranks sharing a stderr pipe then cannot splice their lines together.
        sys.stderr.write(f"parti: error: {e}\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        print("parti: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
