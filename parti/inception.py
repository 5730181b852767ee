"""The FID Inception-v3 network (2048-d pool3 features), written out by hand, and its weight loading.

FID numbers are only comparable when every paper uses the same network: the TensorFlow Inception graph
of 2015-12-05, as ported by pytorch-fid. That port is torchvision's Inception3 with two patches
(TensorFlow's 3x3 average pooling ignores padded zeros; the last block max-pools instead of averaging),
so the layers below follow torchvision's layout and parameter names exactly. The pytorch-fid checkpoint
`pt_inception-2015-12-05-6726825d.pth` therefore loads strictly once its 1008-way `fc.*` classifier,
which FID never uses, is dropped. No torchvision needed.

Weights come from, in order: an explicit `path` (safetensors, or that .pth read with weights_only=True),
the cache `$PARTI_HOME/fid_inception.safetensors`, or a one-time download that is cached as safetensors.
Nothing is downloaded at import or in a constructor.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parti.checkpoint import download_weights, parti_home, read_weights_file, write_tensors
from parti.errors import PartiError

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
CACHE_NAME = "fid_inception.safetensors"
FEATURE_DIM = 2048
INPUT_SIZE = 299
# The checkpoint's ImageNet classifier (1008 classes): present in the .pth, unused for FID features.
UNUSED_CHECKPOINT_KEYS = ("fc.weight", "fc.bias")


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, as TensorFlow) -> relu. Keys: `conv.weight`, `bn.*`."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    # FID patch: TensorFlow's 3x3 average pool does not count the padded zeros in its average.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 64 + 64 + 96 + pool_features channels out. FID average pool."""

    def __init__(self, in_channels: int, *, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): 384 + 96 + in_channels channels out. Unpatched."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        b3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3dbl, bp], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convs (Mixed_6b..e): 4 x 192 = 768 channels out. FID average pool."""

    def __init__(self, in_channels: int, *, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, b7dbl, bp], dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): 320 + 192 + in_channels channels out. Unpatched."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b/c): 320 + 768 + 768 + 192 = 2048 channels out.

    FID patches: Mixed_7b (`pool="avg"`) averages without padded zeros; Mixed_7c (`pool="max"`) max-pools,
    a quirk of the TensorFlow graph that every published FID inherits.
    """

    def __init__(self, in_channels: int, *, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], dim=1)
        if self.pool == "avg":
            pooled = _tf_avg_pool(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3dbl, bp], dim=1)


class InceptionFeatures(nn.Module):
    """Images in [-1, 1], any size, (B, 3, H, W) -> FID pool3 features (B, 2048).

    Attribute names are the pytorch-fid / torchvision ones so their checkpoint keys match ours.
    """

    dim = FEATURE_DIM

    def __init__(self):
        super().__init__()
        # Stem: 299 -> 149 -> 147 -> 147 -> (maxpool) 73 -> 73 -> 71 -> (maxpool) 35.
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        # 35x35: 192 -> 256 -> 288 -> 288 channels.
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        # 17x17: 768 channels.
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        # 8x8: 1280 -> 2048 -> 2048 channels.
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")

    def features(self, x: Tensor) -> Tensor:
        """Network only: (B, 3, 299, 299) in [-1, 1] -> (B, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))  # global average pool: (B, 2048, 8, 8) -> (B, 2048)

    @torch.no_grad()
    def forward(self, images: Tensor, *, quantize: bool = True) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 2048) float32.

        quantize: round to 8-bit levels first, as pytorch-fid sees images (it reads saved PNG/JPEG files),
        so in-memory samples score the same as the same samples written to disk.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise PartiError(f"FID Inception expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        param = next(self.parameters())
        x = images.to(device=param.device, dtype=param.dtype).clamp(-1.0, 1.0)
        if quantize:
            x = torch.round((x + 1.0) * 127.5) / 127.5 - 1.0
        # pytorch-fid: bilinear resize to 299 (align_corners=False, no antialias) of [0, 1] images, then
        # 2x - 1. Both are affine/linear per pixel, so resizing our [-1, 1] images directly is identical.
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return self.features(x)


def build_fid_inception(*, pretrained: bool = False) -> InceptionFeatures:
    """Random-init network for tests (`pretrained=False`), or `load_fid_inception()` with the real weights."""
    if pretrained:
        return load_fid_inception()
    return InceptionFeatures().eval().requires_grad_(False)




def fid_inception_cache_path() -> Path:
    return parti_home() / CACHE_NAME


def convert_pytorch_fid_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """pytorch-fid checkpoint -> our keys: drop the unused classifier, add BN step counters if absent.

    The .pth predates BatchNorm's `num_batches_tracked` buffer; it is only a training counter, so 0 is exact.
    Everything else must already match and is checked by the strict load.
    """
    out = {k: v for k, v in state.items() if k not in UNUSED_CHECKPOINT_KEYS}
    for key in [k for k in out if k.endswith(".bn.running_mean")]:
        counter = key.removesuffix("running_mean") + "num_batches_tracked"
        out.setdefault(counter, torch.tensor(0, dtype=torch.long))
    return out


def _load_state(model: InceptionFeatures, state: dict[str, Tensor], *, source: str) -> None:
    state = convert_pytorch_fid_state_dict(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        raise PartiError(
            f"{source} is not the pytorch-fid FID Inception checkpoint (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, wrong shape {wrong_shape[:3]}); pass pt_inception-2015-12-05-6726825d.pth "
            f"or its safetensors copy with --inception PATH"
        )
    wrong_dtype = sorted(k for k in expected if expected[k].dtype != state[k].dtype)
    nonfinite = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if wrong_dtype or nonfinite:
        raise PartiError(f"{source} holds corrupt FID Inception weights (wrong dtype {wrong_dtype[:3]}, NaN/inf in "
                         f"{nonfinite[:3]}); pass pt_inception-2015-12-05-6726825d.pth or its safetensors copy "
                         f"with --inception PATH")
    model.load_state_dict(state, strict=True)


def _read_weights(path: Path) -> dict[str, Tensor]:
    if path.suffix not in (".safetensors", ".pth", ".pt"):
        raise PartiError(f"FID Inception weights must be .safetensors or .pth, got {path}; pass one with --inception PATH")
    return read_weights_file(path, flag="--inception")


def load_fid_inception(*, path: str | Path | None = None, allow_download: bool = True) -> InceptionFeatures:
    """The FID Inception network with the pytorch-fid weights, in eval mode, on CPU, without gradients.

    path: a local .safetensors or pytorch-fid .pth; otherwise the cache under $PARTI_HOME is used, filled
    by a one-time download when `allow_download` (the .pth is read weights-only, then kept as safetensors).
    """
    model = InceptionFeatures()
    cache = fid_inception_cache_path()
    if path is not None:
        _load_state(model, _read_weights(Path(path).expanduser()), source=str(path))
    elif cache.is_file():
        _load_state(model, _read_weights(cache), source=str(cache))
    elif allow_download:
        state = download_weights(FID_WEIGHTS_URL, what="FID Inception", flag="--inception")
        _load_state(model, state, source=FID_WEIGHTS_URL)
        write_tensors(cache, model.state_dict())
    else:
        raise PartiError(
            f"FID Inception weights are not cached at {cache} and downloading is off; pass "
            f"pt_inception-2015-12-05-6726825d.pth with --inception PATH or put its safetensors copy there"
        )
    return model.eval().requires_grad_(False)
