"""Losses for training the ViT-VQGAN tokenizer (stage 1), kept outside the model.

Holds the frozen VGG16 feature stack and its weight loading, LPIPS on top of it, a StyleGAN-style
discriminator with hinge losses, taming-style adaptive weighting, and `TokenizerLoss`, which combines
them. Nothing here downloads on construction unless pretrained VGG weights are asked for and absent;
`LPIPS.build(pretrained=False)` and `perceptual_weight=0` never need any file besides torchmetrics' heads.

How a trainer uses it, with two optimizers (the discriminator is trained only by `discriminator_loss`):

    loss_fn = TokenizerLoss(config, image_size=128)
    opt_g = AdamW(tokenizer.parameters())
    opt_d = AdamW(loss_fn.discriminator.parameters())     # when loss_fn.discriminator is not None
    total, logs = loss_fn.generator_loss(real, fake, commit_loss=commit, step=step, last_layer=w_last)
    opt_g.zero_grad(); total.backward(); opt_g.step()      # D is frozen inside: its .grad stays untouched
    if loss_fn.adversarial_on(step):
        d_loss, d_logs = loss_fn.discriminator_loss(real, fake, step=step)   # fake is detached inside
        opt_d.zero_grad(); d_loss.backward(); opt_d.step()

Checkpoint only `loss_fn.discriminator.state_dict()` in the training state; LPIPS is frozen and rebuilt.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from parti.checkpoint import download_weights, parti_home, read_tensors, read_weights_file, write_tensors
from parti.errors import PartiError
from parti.settings import check_settings, setting

logger = logging.getLogger(__name__)

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision's ImageNet VGG16
VGG16_CACHE_NAME = "vgg16_features.safetensors"
LPIPS_HEADS_CACHE_NAME = "lpips_vgg_heads.safetensors"

# torchvision vgg16 "D" config: ints are 3x3 conv widths, "M" a 2x2 max-pool. The final pool (index 30)
# carries no weights, and LPIPS never uses it, so we stop at relu5_3 (index 29).
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)




class VGG16Features(nn.Module):
    """torchvision's vgg16().features up to relu5_3, same indices, so `features.N.weight` keys map 1:1.

    Always frozen: parameters never require grad and `.train()` on a parent keeps it in eval mode.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for item in _VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                c_in = item
        self.features = nn.Sequential(*layers)
        # channels-last (NHWC) convolutions: oneDNN's native layout on CPUs and the tensor cores' on GPUs;
        # faster forward + backward than NCHW on CPU (measured in benchmarks/bench_tokenizer.py).
        self.to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> VGG16Features:
        return super().train(False)  # frozen feature extractor: ignore mode

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # x: (B, 3, H, W), already ImageNet-scaled -> 5 taps (B, C_i, H / 2**i, W / 2**i)
        taps = []
        x = x.contiguous(memory_format=torch.channels_last)
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _LPIPS_TAPS:
                taps.append(x)
        return taps


def _vgg_weights_help(cache: Path) -> str:
    return (f"put VGG16 weights at {cache} (safetensors, features.* keys) or pass --vgg-weights PATH "
            f"(vgg16-397923af.pth or .safetensors); perceptual_weight=0 disables the perceptual loss")


def _features_only(state: dict[str, torch.Tensor], *, source: Path) -> dict[str, torch.Tensor]:
    """Keep `features.*` (a full torchvision vgg16 also has classifier.*); accept bare `N.weight` keys."""
    if not any(k.startswith("features.") for k in state):
        state = {f"features.{k}": v for k, v in state.items()}
    feats = {k: v.float() for k, v in state.items() if k.startswith("features.")}
    expected = set(VGG16Features().state_dict())
    missing = sorted(expected - set(feats))
    if missing:
        raise PartiError(f"{source} does not hold VGG16 features weights (missing {missing[0]} and "
                         f"{len(missing) - 1} more); give torchvision's vgg16-397923af.pth")
    return {k: feats[k] for k in sorted(expected)}


def _try_cache(path: Path, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Write a safetensors cache; a read-only home is a warning, not a failure."""
    try:
        write_tensors(path, state, metadata={"source": source})
    except PartiError as e:
        logger.warning("could not cache weights at %s (%s); they will be read again next time", path, e)


def load_vgg16_weights(model: VGG16Features, *, path: str | None = None, allow_download: bool = True) -> None:
    """Load ImageNet VGG16 weights into `model`: explicit `path`, else the safetensors cache, else download."""
    cache = parti_home() / VGG16_CACHE_NAME
    if path is not None:
        source = Path(path).expanduser()
        state = _features_only(read_weights_file(source, flag="--vgg-weights"), source=source)
        if source.suffix != ".safetensors" and not cache.exists():
            _try_cache(cache, state, source=source.name)  # next run needs no pickle reading
    elif cache.exists():
        state = _features_only(read_tensors(cache), source=cache)
    elif not allow_download:
        raise PartiError(f"VGG16 weights not found and downloads are off; {_vgg_weights_help(cache)}")
    else:
        logger.info("downloading VGG16 weights for the perceptual loss (once; cached at %s)", cache)
        full = download_weights(VGG16_URL, what="VGG16", flag="--vgg-weights")
        state = _features_only(full, source=Path(VGG16_URL.rsplit("/", 1)[-1]))
        _try_cache(cache, state, source=VGG16_URL.rsplit("/", 1)[-1])
    model.load_state_dict(state, strict=True)


def _lpips_vgg_heads() -> list[torch.Tensor]:
    """LPIPS v0.1 linear heads shipped with torchmetrics: keys lin{i}.model.1.weight, shape (1, C_i, 1, 1)."""
    cache = parti_home() / LPIPS_HEADS_CACHE_NAME
    if cache.exists():
        state = read_tensors(cache)
    else:
        spec = importlib.util.find_spec("torchmetrics")  # locate without importing torchmetrics (slow)
        if spec is None or not spec.submodule_search_locations:
            raise PartiError("LPIPS heads come with torchmetrics; install it (pip install torchmetrics)")
        shipped = Path(list(spec.submodule_search_locations)[0]) / "functional/image/lpips_models/vgg.pth"
        if not shipped.is_file():
            raise PartiError(f"{shipped} is missing; reinstall torchmetrics or set perceptual_weight=0")
        # The file was saved from a CUDA device: map_location is required on CPU-only machines.
        state = torch.load(shipped, map_location="cpu", weights_only=True)
        state = {f"lin{i}.model.1.weight": state[f"lin{i}.model.1.weight"].float() for i in range(5)}
        _try_cache(cache, state, source="torchmetrics lpips_models/vgg.pth")
    return [state[f"lin{i}.model.1.weight"] for i in range(5)]


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018, v0.1) on VGG16 taps; inputs in [-1, 1] -> (B,).

    All parameters are frozen; gradients still flow to the inputs. Build with `LPIPS.build`.
    """

    def __init__(self) -> None:
        super().__init__()
        # LPIPS' ScalingLayer: maps [-1, 1] images to ImageNet-normalised ones (its own constants).
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.vgg = VGG16Features()
        # One 1x1 conv (no bias) per tap; the dropout of the original heads is inactive in eval mode.
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _LPIPS_CHANNELS)
        self.requires_grad_(False)
        self.train(False)

    @classmethod
    def build(cls, *, vgg_weights: str | None = None, pretrained: bool = True, allow_download: bool = True) -> LPIPS:
        """pretrained=False keeps a random VGG (tests, timing); the linear heads always load."""
        model = cls()
        with torch.no_grad():
            for head, w in zip(model.heads, _lpips_vgg_heads()):
                head.weight.copy_(w)
        if pretrained:
            load_vgg16_weights(model.vgg, path=vgg_weights, allow_download=allow_download)
        return model

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # frozen metric: ignore mode

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise PartiError(f"LPIPS needs images of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if torch.is_grad_enabled() and x.requires_grad != y.requires_grad:
            # Training: only one side (the reconstruction) needs gradients. The other side's features
            # are computed without a graph, so VGG's backward and the normalisation's run over B images,
            # not 2B (a concatenated pass would differentiate through the real images too).
            const, var = (x, y) if y.requires_grad else (y, x)
            with torch.no_grad():
                fixed = [self._unit(f) for f in self.vgg(self._scaled(const))]
            taps = zip(fixed, (self._unit(f) for f in self.vgg(self._scaled(var))))
        else:
            # One VGG pass over (2B, 3, H, W): half the kernel launches of two passes, same result.
            n = x.shape[0]
            taps = ((f[:n], f[n:]) for f in map(self._unit, self.vgg(self._scaled(torch.cat([x, y])))))
        dist = x.new_zeros(x.shape[0], dtype=torch.float32)
        for (a, b), head in zip(taps, self.heads):
            diff = (a - b).pow(2)  # (B, C, h, w)
            dist = dist + F.conv2d(diff, head.weight.float()).mean(dim=(1, 2, 3))  # spatial average
        return dist

    def _scaled(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.shift) / self.scale

    @staticmethod
    def _unit(feat: torch.Tensor) -> torch.Tensor:
        """Unit-normalise channels in fp32 even under autocast; eps inside the sqrt keeps the gradient
        finite at all-zero features."""
        feat = feat.float()
        return feat * torch.rsqrt(feat.pow(2).sum(dim=1, keepdim=True) + 1e-10)


class _DownBlock(nn.Module):
    """StyleGAN2 residual block: a 3x3 conv at the input resolution, a 2x average-pool, a 3x3 conv at the
    output resolution (StyleGAN2 blurs and strides its second conv: the same down-then-convolve order, a
    quarter of the cost of convolving at full size and pooling after), 1x1 skip, sum scaled by 1/sqrt(2)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_in, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, s, s) -> (B, C_out, s/2, s/2)
        # In place where autograd allows: fewer fresh full-size buffers (each a round of page faults on CPU).
        h = F.leaky_relu(self.conv1(x), 0.2, inplace=True)
        h = F.leaky_relu(self.conv2(F.avg_pool2d(h, 2)), 0.2, inplace=True)
        return self.skip(F.avg_pool2d(x, 2)).add_(h).mul_(1 / math.sqrt(2))


class Discriminator(nn.Module):
    """StyleGAN2-style residual discriminator: one logit per image, (B, 3, S, S) -> (B,).

    Chosen over PatchGAN because ViT-VQGAN replaced taming's PatchGAN with a StyleGAN discriminator for
    stability, and because it has no BatchNorm: its output does not depend on batch size, train/eval mode
    or multi-GPU statistics. Simplified: no equalised learning rate or blur kernels (Adam and avg-pool do
    at this size). Widths double per block from `channels`, capped at `max_channels` (default 4x).
    """

    def __init__(self, *, image_size: int, channels: int = 64, max_channels: int | None = None,
                 mbstd_group: int = 4) -> None:
        super().__init__()
        if image_size < 8 or image_size & (image_size - 1):
            raise PartiError(f"the discriminator needs a power-of-two image_size >= 8, got {image_size}")
        if channels < 1:
            raise PartiError(f"disc_channels must be positive, got {channels}")
        self.image_size = image_size
        self.mbstd_group = mbstd_group
        cap = max_channels or 4 * channels
        n_blocks = int(math.log2(image_size)) - 2  # down to 4x4
        widths = [min(channels * 2**i, cap) for i in range(n_blocks + 1)]
        self.from_rgb = nn.Conv2d(3, widths[0], kernel_size=1)
        self.blocks = nn.ModuleList(_DownBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
        c = widths[-1]
        extra = 1 if mbstd_group > 1 else 0  # the minibatch-stddev feature map
        self.conv_out = nn.Conv2d(c + extra, c, kernel_size=3, padding=1)
        self.fc = nn.Linear(c * 4 * 4, c)
        self.logit = nn.Linear(c, 1)
        self.to(memory_format=torch.channels_last)  # NHWC convolutions, as for VGG: oneDNN's native layout

    def _minibatch_stddev(self, x: torch.Tensor) -> torch.Tensor:
        # Lets D see sample diversity: std over contiguous groups of g images, averaged to one map.
        b, c, h, w = x.shape
        g = max(d for d in range(1, min(self.mbstd_group, b) + 1) if b % d == 0)  # a divisor of b
        std = x.view(b // g, g, c, h, w).float().var(dim=1, correction=0).add(1e-8).sqrt()  # (b/g, c, h, w)
        std = std.mean(dim=(1, 2, 3)).to(x.dtype)  # (b/g,)
        return torch.cat([x, std.repeat_interleave(g).view(b, 1, 1, 1).expand(b, 1, h, w)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise PartiError(f"discriminator built for {self.image_size} px images, got {tuple(x.shape[-2:])}")
        h = F.leaky_relu(self.from_rgb(x.contiguous(memory_format=torch.channels_last)), 0.2, inplace=True)
        for block in self.blocks:
            h = block(h)  # (B, C, 4, 4) after the last
        if self.mbstd_group > 1:
            h = self._minibatch_stddev(h)
        h = F.leaky_relu(self.conv_out(h), 0.2)
        h = F.leaky_relu(self.fc(h.flatten(1)), 0.2)
        return self.logit(h).squeeze(1)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss, halved as in taming-transformers: 0.5 (E relu(1-real) + E relu(1+fake))."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator adversarial loss for the hinge GAN: -E D(fake)."""
    return -fake_logits.mean()


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor, *,
                    max_weight: float = 1e4) -> torch.Tensor:
    """||d rec / d W|| / (||d gan / d W|| + 1e-4) at the decoder's last weight W, clamped and detached.

    Balances the two terms so the GAN gradient at the output layer is as large as the reconstruction one.
    """
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    weight = rec_grad.float().norm() / (gan_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


@contextlib.contextmanager
def _frozen(module: nn.Module):
    """Run `module` without recording graph edges to its parameters; restores the flags afterwards."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass
class LossConfig:
    """Weights of the tokenizer loss terms. Parti/ViT-VQGAN use both L2 and L1 reconstruction terms."""

    l2_weight: float = setting(1.0, "weight of the L2 reconstruction loss", minimum=0)
    l1_weight: float = setting(1.0, "weight of the L1 reconstruction loss", minimum=0)
    perceptual_weight: float = setting(0.1, "weight of LPIPS on VGG16 (needs its ImageNet weights); 0: off",
                                       minimum=0)
    adversarial_weight: float = setting(0.1, "weight of the hinge GAN loss from --disc-start; 0: off", minimum=0)
    disc_start: int = setting(10000, "step at which the adversarial loss (and D training) switches on", minimum=0)
    disc_channels: int = setting(64, "the discriminator's base width", minimum=1, maximum=4096)
    adaptive_weight: bool = setting(True, "taming's balancing of the GAN term by the decoder's last-layer "
                                    "gradients")
    vgg_weights: str | None = setting(None, "local VGG16 weights file (.pth or .safetensors); default: the "
                                      "cache, else one download")

    def __post_init__(self) -> None:
        check_settings(self)


class TokenizerLoss(nn.Module):
    """Reconstruction (L2 + L1) + LPIPS + commitment + hinge-GAN loss for the tokenizer; owns D."""

    def __init__(self, config: LossConfig, *, image_size: int, pretrained_vgg: bool = True,
                 allow_download: bool = True) -> None:
        super().__init__()
        self.config = config
        self.lpips: LPIPS | None = None
        if config.perceptual_weight > 0:
            self.lpips = LPIPS.build(vgg_weights=config.vgg_weights, pretrained=pretrained_vgg,
                                     allow_download=allow_download)
        else:
            logger.info("perceptual_weight=0: no LPIPS, VGG16 weights are not needed")
        self.discriminator: Discriminator | None = None
        if config.adversarial_weight > 0:
            self.discriminator = Discriminator(image_size=image_size, channels=config.disc_channels)

    def adversarial_on(self, step: int) -> bool:
        """Whether the GAN terms are active at `step` (the trainer skips the D update otherwise)."""
        return self.discriminator is not None and step >= self.config.disc_start

    def generator_loss(self, real: torch.Tensor, fake: torch.Tensor, *, commit_loss: torch.Tensor, step: int,
                       last_layer: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for the tokenizer's optimizer; `real`, `fake`: (B, 3, H, W) in [-1, 1].

        With the adaptive GAN weight in training, the terms are computed on a detached copy of `fake` and
        their gradients taken there, once each: one backward through LPIPS's VGG and one through D, where
        taming's form (autograd.grad of each term at the last layer, then total.backward()) takes two of
        each. The last layer's share of each gradient follows by a backward through the last layer alone.
        The returned tensor has the value of rec + commit + adversarial_weight * weight * adv and, as its
        gradient with respect to `fake`, exactly that sum's (weight detached), so callers backpropagate it
        as usual (tests/test_losses.py checks the gradients against the two-pass form).
        """
        cfg = self.config
        if real.shape != fake.shape:
            raise PartiError(f"real and reconstructed images differ in shape: {tuple(real.shape)} vs {tuple(fake.shape)}")
        zero = fake.new_zeros((), dtype=torch.float32)
        one_pass = (self.adversarial_on(step) and cfg.adaptive_weight and torch.is_grad_enabled()
                    and fake.requires_grad and last_layer is not None)
        image = fake.detach().requires_grad_(True) if one_pass else fake  # where the terms' gradients stop
        l2 = F.mse_loss(image.float(), real.float())
        l1 = F.l1_loss(image.float(), real.float())
        perceptual = self.lpips(real, image).mean() if self.lpips is not None else zero
        rec = cfg.l2_weight * l2 + cfg.l1_weight * l1 + cfg.perceptual_weight * perceptual
        adv, weight = zero, zero
        if self.adversarial_on(step):
            with _frozen(self.discriminator):  # gradients reach the image only, never D's parameters
                adv = hinge_g_loss(self.discriminator(image).float())
            if not cfg.adaptive_weight:
                weight = torch.ones_like(zero)
            elif not torch.is_grad_enabled():
                pass  # validation: no graph to differentiate; weight 0 as in taming, total = rec + commit
            elif last_layer is None:
                raise PartiError("adaptive_weight=True needs last_layer (the decoder's output weight); "
                                 "pass it or set adaptive_weight=False")
            elif not one_pass:
                weight = adaptive_weight(rec, adv, last_layer)
        total = rec + commit_loss.float() + cfg.adversarial_weight * weight * adv
        if one_pass:
            (g_rec,) = torch.autograd.grad(rec, image)  # (B, 3, H, W): one backward through VGG
            (g_adv,) = torch.autograd.grad(adv, image)  # one backward through D
            (w_rec,) = torch.autograd.grad(fake, last_layer, g_rec.to(fake.dtype), retain_graph=True)
            (w_adv,) = torch.autograd.grad(fake, last_layer, g_adv.to(fake.dtype), retain_graph=True)
            weight = (w_rec.float().norm() / (w_adv.float().norm() + 1e-4)).clamp(0.0, 1e4).detach()
            grad = (g_rec + cfg.adversarial_weight * weight * g_adv).to(fake.dtype)
            link = (fake * grad).sum()  # d link / d fake = grad
            commit = commit_loss.float()
            value = (rec + cfg.adversarial_weight * weight * adv).detach() + commit
            total = value + (link - link.detach()).float()
        # One device->host copy for all logs instead of seven.
        values = torch.stack([l2, l1, perceptual, commit_loss.float(), adv, weight, total]).detach().tolist()
        return total, dict(zip(("l2", "l1", "perceptual", "commit", "adv", "adaptive_weight", "total"), values))

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor, *,
                           step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge loss for D's optimizer on real vs detached fake; zero and no D forward before disc_start."""
        if not self.adversarial_on(step):
            return real.new_zeros((), dtype=torch.float32), {"d_loss": 0.0, "logits_real": 0.0, "logits_fake": 0.0}
        # Two calls, not one concatenated batch: minibatch-stddev groups must not mix real and fake.
        real_logits = self.discriminator(real.detach()).float()
        fake_logits = self.discriminator(fake.detach()).float()
        loss = hinge_d_loss(real_logits, fake_logits)
        values = torch.stack([loss, real_logits.mean(), fake_logits.mean()]).detach().tolist()
        return loss, dict(zip(("d_loss", "logits_real", "logits_fake"), values))
