"""The anchor: lucidrains' parti-pytorch 0.2.0, built offline at the reference configuration.

Install it with `pip install ".[bench]" -c constraints.txt` where constraints.txt pins the torch you
have (e.g. `torch==2.13.0`), so the CPU torch is never replaced. Four things stop it working offline;
each is worked around here and nowhere else:

1. `import parti_pytorch` imports torchvision, whose wheel may not load its C++ ops beside our torch; its
   import then dies registering fake kernels for ops that do not exist. We define those op schemas
   (never called) before the import, so torchvision's registrations succeed. That broken wheel also
   breaks `transformers`' image processors and `torchmetrics.image` for every other user of the
   environment, so the docs say to uninstall it after installing the extra: the anchor uses torchvision
   only for `ToPILImage` and the VGG16 constructor, and when it is absent we register a stand-in module
   (whose members raise if called) and build the VGG16 ourselves.
2. `Parti(...)` asks the hub for the T5 config to learn the text width, even when `text_embed_dim` is
   given; we seed its module-level `T5_CONFIGS` cache with a local `T5Config(d_model=768)`.
3. `Parti.generate()` always runs T5 on the prompts; we replace the instance's `encode_texts` with a
   function that returns precomputed embeddings, so both sides sample from identical (B, 32, 768) states.
4. `VitVQGanVAE(...)` downloads ImageNet VGG16 when `use_vgg_and_gan=True`; we pass a locally built,
   randomly initialised VGG16 of torchvision's layout instead (timing only), frozen like ours (the anchor
   would otherwise train it: its optimizer takes every VAE parameter but the discriminator's).

Facts about the anchor this file relies on (read from its source): `generate()` calls
`forward_with_cond_scale` without passing `cond_scale`, so it always guides at scale 3 (two full
forward passes per token, no KV cache); `anchor_sample_loop` copies that loop with the scale exposed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import torch
from torch import nn

_STUB_LIBRARY = None  # keeps the stub schemas alive for the process

# The schemas torchvision's meta registrations refer to (from torchvision/csrc/ops/*.cpp).
_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "qroi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
    "SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
    "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
    "SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, "
    "Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
    "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)

T5_WIDTH = 768  # t5-v1_1-base, the anchor's default text encoder, and our reference text width


class AnchorUnavailable(RuntimeError):
    """parti-pytorch is not installed; the benchmarks then run our side only."""


def _stub_torchvision_ops() -> None:
    global _STUB_LIBRARY
    try:
        torch.ops.torchvision.nms  # noqa: B018 - a working torchvision already defined its ops
        return
    except (AttributeError, RuntimeError):
        pass
    if _STUB_LIBRARY is None:
        _STUB_LIBRARY = torch.library.Library("torchvision", "DEF")  # noqa: TOR901
        for schema in _TORCHVISION_SCHEMAS:
            _STUB_LIBRARY.define(schema)


def _unavailable(name: str):
    def fn(*args, **kwargs):
        raise RuntimeError(f"torchvision is not installed; {name} is unavailable in the benchmark's stand-in")
    return fn


def _ensure_torchvision() -> None:
    """Make `import torchvision` succeed: the real one (with stub op schemas) or a stand-in module."""
    if "torchvision" in sys.modules:
        return
    if importlib.util.find_spec("torchvision") is not None:
        _stub_torchvision_ops()
        import torchvision  # noqa: F401
        return
    # transformers decides once whether torchvision is usable; let it decide before the stand-in exists
    # (its image utilities would otherwise import real torchvision APIs from the stand-in).
    import transformers.modeling_utils  # noqa: F401
    from transformers import T5Config, T5EncoderModel, T5Tokenizer  # noqa: F401 - what parti_pytorch.t5 imports

    tv = _StandIn("torchvision")
    tv.__path__ = []  # a package, so `from torchvision.x import y` resolves through sys.modules
    sys.modules["torchvision"] = tv
    for sub in ("transforms", "models", "datasets", "utils"):  # what parti_pytorch imports from it
        module = _StandIn(f"torchvision.{sub}")
        setattr(tv, sub, module)
        sys.modules[module.__name__] = module


class _StandIn(types.ModuleType):
    """A module whose every attribute is a function that raises: imports succeed, calls fail loudly."""

    def __init__(self, name: str):
        super().__init__(name)
        self.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _unavailable(f"{self.__name__}.{attr}")


def import_anchor():
    """-> the parti_pytorch module, importable offline. Raises AnchorUnavailable when not installed."""
    if importlib.util.find_spec("parti_pytorch") is None:
        raise AnchorUnavailable('parti-pytorch is not installed; `pip install ".[bench]"` with torch constrained')
    _ensure_torchvision()
    import parti_pytorch
    from parti_pytorch import t5 as anchor_t5
    from transformers import T5Config

    # Seed the config cache so Parti(...) never asks the hub for the T5 width.
    anchor_t5.T5_CONFIGS.setdefault(anchor_t5.DEFAULT_T5_NAME, {"config": T5Config(d_model=T5_WIDTH)})
    return parti_pytorch


_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class TorchvisionVGG16(nn.Module):
    """torchvision's vgg16() layout (features, 7x7 average pool, classifier) with the classifier cut as
    VitVQGanVAE cuts it (`classifier[:-2]`: a 4096-wide output). Random weights; timing only."""

    def __init__(self):
        super().__init__()
        layers, c_in = [], 3
        for item in _VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                c_in = item
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(4096, 4096), nn.ReLU(True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def local_vgg16() -> nn.Module:
    """The VGG16 the anchor would download, built locally with random weights, frozen."""
    return TorchvisionVGG16().requires_grad_(False)


def build_anchor_vae(*, dim: int = 256, layers: int = 4, image_size: int = 128, patch_size: int = 8,
                     codebook_size: int = 8192, codebook_dim: int = 32, perceptual_and_gan: bool = False,
                     discr_dims: tuple[int, ...] | None = None) -> nn.Module:
    """VitVQGanVAE with a cosine-similarity VQ of `codebook_size` codes in a `codebook_dim` lookup (like
    ours) instead of its default lookup-free quantiser. With `perceptual_and_gan`, a local frozen VGG16
    and a discriminator of `discr_dims` channels (default: the anchor's own, dim x (1, 1, 2, 4, 8)).

    Its `vq_kwargs=` argument is silently replaced by the `vq_`-prefixed keyword arguments (an empty
    dict when there are none), so the quantiser settings go in as `vq_codebook_dim=...` and so on."""
    pp = import_anchor()
    from parti_pytorch.vit_vqgan import Discriminator

    vae = pp.VitVQGanVAE(
        dim=dim, image_size=image_size, layers=layers, encdec_patch_size=patch_size,
        lookup_free_quantization=False, codebook_size=codebook_size, vq_codebook_dim=codebook_dim,
        vq_decay=0.9, vq_commitment_weight=1.0, vq_kmeans_init=False,
        use_vgg_and_gan=perceptual_and_gan, vgg=local_vgg16() if perceptual_and_gan else None)
    if perceptual_and_gan and discr_dims is not None:
        vae.discr = Discriminator(dims=discr_dims, channels=3)
    return vae


def autoencoder_parameters(vae: nn.Module) -> int:
    """Encoder + quantiser + decoder parameters of a VitVQGanVAE (no VGG, no discriminator)."""
    return sum(p.numel() for n, p in vae.named_parameters() if not n.startswith(("vgg.", "discr.")))


def anchor_vae_decode(vae: nn.Module, codes: torch.Tensor) -> torch.Tensor:
    """codes (B, h, w) -> images. The anchor's own `get_fmap_from_codebook` refers to a missing `self.vq` on
    its VQ path, and the quantiser's `get_output_from_indices` projects along the wrong axis for image
    feature maps, so look the codes up and project them out here."""
    q = vae.quantizer
    fmap = q.project_out(q.codebook[codes])  # (B, h, w, codebook_dim) -> (B, h, w, dim)
    return vae.decode(fmap.permute(0, 3, 1, 2).contiguous())


def build_anchor_parti(*, dim: int = 512, depth: int = 6, heads: int = 8, num_codes: int = 8192,
                       grid_size: int = 16, patch_size: int = 8, text_dim: int = T5_WIDTH) -> nn.Module:
    """Parti(dim, depth, heads x 64) over a `grid_size`^2 token grid of `num_codes` codes, text width 768.

    It needs a VAE only to learn the grid and codebook sizes; we give it a one-layer VAE and then drop
    it, so generate() returns token ids (as ours does) instead of decoding images."""
    pp = import_anchor()
    vae = pp.VitVQGanVAE(dim=64, image_size=grid_size * patch_size, layers=1, encdec_patch_size=patch_size,
                         lookup_free_quantization=False, codebook_size=num_codes, vq_codebook_dim=32,
                         vq_kmeans_init=False, use_vgg_and_gan=False)
    model = pp.Parti(dim=dim, depth=depth, heads=heads, dim_head=dim // heads, vae=vae, text_embed_dim=text_dim)
    model.vae = None
    return model


def set_anchor_text(model: nn.Module, states: torch.Tensor, mask: torch.Tensor) -> None:
    """Make `model.generate(texts)` use these precomputed (B, L, 768) states instead of running T5."""

    def encode_texts(texts, output_device=None):
        if len(texts) != states.shape[0]:
            raise ValueError(f"{len(texts)} prompts but {states.shape[0]} precomputed text states")
        return states, mask

    model.encode_texts = encode_texts


@torch.no_grad()
def anchor_sample_loop(model: nn.Module, states: torch.Tensor, mask: torch.Tensor, *, cond_scale: float,
                       filter_thres: float = 0.9, temperature: float = 1.0) -> torch.Tensor:
    """The anchor's generate() loop with `cond_scale` actually passed through (scale 1: one pass/token)."""
    from parti_pytorch.parti_pytorch import gumbel_sample, top_k

    was_training = model.training
    model.eval()
    tokens = torch.empty((states.shape[0], 0), dtype=torch.long)
    for _ in range(model.image_encoded_dim ** 2):
        logits = model.forward_with_cond_scale(text_token_embeds=states, text_mask=mask, image_token_ids=tokens,
                                               cond_scale=cond_scale)[:, -1]
        sampled = gumbel_sample(top_k(logits, thres=filter_thres), temperature=temperature, dim=-1)
        tokens = torch.cat((tokens, sampled[:, None]), dim=-1)
    model.train(was_training)
    return tokens
