"""Stage-2 training: `train_generator(GeneratorTrainConfig) -> run folder`.

Reads a code cache (made first with `parti encode`, or here into OUT/cache when --data is a dataset),
trains the generator (and the trainable text encoder jointly, as the Parti paper does) with
cross-entropy on the codes, condition dropout for classifier-free guidance, warmup + cosine LR,
grad clip 4.0 and optional EMA. The run folder's top level is the exported generator; with
tokenizer/ (and text_encoder/) beside it, `parti.load_pipeline(OUT)` needs nothing else.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from parti import text as text_mod
from parti.cache import CodeCache, collate_codes, encode_dataset, is_cache
from parti.checkpoint import config_from_dict
from parti.errors import PartiError
from parti.generator import GENERATOR_PRESETS, Generator, build_generator, save_generator
from parti.pipeline import Pipeline
from parti.plots import sample_grid
from parti.prompts import sample_prompts
from parti.runs import MetricsLogger, RunFolder
from parti.tokenizer import load_tokenizer, save_tokenizer
from parti.trainer import (Checkpoints, EMA, NonFiniteGuard, StopRequest, batch_stream, capture_rng, check_resumable,
                           check_stage, flatten_optimizer, load_module, lr_at, make_accelerator, make_adamw, on_main,
                           remove_temporaries, replicas_agree, restore_optimizer, restore_rng, rng_untouched,
                           seed_everything, set_lr)

log = logging.getLogger(__name__)


@dataclass
class GeneratorTrainConfig:
    data: str = "synthetic"  # a code cache folder, or a data spec (encoded into OUT/cache first)
    tokenizer: str = "checkpoints/tokenizer"
    preset: str = "tiny"
    out: str = "checkpoints/generator"
    text_encoder: str = "trainable"  # trainable | t5-small | t5-base | t5-large | hub name | local folder
    text_preset: str = "small"  # trainable encoder size
    text_tokenizer: str = "sentencepiece"  # trainable encoder tokenizer: sentencepiece | bytes
    vocab_size: int = 1000
    steps: int = 1000
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 4.0  # Parti's value
    cond_drop_prob: float = 0.1
    ema_decay: float = 0.0  # 0: off; e.g. 0.999 exports EMA weights
    guidance_scale: float = 3.0  # for the periodic sample grids
    log_every: int = 10
    sample_every: int = 500
    save_every: int = 500
    val_batches: int = 4
    keep_checkpoints: int = 2
    seed: int = 0
    mixed_precision: str = "auto"
    cpu: bool = False
    num_workers: int = 0
    synthetic_length: int = 20000
    holdout: bool = False  # synthetic: leave the (hair, background) pairs of HOLDOUT_COMBINATIONS out
    image_column: str = ""
    caption_column: str = ""
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.preset not in GENERATOR_PRESETS:
            raise PartiError(f"unknown generator preset {self.preset!r}; choose one of {sorted(GENERATOR_PRESETS)}")
        if self.text_preset not in text_mod.TEXT_ENCODER_PRESETS:
            raise PartiError(f"unknown --text-preset {self.text_preset!r}; "
                             f"choose one of {sorted(text_mod.TEXT_ENCODER_PRESETS)}")
        if self.text_tokenizer not in ("sentencepiece", "bytes"):
            raise PartiError(f"--text-tokenizer must be sentencepiece or bytes, got {self.text_tokenizer!r}")
        for name in ("steps", "batch_size", "log_every", "sample_every", "save_every", "val_batches"):
            if getattr(self, name) < 1:
                raise PartiError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


class Objective(nn.Module):
    """Generator (+ trainable text encoder): one module so DDP sees every trained parameter."""

    def __init__(self, generator: Generator, text_encoder: nn.Module | None):
        super().__init__()
        self.generator, self.text_encoder = generator, text_encoder

    def forward(self, codes, ids, ids_mask, drop) -> torch.Tensor:
        if self.text_encoder is not None:
            ids_mask = ids_mask.bool()
            ids = self.text_encoder(ids, ids_mask)
        ctx, mask = self.generator.encode_condition(ids, ids_mask, drop=drop)
        logits = self.generator(codes, ctx, mask)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))
        # A batch with no dropped row leaves the null context unused; DDP needs every parameter in the
        # graph on every rank, so it always gets a (zero) gradient. Adds exactly 0 to the loss.
        return loss + 0.0 * self.generator.null_context.sum()


def _text_inputs(batch, encoder, device):
    """Token ids for the trainable encoder, or cached frozen-T5 states, with their masks."""
    if encoder is not None:
        ids, mask = encoder.tokenizer(batch["caption"])
        return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    return batch["text"].to(device, non_blocking=True).float(), batch["text_mask"].to(device, non_blocking=True)


def _prepare_text_encoder(cfg, captions: list[str], device, state):
    """The trainable encoder: rebuilt from the training checkpoint when resuming (its config and its
    sentencepiece model live there), else sentencepiece trained on the captions once. Frozen T5 otherwise."""
    if cfg.text_encoder != "trainable":
        return text_mod.load_t5(cfg.text_encoder, device=device)
    if state is not None and "text_encoder_config" in state[1]:
        tensors, meta = state
        config = config_from_dict(text_mod.TextEncoderConfig, meta["text_encoder_config"], what="checkpoint")
        if config.tokenizer == "sentencepiece":
            proto = tensors["text_tokenizer.proto"].numpy().tobytes()
            tok = text_mod.SentencePieceTokenizer.from_proto(proto, max_length=config.max_length)
        else:
            tok = text_mod.ByteTokenizer(max_length=config.max_length)
        return text_mod.TrainableTextEncoder(config, tokenizer=tok).to(device)  # weights: from the checkpoint
    preset = text_mod.TEXT_ENCODER_PRESETS[cfg.text_preset]
    if cfg.text_tokenizer == "bytes":
        config = dataclasses.replace(preset, tokenizer="bytes", vocab_size=text_mod.ByteTokenizer.vocab_size)
    else:
        config = dataclasses.replace(preset, tokenizer="sentencepiece", vocab_size=cfg.vocab_size)
    return text_mod.build_text_encoder("trainable", captions=captions, config=config, device=device)


def train_generator(cfg: GeneratorTrainConfig) -> Path:
    acc = make_accelerator(cfg.mixed_precision, cpu=cfg.cpu)
    out = Path(cfg.out)
    check_stage(out, "generator", resume=cfg.resume)
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.tokenizer, device=acc.device)
    ckpts = Checkpoints(out, keep=cfg.keep_checkpoints)
    state = ckpts.latest() if cfg.resume else None
    if state is not None:
        trained_with = state[1].get("tokenizer_fingerprint")
        if trained_with not in (None, tokenizer.fingerprint()):
            raise PartiError(f"{out} was trained with tokenizer {trained_with}, but --tokenizer {cfg.tokenizer} is "
                             f"{tokenizer.fingerprint()}; resume with the tokenizer the run started with")

    # The cache: given, or made here once (main process) from the dataset with the frozen encoders.
    frozen_t5 = None if cfg.text_encoder == "trainable" else text_mod.load_t5(cfg.text_encoder, device=acc.device)
    cache_dir = Path(cfg.data) if is_cache(cfg.data) else out / "cache"
    if not is_cache(cache_dir):
        on_main(acc, lambda: encode_dataset(
            data=cfg.data, tokenizer=cfg.tokenizer, out=cache_dir, text_encoder=frozen_t5, device=acc.device,
            synthetic_length=cfg.synthetic_length, seed=cfg.seed, holdout=cfg.holdout, num_workers=cfg.num_workers,
            image_column=cfg.image_column or None,
            caption_column=cfg.caption_column or None, progress=cfg.progress))
    acc.wait_for_everyone()
    train_set, val_set = CodeCache(cache_dir, "train"), CodeCache(cache_dir, "val")
    for ds in (train_set, val_set):
        ds.check(tokenizer_fingerprint=tokenizer.fingerprint(),
                 text_identity=frozen_t5.identity() if frozen_t5 is not None else None, holdout=cfg.holdout)
        if frozen_t5 is not None and not ds.has_text:
            raise PartiError(f"cache {cache_dir} holds no T5 states; re-run `parti encode --text-encoder "
                             f"{cfg.text_encoder}`")

    encoder = frozen_t5 or _prepare_text_encoder(cfg, train_set.captions, acc.device, state)
    trainable = encoder if getattr(encoder, "trainable", False) else None
    generator = build_generator(cfg.preset, num_codes=tokenizer.config.codebook_size,
                                grid_size=tokenizer.config.grid_size, text_dim=encoder.dim,
                                cond_drop_prob=cfg.cond_drop_prob)
    objective = Objective(generator, trainable).to(acc.device)
    model_config = dataclasses.asdict(generator.config)
    if state is not None:
        check_resumable(state[1], stage="generator", model=model_config, where=out)
    run = on_main(acc, lambda: RunFolder(out, config={"stage": "generator", **dataclasses.asdict(cfg),
                                                      "model": model_config},
                                         resume=cfg.resume, mixed_precision=acc.mixed_precision))
    acc.wait_for_everyone()
    opt = make_adamw(objective.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(generator, cfg.ema_decay) if cfg.ema_decay > 0 else None

    step, epoch, position = 0, 0, 0
    if state is not None:
        tensors, meta = state
        load_module(objective, tensors, "obj", what="generator and text encoder weights")
        restore_optimizer(opt, tensors, meta["opt"], "opt")
        if ema is not None:
            ema.load(tensors, "ema")
        restore_rng(tensors)  # last: building the models above drew from the RNG
        step, epoch, position = meta["step"], meta["epoch"], meta["position"]
        log.info("resumed from step %d", step)
    model, opt = acc.prepare(objective, opt)
    metrics = MetricsLogger(run.metrics_path) if run else None
    if metrics is not None and state is not None:
        metrics.truncate_after(step)
    meta_extra = {"tokenizer_fingerprint": tokenizer.fingerprint(), "text_encoder": encoder.identity(),
                  "text_encoder_source": cfg.text_encoder, "data": cfg.data}

    def export() -> None:
        """Top level of the run: the generator (EMA weights when on), its tokenizer and text encoder."""
        with rng_untouched():
            export_gen = generator
            if ema is not None:
                export_gen = copy.deepcopy(generator)  # not build_generator: no fresh init, no RNG draws
                export_gen.load_state_dict(ema.shadow)
            if trainable is not None:
                text_mod.save_text_encoder(trainable, out / "text_encoder")
                meta_extra["text_encoder"] = trainable.identity()
            if not (out / "tokenizer" / "config.json").exists():
                save_tokenizer(tokenizer, out / "tokenizer")
            save_generator(export_gen, out, extra=meta_extra)

    def save(at: int, ep: int, pos: int) -> None:
        in_sync = replicas_agree(acc, objective)  # every rank takes part
        if not acc.is_main_process:
            return
        tensors = {f"obj.{k}": v for k, v in objective.state_dict().items()}
        opt_t, opt_meta = flatten_optimizer(opt, "opt")
        tensors.update(opt_t)
        meta = {"stage": "generator", "model": model_config, "epoch": ep, "position": pos, "opt": opt_meta,
                "tokenizer_fingerprint": tokenizer.fingerprint(), "replicas_in_sync": in_sync,
                "world_size": acc.num_processes}
        if ema is not None:
            tensors.update({f"ema.{k}": v for k, v in ema.shadow.items()})
        if trainable is not None:  # a resumed run rebuilds the text encoder from here alone
            meta["text_encoder_config"] = dataclasses.asdict(trainable.config)
            if isinstance(trainable.tokenizer, text_mod.SentencePieceTokenizer):
                tensors["text_tokenizer.proto"] = torch.frombuffer(bytearray(trainable.tokenizer.proto),
                                                                   dtype=torch.uint8)
        ckpts.save(at, {**tensors, **capture_rng()}, meta)
        export()  # after the training state: a torn export is rewritten from it on --resume

    @torch.no_grad()
    def evaluate(at: int) -> dict[str, float]:
        model.eval()
        losses = []
        with rng_untouched():  # evaluation and sampling never move the training RNG (resume equality)
            n = min(cfg.val_batches, max(1, len(val_set) // cfg.batch_size))
            for b in range(n):
                items = [val_set[i] for i in range(b * cfg.batch_size, min(len(val_set), (b + 1) * cfg.batch_size))]
                batch = collate_codes(items)
                ids, mask = _text_inputs(batch, trainable, acc.device)
                with acc.autocast():
                    losses.append(float(objective(batch["codes"].to(acc.device), ids, mask, None)))
            if acc.is_main_process:
                prompts = list(sample_prompts(cfg.data))
                pipe = Pipeline(tokenizer=tokenizer, generator=generator, text_encoder=encoder, device=acc.device)
                result = pipe(prompts, num_images_per_prompt=4, guidance_scale=cfg.guidance_scale, seed=0)
                sample_grid(result.images.float().cpu(), prompts, images_per_prompt=4,
                            path=out / "samples" / f"step_{at:07d}.png")
        model.train()
        val = sum(losses) / len(losses)
        return {"val_loss": val, "val_perplexity": float(torch.exp(torch.tensor(val)))}

    if state is not None and acc.is_main_process:
        remove_temporaries(out)
        export()  # rewrite an export a kill may have torn, from the checkpoint
    guard, stop = NonFiniteGuard(), StopRequest()
    stream = batch_stream(train_set, collate_codes, batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch,
                          start=position, rank=acc.process_index, world=acc.num_processes, num_workers=cfg.num_workers,
                          pin_memory=acc.device.type == "cuda")
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, disable=not (cfg.progress and acc.is_main_process), desc="generator")
    t0, seen, grad_norm = time.time(), 0, torch.tensor(float("nan"))
    rank, world = acc.process_index, acc.num_processes
    with stop.installed():
        while step < cfg.steps:
            epoch, position, batch = next(stream)
            position += 1
            codes = batch["codes"].to(acc.device, non_blocking=True)
            ids, mask = _text_inputs(batch, trainable, acc.device)
            # Condition dropout drawn for the global batch, this rank taking its slice: N processes at
            # batch B drop the same rows as one process at batch N*B.
            b = codes.shape[0]
            drop = (torch.rand(b * world, device=acc.device) < cfg.cond_drop_prob)[rank * b:(rank + 1) * b]
            set_lr(opt, lr_at(step, base=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps))
            with acc.autocast():
                loss = model(codes, ids, mask, drop)
            # No host read here: a non-finite loss makes fused AdamW and the EMA skip the step on the device.
            if guard.step(loss, acc, opt):
                opt.zero_grad(set_to_none=True)
                acc.backward(loss)
                grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                if ema is not None:
                    ema.update(generator, skip=guard.bad)
            step += 1
            seen += codes.shape[0] * world
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                guard.report()
                value = float(acc.reduce(loss.detach(), reduction="mean"))
                row = {"loss": value, "grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"],
                       "images_per_s": seen / (time.time() - t0), "nonfinite_steps": guard.total}
                if metrics:
                    metrics.log(step, **row)
                bar.set_postfix(loss=f"{value:.4f}")
            if step % cfg.sample_every == 0 or step == cfg.steps:
                row = evaluate(step)
                if metrics:
                    metrics.log(step, split="val", **row)
            stopping = stop.should_stop(acc)
            if step % cfg.save_every == 0 or step == cfg.steps or stopping:
                guard.report()  # a run of non-finite losses stops here, before the save
                save(step, epoch, position)
                acc.wait_for_everyone()
            if stopping:
                log.warning("stopped at step %d; rerun with --resume to continue", step)
                break
    bar.close()
    if metrics:
        metrics.close()
    return out


def config_from_args(values: dict) -> GeneratorTrainConfig:
    return config_from_dict(GeneratorTrainConfig, values, what="train")



