"""The `parti` command: parses arguments and calls library functions; no model logic lives here.

Training flags are generated from the training config dataclasses, so every config field is a flag
and no flag is silently dropped. A user mistake prints one line (`parti: error: ...`) and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from parti import app, push, text
from parti.cache import encode_dataset
from parti.demo import DemoConfig, run_demo
from parti.device import default_device
from parti.distributed import wait_for_every_rank
from parti.errors import EveryRankError, PartiError
from parti.evaluate import (GeneratorEvalConfig, TokenizerEvalConfig, evaluate_generator, evaluate_tokenizer, format_table, write_results)
from parti.pipeline import load_pipeline
from parti.plots import plot_run, sample_grid
from parti.runs import check_image_output
from parti.sampling import SamplingParams
from parti.settings import base_type, field_info, field_types
from parti.synthetic import DEFAULT_LENGTH
from parti.train_generator import GeneratorTrainConfig, train_generator
from parti.train_tokenizer import TokenizerTrainConfig, train_tokenizer


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, like every other `parti: error:` (`--help` shows usage)."""

    def error(self, message: str):
        sys.stderr.write(f"parti: error: {message}; see `{self.prog} --help`\n")
        sys.exit(2)


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of dataclass `cls` (nested dataclass fields flattened), its help and default taken
    from the field's `setting(...)` declaration; booleans that default on get a --no-NAME flag."""
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        kind, _ = base_type(hints[f.name])
        if dataclasses.is_dataclass(kind):
            add_config_flags(parser, kind)
            continue
        info, flag = field_info(cls, f.name), "--" + f.name.replace("_", "-")
        text = info.get("help", "")
        if kind is bool:
            if f.default:
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                    help=f"do not: {text} (default: on)" if text else "(default: on)")
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=f"{text} (default: off)".strip())
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "" if info.get("required") or (default is None and "default" in text) else f" (default: {default})"
        parser.add_argument(flag, dest=f.name, type=kind if kind in (int, float) else str, default=default, choices=info.get("choices"),
                            required=bool(info.get("required")), help=f"{text}{shown}")


def config_from_args(cls, args: argparse.Namespace):
    """The dataclass `cls` built from parsed flags (nested dataclasses built from their own fields)."""
    hints, values = field_types(cls), {}
    for f in dataclasses.fields(cls):
        kind, _ = base_type(hints[f.name])
        values[f.name] = config_from_args(kind, args) if dataclasses.is_dataclass(kind) else getattr(args, f.name)
    return cls(**values)


def _main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (they set RANK), or a single process."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def cmd_train_tokenizer(args) -> None:
    out = train_tokenizer(config_from_args(TokenizerTrainConfig, args))
    if _main_process():
        print(f"tokenizer saved in {out} (load with parti.load_tokenizer({str(out)!r}))")


def cmd_train_generator(args) -> None:
    out = train_generator(config_from_args(GeneratorTrainConfig, args))
    if _main_process():
        print(f"generator saved in {out}; sample with: parti sample --checkpoint {out} --prompt \"...\"")


def cmd_encode(args) -> None:
    device = default_device(args.device)  # a frozen T5 on the GPU when there is one
    encoder = None if args.text_encoder == "trainable" else text.load_t5(args.text_encoder, device=device)
    out = encode_dataset(data=args.data, tokenizer=args.tokenizer, out=args.out, text_encoder=encoder,
                         batch_size=args.batch_size, device=device, synthetic_length=args.synthetic_length,
                         holdout=args.holdout, num_workers=args.num_workers, image_column=args.image_column,
                         caption_column=args.caption_column,
                         max_items=args.max_items)
    print(f"code cache written to {out}")


def cmd_sample(args) -> None:
    if not args.prompt:
        raise_error("no prompts given; pass --prompt \"...\" (repeatable)")
    sampling = config_from_args(SamplingParams, args)
    check_image_output(args.out)  # before minutes of sampling, and never over a checkpoint's files
    pipe = load_pipeline(args.checkpoint, device=args.device, text_encoder_path=args.text_encoder_path,
                         dtype=args.dtype, compile={"auto": "auto", "on": True, "off": False}[args.compile])
    result = pipe(args.prompt, sampling, num_images_per_prompt=args.num_images, seed=args.seed)
    sample_grid(result.images.cpu(), args.prompt, images_per_prompt=args.num_images, path=args.out)
    print(f"wrote {args.out}")


def cmd_plot(args) -> None:
    for path in plot_run(args.run_dir, out_dir=args.out):
        print(path)


def cmd_demo(args) -> None:
    summary = run_demo(config_from_args(DemoConfig, args))
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


    results = evaluate_tokenizer(config_from_args(TokenizerEvalConfig, args))
    out = write_results(args.out or Path(args.checkpoint) / "eval_tokenizer.json", results)
    print(format_table(results))
    print(f"wrote {out}")


def cmd_evaluate(args) -> None:
    from pathlib import Path


    results = evaluate_generator(config_from_args(GeneratorEvalConfig, args))
    out = write_results(args.out or Path(args.checkpoint) / "eval.json", results)
    print(format_table(results))
    print(f"wrote {out}")


def raise_error(message: str) -> None:
    raise PartiError(message)


def _add_encode(sub) -> None:
    p = sub.add_parser("encode", help="run the frozen tokenizer (and T5) over a dataset once: the code cache")
    p.add_argument("--data", required=True, help="synthetic, a folder, hf:NAME or a dataset path")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--text-encoder", default="trainable",
                   help="trainable (cache captions only) or a frozen T5: t5-small|t5-base|t5-large|hub name|folder")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: a GPU when there is one)")
    p.add_argument("--synthetic-length", type=int, default=DEFAULT_LENGTH, help="synthetic faces in the training split")
    p.add_argument("--holdout", action="store_true",
                   help="synthetic: leave out the held-out (hair, background) pairs, as `parti train-generator "
                   "--holdout`")
    p.add_argument("--num-workers", type=int, default=0, help="data loader processes")
    p.add_argument("--image-column", default=None, help="table data: the image column")
    p.add_argument("--caption-column", default=None, help="table data: the caption column")
    p.add_argument("--max-items", type=int, default=None, help="encode at most this many items per split")
    p.set_defaults(func=cmd_encode)


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate a grid of images for prompts from a generator folder")
    p.add_argument("--checkpoint", required=True, help="generator run folder")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt (default: 4)")
    add_config_flags(p, SamplingParams)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: a GPU when there is one)")
    p.add_argument("--text-encoder-path", default=None, help="local copy of the frozen T5 the generator used")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="generator weights while sampling (default auto: bf16 on GPUs that have it, else fp32)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="decode through the compiled step (default auto: on GPUs; on a CPU, 'on' pays 20-40 s of "
                        "compilation per batch shape to sample up to 1.5x faster after)")
    p.add_argument("--out", default="images/samples.png", help="the grid's image file (default: images/samples.png)")
    p.set_defaults(func=cmd_sample)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="parti", description="Parti text-to-image on faces.")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-tokenizer", help="train the ViT-VQGAN image tokenizer (stage 1)")
    add_config_flags(p, TokenizerTrainConfig)
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("train-generator", aliases=["train"],
                       help="train the generator (stage 2) on a code cache or dataset (`train` is an alias)")
    add_config_flags(p, GeneratorTrainConfig)
    p.set_defaults(func=cmd_train_generator)

    _add_encode(sub)
    _add_sample(sub)

    p = sub.add_parser("demo", help="the main job: train both stages on synthetic faces, sample, evaluate")
    add_config_flags(p, DemoConfig)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("evaluate-tokenizer", help="PSNR, SSIM, LPIPS, rFID and code usage on held-out images")
    add_config_flags(p, TokenizerEvalConfig)
    p.add_argument("--out", default=None, help="JSON file (default CHECKPOINT/eval_tokenizer.json)")
    p.set_defaults(func=cmd_evaluate_tokenizer)

    p = sub.add_parser("evaluate", help="validation loss, FID, CLIP score and (synthetic) attribute accuracy")
    add_config_flags(p, GeneratorEvalConfig)
    p.add_argument("--out", default=None, help="JSON file (default CHECKPOINT/eval.json)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("plot", help="draw a run's loss curves and latest grids")
    p.add_argument("run_dir", help="a training run folder")
    p.add_argument("--out", default=None, help="folder for the pictures (default RUN_DIR/plots)")
    p.set_defaults(func=cmd_plot)
    push.add_push_parser(sub)
    app.add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except PartiError as e:
        # One write per message: ranks sharing a stderr pipe then cannot splice their lines together.
        sys.stderr.write(f"parti: error: {e}\n")
        sys.stderr.flush()
        if isinstance(e, EveryRankError):  # let every rank print it before the launcher stops the rest

            wait_for_every_rank()
        return 2
    except KeyboardInterrupt:
        print("parti: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
