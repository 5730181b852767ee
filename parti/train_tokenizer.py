"""Stage-1 training: `train_tokenizer(TokenizerTrainConfig) -> run folder`.

The ViT-VQGAN learns to reconstruct images through its codebook: L2 + L1 (+ LPIPS) + commitment, and a
hinge GAN loss with its own discriminator and optimizer from `disc_start`. `TokenizerStage` is this stage's
step body; `parti.loop.fit` runs it (resume, logging, evaluation, checkpoints, export).

The run folder's top level is the exported tokenizer (config.json + model.safetensors), loadable with
`parti.load_tokenizer(run_dir)`; run.json, metrics.jsonl, samples/ (reconstruction grids) and
checkpoints/ (resumable training state) sit beside it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from parti import data as data_mod
from parti.checkpoint import SAMPLES_DIR, atomic_export, grid_name, save_model
from parti.distributed import average_gradients, global_codebook_stats, reduce_logs, replicas_agree, total_over_ranks
from parti.errors import PartiError
from parti.loop import Stage, TrainConfig, fit
from parti.losses import LossConfig, TokenizerLoss
from parti.metrics import psnr
from parti.optim import NonFiniteGuard, flatten_optimizer, lr_at, make_adamw, restore_optimizer, set_lr
from parti.plots import reconstruction_grid
from parti.settings import setting
from parti.state import load_module
from parti.tokenizer import TOKENIZER_PRESETS, VQTokenizer, build_tokenizer, save_tokenizer

log = logging.getLogger(__name__)


# (perceptual, adversarial) weights per preset when not given. The CPU presets train on flat synthetic
# faces at 32-64 px, where VGG features add cost and nothing else, and need no download offline.
PRESET_LOSS_WEIGHTS = {"tiny": (0.0, 0.0), "demo": (0.0, 0.0), "base": (0.1, 0.1), "ffhq128": (0.1, 0.1)}


@dataclass
class TokenizerTrainConfig(TrainConfig, LossConfig):
    """Stage 1's settings: the shared training settings, the loss weights (`LossConfig`) and these."""

    preset: str = setting("tiny", "tokenizer size (parti.TOKENIZER_PRESETS)", choices=tuple(TOKENIZER_PRESETS))
    out: str = setting("checkpoints/tokenizer")
    batch_size: int = setting(16)
    lr: float = setting(1e-3)
    weight_decay: float = setting(1e-4)
    grad_clip: float = setting(1.0)
    perceptual_weight: float | None = setting(None, "weight of LPIPS on VGG16 (needs its ImageNet weights); "
                                              "0: off; default: the preset's (0 for tiny and demo)")
    adversarial_weight: float | None = setting(None, "weight of the hinge GAN loss from --disc-start; 0: off; "
                                               "default: the preset's (0 for tiny and demo)")
    pretrained_vgg: bool = setting(True, "ImageNet VGG16 for LPIPS (off: random weights, for benchmarks and "
                                   "tests)")
    val_images: int = setting(64, "validation images for PSNR and the reconstruction grids", minimum=1,
                              maximum=100000)
    flip: bool = setting(True, "random horizontal flips")

    def __post_init__(self):
        if self.preset not in TOKENIZER_PRESETS:
            raise PartiError(f"unknown tokenizer preset {self.preset!r}; choose one of {sorted(TOKENIZER_PRESETS)}")
        perceptual, adversarial = PRESET_LOSS_WEIGHTS.get(self.preset, (0.1, 0.1))
        if self.perceptual_weight is None:
            self.perceptual_weight = perceptual
        if self.adversarial_weight is None:
            self.adversarial_weight = adversarial
        super().__post_init__()
        if self.adversarial_weight > 0 and self.disc_start >= self.steps:
            log.warning("the GAN loss starts at step %d (disc_start), at or after this run's last step %d: "
                        "adversarial_weight %g has no effect; lower disc_start to use it, or set it to 0",
                        self.disc_start, self.steps, self.adversarial_weight)

    def loss_config(self) -> LossConfig:
        return LossConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LossConfig)})


class TokenizerStage(Stage):
    """The autoencoder with its optimizer, and the discriminator with its own (outside DDP)."""

    name = "tokenizer"
    may_skip_batches = True  # image data: a batch whose every image is unreadable arrives as None
    # The export holds the best weights by validation L1 (the reconstruction error of held-out images), and
    # overfitting compares it with the training L1. Once the GAN is on, later evaluations compete apart.
    val_metric, train_metric = "val_l1", "l1"

    def __init__(self, cfg: TokenizerTrainConfig, acc, state):
        self.cfg, self.acc = cfg, acc
        self.model = build_tokenizer(cfg.preset)
        size = self.model.config.image_size
        self.loss_fn = TokenizerLoss(cfg.loss_config(), image_size=size, pretrained_vgg=cfg.pretrained_vgg)
        self.train_set, val_set = data_mod.open_split(cfg, "train", size), data_mod.open_split(cfg, "val", size)
        self.collate, self.flip_prob = data_mod.collate, 0.5 if cfg.flip else 0.0
        self.val_images = data_mod.val_batch(val_set, cfg.val_images).to(acc.device)
        self.model_config = dataclasses.asdict(self.model.config)
        self.disc = self.loss_fn.discriminator
        self.optimizer = make_adamw(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    betas=(0.9, 0.99))
        self.opt_d = (make_adamw(self.disc.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
                      if self.disc is not None else None)
        self.guard, self.guard_d = NonFiniteGuard(), NonFiniteGuard(what="discriminator loss")
        self.guards = [self.guard, self.guard_d]
        self.grad_norm = torch.tensor(float("nan"))
        self.raw: VQTokenizer = self.model
        self.gan_start = cfg.disc_start if self.disc is not None else None

    def restore(self, tensors, meta) -> None:
        load_module(self.model, tensors, "model", what="tokenizer weights")  # codebook usage buffers included
        restore_optimizer(self.optimizer, tensors, meta["opt"], "opt")
        if self.disc is not None and "disc_opt" in meta:
            load_module(self.disc, tensors, "disc", what="discriminator")
            restore_optimizer(self.opt_d, tensors, meta["disc_opt"], "optd")
        elif self.disc is not None:
            log.warning("the checkpoint has no discriminator (adversarial loss was off): starting a fresh one")

    def prepare(self) -> None:
        acc = self.acc
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        self.loss_fn.to(acc.device)
        if self.disc is not None:
            # D stays outside DDP: the loss calls it both frozen (generator term) and trained (its own
            # term); its gradients are averaged over ranks by hand before its step.
            self.opt_d = acc.prepare(self.opt_d)
        self.raw = acc.unwrap_model(self.model)

    def train_step(self, batch, step: int) -> int:
        acc, cfg = self.acc, self.cfg
        images = batch["image"].to(acc.device, non_blocking=True)  # (B, 3, S, S) in [-1, 1]
        with acc.autocast():
            res = self.model(images)
            loss, logs = self.loss_fn.generator_loss(images, res.reconstruction.float(), commit_loss=res.commit_loss,
                                                     step=step, last_layer=self.raw.last_layer)
        # No host read here: a non-finite loss makes fused AdamW skip the step on the device (the
        # discriminator's too: it does not learn from a step the autoencoder skipped).
        if self.guard.step(loss, acc, self.optimizer):
            self.optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            self.grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            if self.disc is not None and self.loss_fn.adversarial_on(step):
                logs.update(self._discriminator_step(images, res.reconstruction.float(), step))
        self.last = (images, res, logs)
        return images.shape[0]

    def _discriminator_step(self, images: torch.Tensor, fake: torch.Tensor, step: int) -> dict[str, float]:
        acc, cfg = self.acc, self.cfg
        set_lr(self.opt_d, lr_at(step, base=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps))
        with acc.autocast():
            d_loss, d_logs = self.loss_fn.discriminator_loss(images, fake, step=step)
        if self.guard_d.step(d_loss, acc, self.opt_d, skip_also=self.guard.bad):
            self.opt_d.zero_grad(set_to_none=True)
            acc.backward(d_loss)
            average_gradients(acc, self.disc)
            self.opt_d.step()
        return d_logs

    def log_row(self) -> dict:
        images, res, logs = self.last
        logs = {**logs, "psnr": float(psnr(res.reconstruction.detach().float().clamp(-1, 1), images).mean())}
        return {**reduce_logs(self.acc, logs),
                **global_codebook_stats(self.acc, res.codes, self.raw.config.codebook_size),
                "grad_norm": float(self.grad_norm),
                "skipped_images": int(total_over_ranks(self.acc, getattr(self.train_set, "skipped", 0)))}

    def postfix(self, row) -> dict[str, str]:
        return {"loss": f"{row['total']:.4f}", "psnr": f"{row['psnr']:.2f}", "usage": f"{row['usage']:.2f}"}

    def evaluate(self, step: int) -> dict[str, float]:
        val = self.val_images
        recon = torch.cat([self.raw(val[i:i + 32]).reconstruction for i in range(0, len(val), 32)])
        if self.acc.is_main_process:
            reconstruction_grid(val[:8].cpu(), recon[:8].float().cpu(), title=f"step {step}",
                                path=Path(self.cfg.out) / SAMPLES_DIR / grid_name(step))
        return {"val_psnr": float(psnr(recon.float().clamp(-1, 1), val).mean()),
                "val_l1": float((recon.float() - val).abs().mean())}

    def training_state(self):
        tensors = {f"model.{k}": v for k, v in self.raw.state_dict().items()}
        opt_t, opt_meta = flatten_optimizer(self.optimizer, "opt")
        tensors.update(opt_t)
        meta = {"opt": opt_meta}
        if self.disc is not None:
            tensors.update({f"disc.{k}": v for k, v in self.disc.state_dict().items()})
            d_t, meta["disc_opt"] = flatten_optimizer(self.opt_d, "optd")
            tensors.update(d_t)
        return tensors, meta

    def in_sync(self) -> bool:
        return replicas_agree(self.acc, self.raw) and (self.disc is None or replicas_agree(self.acc, self.disc))

    def export_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.raw.state_dict().items()}

    def export(self, weights=None, best=None) -> None:
        """The tokenizer at the run's top: `weights` (the best evaluation's, `best` in config.json) or the
        current ones."""
        with atomic_export(self.cfg.out) as stage:  # appears complete or not at all
            if weights is None:
                save_tokenizer(self.raw, stage)
            else:
                model = copy.deepcopy(self.raw)  # a copy: the weights trained go on unchanged
                model.load_state_dict(weights)
                save_model(stage, "tokenizer", model.config, model, extra={"best": best})

    def trained_modules(self):
        return [self.raw, self.disc]


def train_tokenizer(cfg: TokenizerTrainConfig) -> Path:
    """Train the tokenizer as `cfg` says; returns the run folder."""
    return fit(TokenizerStage, cfg)
