"""The `parti` command: parses arguments and calls library functions; no model logic lives here.

Every command's flags are generated from its config dataclass (COMMANDS: `add_config_flags`), and `main`
builds that config from the parsed flags (`config_from_args`) before calling the command: every config field
is a flag, no flag is declared by hand, and none is silently dropped (tests/test_cli_flags.py). A user
mistake prints one line (`parti: error: ...`) and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import sys

from parti import app, distributed, text
from parti.app import ServeConfig
from parti.cache import EncodeConfig, check_cache_out, encode_dataset
from parti.checkpoint import EVAL_NAME, EVAL_TOKENIZER_NAME
from parti.demo import DemoConfig, demo_folder, run_demo
from parti.device import default_device
from parti.errors import EveryRankError, PartiError
from parti.evaluate import (
    GeneratorEvalConfig,
    TokenizerEvalConfig,
    evaluate_generator,
    evaluate_tokenizer,
    format_table,
    results_out,
    write_results,
)
from parti.pipeline import COMPILE_MODES, LoadOptions, Pipeline, SampleConfig, load_pipeline
from parti.plots import PlotConfig, plot_run, sample_grid
from parti.push import PushConfig, push_to_hub
from parti.runs import check_image_output, check_output
from parti.settings import base_type, field_info, field_types, flag_name, item_type
from parti.train_generator import GeneratorTrainConfig, train_generator
from parti.train_tokenizer import TokenizerTrainConfig, train_tokenizer


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, like every other `parti: error:` (`--help` shows usage)."""

    def error(self, message: str):
        sys.stderr.write(f"parti: error: {message}; see `{self.prog} --help`\n")
        sys.exit(2)


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of dataclass `cls` (nested dataclass fields flattened), its help and default taken
    from the field's `setting(...)` declaration; booleans that default on get a --no-NAME flag, a
    `tuple[X, ...]` field a flag given once per item, a `setting(positional=True)` field a positional."""
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        kind, _ = base_type(hints[f.name])
        if dataclasses.is_dataclass(kind):
            add_config_flags(parser, kind)
            continue
        info, flag = field_info(cls, f.name), flag_name(cls, f.name)
        text = info.get("help", "")
        if kind is bool:
            if f.default:
                parser.add_argument("--no-" + flag.removeprefix("--"), dest=f.name, action="store_false",
                                    help=f"do not: {text} (default: on)" if text else "(default: on)")
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=f"{text} (default: off)".strip())
            continue
        if kind is tuple:  # None when never given: config_from_args then keeps the field's default
            item = item_type(hints[f.name])
            parser.add_argument(flag, dest=f.name, action="append", type=item if item in (int, float) else str,
                                default=None, choices=info.get("choices"), required=bool(info.get("required")),
                                metavar=flag.removeprefix("--").replace("-", "_").upper(), help=text)
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "" if info.get("required") or (default is None and "default" in text) else f" (default: {default})"
        value_type = kind if kind in (int, float) else str
        if info.get("positional"):
            parser.add_argument(f.name, nargs=None if info.get("required") else "?", type=value_type, default=default,
                                choices=info.get("choices"), help=f"{text}{shown}")
        else:
            parser.add_argument(flag, dest=f.name, type=value_type, default=default, choices=info.get("choices"),
                                required=bool(info.get("required")), help=f"{text}{shown}")


def config_from_args(cls, args: argparse.Namespace):
    """The dataclass `cls` built from parsed flags (nested dataclasses built from their own fields)."""
    hints, values = field_types(cls), {}
    for f in dataclasses.fields(cls):
        kind, _ = base_type(hints[f.name])
        if dataclasses.is_dataclass(kind):
            values[f.name] = config_from_args(kind, args)
        elif kind is tuple and getattr(args, f.name) is None:
            continue  # a repeatable flag never given: the field's default
        else:
            values[f.name] = tuple(getattr(args, f.name)) if kind is tuple else getattr(args, f.name)
    return cls(**values)


def _main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (they set RANK), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def _load(options: LoadOptions) -> Pipeline:
    """The pipeline the shared load flags name (`parti sample`, `parti serve`)."""
    return load_pipeline(options.checkpoint, revision=options.revision, device=options.device, dtype=options.dtype,
                         compile=COMPILE_MODES[options.compile], text_encoder_path=options.text_encoder_path)


def cmd_train_tokenizer(cfg: TokenizerTrainConfig) -> None:
    out = train_tokenizer(cfg)
    if _main_process():
        print(f"tokenizer saved in {out} (load with parti.load_tokenizer({str(out)!r}))")


def cmd_train_generator(cfg: GeneratorTrainConfig) -> None:
    out = train_generator(cfg)
    if _main_process():
        print(f"generator saved in {out}; sample with: parti sample --checkpoint {out} --prompt \"...\"")


def cmd_encode(cfg: EncodeConfig) -> None:
    check_cache_out(cfg.out, reads=(cfg.tokenizer,))  # before a T5 loads
    device = default_device(cfg.device)  # a frozen T5 on the GPU when there is one
    encoder = None if cfg.text_encoder == "trainable" else text.load_t5(cfg.text_encoder, device=device)
    out = encode_dataset(data=cfg.data, tokenizer=cfg.tokenizer, out=cfg.out, text_encoder=encoder,
                         batch_size=cfg.batch_size, device=device, synthetic_length=cfg.synthetic_length,
                         holdout=cfg.holdout, num_workers=cfg.num_workers, image_column=cfg.image_column,
                         caption_column=cfg.caption_column, max_items=cfg.max_items)
    print(f"code cache written to {out}")


def cmd_sample(cfg: SampleConfig) -> None:
    check_image_output(cfg.out)  # before minutes of sampling, and never over a checkpoint's files
    pipe = _load(cfg.load)
    prompts = list(cfg.prompts)
    result = pipe(prompts, cfg.sampling, num_images_per_prompt=cfg.num_images, seed=cfg.seed)
    sample_grid(result.images.cpu(), prompts, images_per_prompt=cfg.num_images, path=cfg.out)
    print(f"wrote {cfg.out}")


def cmd_serve(cfg: ServeConfig) -> None:
    app.require_gradio()  # before the checkpoint loads: the error comes at once
    app.launch(_load(cfg.load), host=cfg.host, port=cfg.port, share=cfg.share)


def cmd_push(cfg: PushConfig) -> None:
    url = push_to_hub(cfg.checkpoint, cfg.repo, private=cfg.private)
    print(f"pushed {cfg.checkpoint} to {cfg.repo}: {url}\nload it with parti.load_pipeline({cfg.repo!r})")


def cmd_plot(cfg: PlotConfig) -> None:
    for path in plot_run(cfg.run_dir, out_dir=cfg.out):
        print(path)


def cmd_demo(cfg: DemoConfig) -> None:
    # Both folders before any training: --out holds the two runs and demo.json, --images the pictures.
    check_output(demo_folder(cfg), what="--out", folder=True, replaces=lambda folder: None)
    check_output(cfg.images, what="--images", folder=True, replaces=lambda folder: None)
    summary = run_demo(cfg)
    acc = summary["attribute_accuracy"]
    sec = summary["seconds"]
    print(f"demo finished ({summary['size']} configuration): tokenizer {sec['tokenizer']:.0f} s, generator "
          f"{sec['generator']:.0f} s (times of the run that trained them), sampling and scoring "
          f"{sec['sampling_and_scoring']:.0f} s")
    labels = {"attribute_accuracy": "", "holdout_attribute_accuracy": " (held-out pairs)",
              "heldout_phrasing_attribute_accuracy": " (held-out phrasings)"}
    for prefix, said in labels.items():
        for key in ("background_color", "hair_color", "overall"):
            if f"{prefix}.{key}" in acc:
                print(f"  {key} accuracy{said} {acc[f'{prefix}.{key}']:.2%} "
                      f"(chance {acc.get(f'chance.{key}', float('nan')):.2%})")
    if "grid_attribute_accuracy.unasked" in acc:
        print(f"  unasked-for glasses or hats in the picture: {acc['grid_attribute_accuracy.unasked']:.1%}")
    print(f"  samples: {summary['images'][0]}\n  checkpoints: {summary['checkpoints']['generator']}")


def cmd_evaluate_tokenizer(cfg: TokenizerEvalConfig) -> None:
    out = results_out(cfg, EVAL_TOKENIZER_NAME)  # before minutes of scoring: never over weights or a run's record
    results = evaluate_tokenizer(cfg)
    out = write_results(out, results)
    print(format_table(results))
    print(f"wrote {out}")


def cmd_evaluate(cfg: GeneratorEvalConfig) -> None:
    out = results_out(cfg, EVAL_NAME)  # before minutes of scoring: never over weights or a run's record
    results = evaluate_generator(cfg)
    out = write_results(out, results)
    print(format_table(results))
    print(f"wrote {out}")


# (name, aliases, help, config, handler): a command's flags are its config's fields, and nothing else.
COMMANDS = [
    ("train-tokenizer", (), "train the ViT-VQGAN image tokenizer (stage 1)", TokenizerTrainConfig,
     cmd_train_tokenizer),
    ("train-generator", ("train",), "train the generator (stage 2) on a code cache or dataset (`train` is an alias)",
     GeneratorTrainConfig, cmd_train_generator),
    ("encode", (), "run the frozen tokenizer (and T5) over a dataset once: the code cache", EncodeConfig, cmd_encode),
    ("sample", (), "generate a grid of images for prompts from a generator folder", SampleConfig, cmd_sample),
    ("demo", (), "the main job: train both stages on synthetic faces, sample, evaluate", DemoConfig, cmd_demo),
    ("evaluate-tokenizer", (), "PSNR, SSIM, LPIPS, rFID and code usage on held-out images", TokenizerEvalConfig,
     cmd_evaluate_tokenizer),
    ("evaluate", (), "validation loss, FID, CLIP score and (synthetic) attribute accuracy", GeneratorEvalConfig,
     cmd_evaluate),
    ("plot", (), "draw a run's loss curves and latest grids", PlotConfig, cmd_plot),
    ("push", (), "upload a generator folder (with tokenizer, text encoder, model card) to the Hub", PushConfig,
     cmd_push),
    ("serve", (), "a web demo (Gradio) of a generator folder or Hub repo", ServeConfig, cmd_serve),
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="parti", description="Parti text-to-image on faces.")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, aliases, help_text, config, handler in COMMANDS:
        p = sub.add_parser(name, aliases=list(aliases), help=help_text)
        add_config_flags(p, config)
        p.set_defaults(handler=handler, config_class=config, func=functools.partial(_run, handler, config))
    return parser


def _run(handler, config_class, args: argparse.Namespace) -> None:
    """A command: its config built from the parsed flags (the config checks itself: one-line errors), then run."""
    handler(config_from_args(config_class, args))


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
            distributed.wait_for_every_rank()
        return 2
    except KeyboardInterrupt:
        print("parti: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
