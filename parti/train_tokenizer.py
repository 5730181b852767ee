"""Stage-1 training: `train_tokenizer(TokenizerTrainConfig) -> run folder`.

The run folder's top level is the exported tokenizer (config.json + model.safetensors), loadable with
`parti.load_tokenizer(run_dir)`; run.json, metrics.jsonl, samples/ (reconstruction grids) and
checkpoints/ (resumable training state) sit beside it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from parti import data as data_mod
from parti.checkpoint import config_from_dict
from parti.errors import PartiError
from parti.losses import LossConfig, TokenizerLoss
from parti.metrics import psnr
from parti.plots import reconstruction_grid
from parti.runs import MetricsLogger, RunFolder
from parti.tokenizer import TOKENIZER_PRESETS, VQTokenizer, build_tokenizer, save_tokenizer
from parti.trainer import (Checkpoints, NonFiniteGuard, StopRequest, average_gradients, batch_stream, capture_rng,
                           check_resumable, check_stage, codebook_stats, flatten_optimizer, load_module, lr_at,
                           make_accelerator, make_adamw, on_main, reduce_logs, remove_temporaries, replicas_agree,
                           restore_optimizer, restore_rng, rng_untouched, seed_everything, set_lr, total_over_ranks)

log = logging.getLogger(__name__)


# (perceptual, adversarial) weights per preset when not given. The CPU presets train on flat synthetic
# faces at 32-64 px, where VGG features add cost and nothing else, and need no download offline.
PRESET_LOSS_WEIGHTS = {"tiny": (0.0, 0.0), "demo": (0.0, 0.0), "base": (0.1, 0.1), "ffhq128": (0.1, 0.1)}


@dataclass
class TokenizerTrainConfig:
    data: str = "synthetic"
    preset: str = "tiny"
    out: str = "checkpoints/tokenizer"
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    l2_weight: float = 1.0
    l1_weight: float = 1.0
    perceptual_weight: float = -1.0  # -1: the preset's default (PRESET_LOSS_WEIGHTS)
    adversarial_weight: float = -1.0  # -1: the preset's default
    disc_start: int = 10000
    disc_channels: int = 64
    vgg_weights: str = ""  # local VGG16 weights file; empty: cache, then download
    pretrained_vgg: bool = True  # False: random-init VGG (benchmarks/tests only)
    log_every: int = 10
    sample_every: int = 500
    save_every: int = 500
    val_images: int = 64
    keep_checkpoints: int = 2
    seed: int = 0
    mixed_precision: str = "auto"
    cpu: bool = False
    num_workers: int = 0
    flip: bool = True  # random horizontal flips
    synthetic_length: int = 20000
    holdout: bool = False  # synthetic: leave the (hair, background) pairs of HOLDOUT_COMBINATIONS out
    image_column: str = ""
    caption_column: str = ""
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.preset not in TOKENIZER_PRESETS:
            raise PartiError(f"unknown tokenizer preset {self.preset!r}; choose one of {sorted(TOKENIZER_PRESETS)}")
        for name in ("steps", "batch_size", "log_every", "sample_every", "save_every"):
            if getattr(self, name) < 1:
                raise PartiError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise PartiError(f"--lr must be > 0, got {self.lr}")
        perceptual, adversarial = PRESET_LOSS_WEIGHTS.get(self.preset, (0.1, 0.1))
        if self.perceptual_weight == -1.0:
            self.perceptual_weight = perceptual
        if self.adversarial_weight == -1.0:
            self.adversarial_weight = adversarial


def open_split(cfg, split: str, image_size: int):
    return data_mod.open_source(cfg.data, split=split, image_size=image_size,
                                image_column=cfg.image_column or None, caption_column=cfg.caption_column or None,
                                synthetic_length=cfg.synthetic_length if split == "train" else None,
                                seed=cfg.seed, holdout=cfg.holdout)


def val_batch(source, n: int) -> torch.Tensor:
    """The first n readable validation images, (n, 3, S, S): a fixed set for curves and grids."""
    images = []
    for i in range(min(len(source), 4 * n)):
        item = source[i]
        if item is not None:
            images.append(item["image"])
        if len(images) == n:
            break
    if not images:
        raise PartiError("the validation split holds no readable images")
    return torch.stack(images)


def train_tokenizer(cfg: TokenizerTrainConfig) -> Path:
    acc = make_accelerator(cfg.mixed_precision, cpu=cfg.cpu)
    out = Path(cfg.out)
    check_stage(out, "tokenizer", resume=cfg.resume)
    seed_everything(cfg.seed)
    model = build_tokenizer(cfg.preset)
    size = model.config.image_size
    loss_fn = TokenizerLoss(LossConfig(l2_weight=cfg.l2_weight, l1_weight=cfg.l1_weight,
                                       perceptual_weight=cfg.perceptual_weight,
                                       adversarial_weight=cfg.adversarial_weight, disc_start=cfg.disc_start,
                                       disc_channels=cfg.disc_channels, vgg_weights=cfg.vgg_weights or None),
                            image_size=size, pretrained_vgg=cfg.pretrained_vgg)
    train_src, val_src = open_split(cfg, "train", size), open_split(cfg, "val", size)
    val_images = val_batch(val_src, cfg.val_images).to(acc.device)
    model_config = dataclasses.asdict(model.config)

    ckpts = Checkpoints(out, keep=cfg.keep_checkpoints)
    state = ckpts.latest() if cfg.resume else None  # before run.json changes: a refusal leaves no trace
    if state is not None:
        check_resumable(state[1], stage="tokenizer", model=model_config, where=out)
    run = on_main(acc, lambda: RunFolder(out, config={"stage": "tokenizer", **dataclasses.asdict(cfg),
                                                      "model": model_config},
                                         resume=cfg.resume, mixed_precision=acc.mixed_precision))
    acc.wait_for_everyone()
    disc = loss_fn.discriminator
    opt = make_adamw(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    opt_d = make_adamw(disc.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99)) if disc else None

    step, epoch, position = 0, 0, 0
    if state is not None:
        tensors, meta = state
        load_module(model, tensors, "model", what="tokenizer weights")  # codebook usage buffers included
        restore_optimizer(opt, tensors, meta["opt"], "opt")
        if disc is not None and "disc_opt" in meta:
            load_module(disc, tensors, "disc", what="discriminator")
            restore_optimizer(opt_d, tensors, meta["disc_opt"], "optd")
        elif disc is not None:
            log.warning("the checkpoint has no discriminator (adversarial loss was off): starting a fresh one")
        restore_rng(tensors)  # last: building the models above drew from the RNG
        step, epoch, position = meta["step"], meta["epoch"], meta["position"]
        log.info("resumed from step %d", step)
    model, opt = acc.prepare(model, opt)
    loss_fn.to(acc.device)
    if disc is not None:
        # D stays outside DDP: the loss calls it both frozen (generator term) and trained (its own
        # term); its gradients are averaged over ranks by hand before its step.
        opt_d = acc.prepare(opt_d)
    raw: VQTokenizer = acc.unwrap_model(model)
    metrics = MetricsLogger(run.metrics_path) if run else None
    if metrics is not None and state is not None:
        metrics.truncate_after(step)

    def export() -> None:
        with rng_untouched():
            save_tokenizer(raw, out)

    def save(at: int, ep: int, pos: int) -> None:
        in_sync = replicas_agree(acc, raw) and (disc is None or replicas_agree(acc, disc))  # every rank calls
        if not acc.is_main_process:
            return
        tensors = {f"model.{k}": v for k, v in raw.state_dict().items()}
        opt_t, opt_meta = flatten_optimizer(opt, "opt")
        meta = {"stage": "tokenizer", "model": model_config, "epoch": ep, "position": pos, "opt": opt_meta,
                "replicas_in_sync": in_sync, "world_size": acc.num_processes}
        tensors.update(opt_t)
        if disc is not None:
            tensors.update({f"disc.{k}": v for k, v in disc.state_dict().items()})
            d_t, meta["disc_opt"] = flatten_optimizer(opt_d, "optd")
            tensors.update(d_t)
        ckpts.save(at, {**tensors, **capture_rng()}, meta)
        export()  # after the training state: a torn export is rewritten from it on --resume

    @torch.no_grad()
    def evaluate(at: int) -> dict[str, float]:
        model.eval()
        with rng_untouched():  # evaluation never moves the training RNG (resume equality)
            recon = torch.cat([raw(val_images[i:i + 32]).reconstruction for i in range(0, len(val_images), 32)])
            if acc.is_main_process:
                reconstruction_grid(val_images[:8].cpu(), recon[:8].float().cpu(), title=f"step {at}",
                                    path=out / "samples" / f"step_{at:07d}.png")
        model.train()
        return {"val_psnr": float(psnr(recon.float().clamp(-1, 1), val_images).mean()),
                "val_l1": float((recon.float() - val_images).abs().mean())}

    if state is not None and acc.is_main_process:
        remove_temporaries(out)
        export()  # rewrite an export a kill may have torn, from the checkpoint
    guard, guard_d, stop = NonFiniteGuard(), NonFiniteGuard(what="discriminator loss"), StopRequest()
    stream = batch_stream(train_src, data_mod.collate, batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch,
                          start=position, rank=acc.process_index, world=acc.num_processes,
                          num_workers=cfg.num_workers, flip_prob=0.5 if cfg.flip else 0.0,
                          pin_memory=acc.device.type == "cuda")
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, disable=not (cfg.progress and acc.is_main_process), desc="tokenizer")
    t0, seen, grad_norm = time.time(), 0, torch.tensor(float("nan"))
    with stop.installed():
        while step < cfg.steps:
            epoch, position, batch = next(stream)
            position += 1
            # Every image of a batch unreadable (each was warned about): skip it, on all ranks together.
            if total_over_ranks(acc, float(batch is None)) > 0:
                continue
            images = batch["image"].to(acc.device, non_blocking=True)
            set_lr(opt, lr_at(step, base=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps))
            with acc.autocast():
                res = model(images)
                loss, logs = loss_fn.generator_loss(images, res.reconstruction.float(), commit_loss=res.commit_loss,
                                                    step=step, last_layer=raw.last_layer)
            # No host read here: a non-finite loss makes fused AdamW skip the step on the device (the
            # discriminator's too: it does not learn from a step the autoencoder skipped).
            if guard.step(loss, acc, opt):
                opt.zero_grad(set_to_none=True)
                acc.backward(loss)
                grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                if disc is not None and loss_fn.adversarial_on(step):
                    set_lr(opt_d, lr_at(step, base=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps))
                    with acc.autocast():
                        d_loss, d_logs = loss_fn.discriminator_loss(images, res.reconstruction.float(), step=step)
                    if guard_d.step(d_loss, acc, opt_d, skip_also=guard.bad):
                        opt_d.zero_grad(set_to_none=True)
                        acc.backward(d_loss)
                        average_gradients(acc, disc)
                        opt_d.step()
                    logs.update(d_logs)
            step += 1
            seen += images.shape[0] * acc.num_processes
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                guard.report()
                guard_d.report()
                logs["psnr"] = float(psnr(res.reconstruction.detach().float().clamp(-1, 1), images).mean())
                row = {**reduce_logs(acc, logs), **codebook_stats(acc, res.codes, raw.config.codebook_size),
                       "grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"],
                       "images_per_s": seen / (time.time() - t0),
                       "skipped_images": int(total_over_ranks(acc, getattr(train_src, "skipped", 0))),
                       "nonfinite_steps": guard.total + guard_d.total}
                if metrics:
                    metrics.log(step, **row)
                bar.set_postfix(loss=f"{row['total']:.4f}", psnr=f"{row['psnr']:.2f}", usage=f"{row['usage']:.2f}")
            if step % cfg.sample_every == 0 or step == cfg.steps:
                row = evaluate(step)
                if metrics:
                    metrics.log(step, split="val", **row)
            stopping = stop.should_stop(acc)
            if step % cfg.save_every == 0 or step == cfg.steps or stopping:
                guard.report()  # a run of non-finite losses stops here, before the save
                guard_d.report()
                save(step, epoch, position)
                acc.wait_for_everyone()
            if stopping:
                log.warning("stopped at step %d; rerun with --resume to continue", step)
                break
    bar.close()
    if metrics:
        metrics.close()
    return out


def config_from_args(values: dict) -> TokenizerTrainConfig:
    return config_from_dict(TokenizerTrainConfig, values, what="train-tokenizer")
