"""Per-pixel perceptual distance maps for THOR and AutoDDPM, fully offline.

Both methods weight their residual with ``lpips(x, x_hat, spatial=True)``: a B x 1 x H x W
map. LPIPS needs ImageNet weights that cannot be downloaded here, so this module offers:

* ``LPIPSDistance``: LPIPS v0.1 (Zhang et al. 2018) re-implemented in plain torch (no
  torchvision, no ``lpips`` package) for the ``alex``, ``squeeze`` (SqueezeNet 1.1, the net
  THOR and AutoDDPM use) and ``vgg`` (VGG16) trunks. It reads two local files:

  1. the **backbone**: a torchvision ImageNet state dict, e.g. ``alexnet-owt-7be5be79.pth``,
     ``squeezenet1_1-b8a52dc0.pth`` or ``vgg16-397923af.pth`` (keys ``features.<i>.*``;
     ``classifier.*`` is ignored). Download these on a machine with internet from the
     torchvision model URLs and copy them over.
  2. the **LPIPS linear layers**: ``<net>.pth`` of the ``lpips`` package layout (keys
     ``lin<k>.model.1.weight``, shape 1 x C_k x 1 x 1), found in the ``lpips`` wheel under
     ``lpips/weights/v0.1/{alex,squeeze,vgg}.pth`` (``pip download lpips --no-deps``, unzip).

  Point to them with the method config fields ``lpips_backbone_weights`` and
  ``lpips_weights``, or put both files into one directory and set
  ``UAD_BENCH_LPIPS_DIR`` (backbone found as ``<net>_backbone.pth`` or by the torchvision
  file-name prefix ``alexnet*.pth`` / ``squeezenet1_1*.pth`` / ``vgg16*.pth``; linear
  layers as ``<net>.pth``).

* ``SSIMDistance`` (the default when no weights are given): the structural
  dissimilarity ``(1 - SSIM) / 2`` per pixel (Gaussian window, sigma 1.5, 11 taps; C1, C2
  of Wang et al. 2004 for the stated data range), averaged over ``scales`` dyadic scales
  upsampled back to full size, the way LPIPS sums its layer maps. It is 0 for identical
  images and lies in [0, 1]. It is a *substitute*, not LPIPS: records say
  ``notes["perceptual"] = "ssim-substitute"``, and a warning is logged once per process.

Inputs of ``forward(x, y)`` are B x C x H x W in the model range [-1, 1] (what LPIPS
expects with ``normalize=False``); one-channel images are repeated to three for LPIPS.
The peers' code passes ``2x - 1`` *and* ``normalize=True`` (so LPIPS sees [-3, 1]); we
scale once. Nothing here ever downloads.
"""

from __future__ import annotations

import logging
import os
import re
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import inference_field

log = logging.getLogger(__name__)

ENV_DIR = "UAD_BENCH_LPIPS_DIR"
SSIM_NAME = "ssim-substitute"
LPIPS_NETS = ("alex", "squeeze", "vgg")
#: torchvision checkpoint file-name prefixes, used to find a backbone in UAD_BENCH_LPIPS_DIR
BACKBONE_PREFIX = {"alex": "alexnet", "squeeze": "squeezenet1_1", "vgg": "vgg16"}
_warned_substitute = False


class PerceptualWeightsError(FileNotFoundError):
    """LPIPS was asked for, but its local weight files are missing or do not fit."""


class PerceptualDistance(nn.Module):
    """``forward(x, y) -> B x 1 x H x W`` distance map (0 where identical); ``name`` goes into records."""

    name: str = "perceptual"

    @abstractmethod
    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4:
            raise ValueError(f"perceptual distance needs two B x C x H x W tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        # always float32: bf16 autocast would quantise small distances to zero
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.distance(x.float(), y.float())


# ---------------------------------------------------------------------------------- SSIM
def gaussian_kernel1d(sigma: float, radius: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Normalised 1D Gaussian; default radius ``int(4 sigma + 0.5)`` as scipy's gaussian_filter."""
    radius = int(4.0 * sigma + 0.5) if radius is None else int(radius)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float, radius: int | None = None) -> torch.Tensor:
    """Separable Gaussian filter of a B x C x H x W tensor, same size out (mirror padding)."""
    if sigma <= 0:
        return x
    k = gaussian_kernel1d(sigma, radius, x.device).to(x.dtype)
    r = (k.numel() - 1) // 2
    c = x.shape[1]
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"  # reflect needs pad < size
    x = F.pad(x, (r, r, r, r), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class SSIMDistance(PerceptualDistance):
    """``(1 - SSIM) / 2`` per pixel, channel mean, averaged over ``scales`` dyadic scales."""

    def __init__(self, data_range: float = 2.0, sigma: float = 1.5, radius: int = 5, scales: int = 3) -> None:
        super().__init__()
        self.data_range, self.sigma, self.radius, self.scales = float(data_range), float(sigma), int(radius), int(scales)
        self.name = SSIM_NAME

    def ssim_map(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c1, c2 = (0.01 * self.data_range) ** 2, (0.03 * self.data_range) ** 2
        blur = lambda t: gaussian_blur(t, self.sigma, self.radius)  # noqa: E731
        mx, my = blur(x), blur(y)
        vx = blur(x * x) - mx * mx
        vy = blur(y * y) - my * my
        cxy = blur(x * y) - mx * my
        return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        maps = []
        for s in range(max(1, self.scales)):
            if s > 0:
                if min(x.shape[-2:]) < 2 * (2 * self.radius + 1):
                    break  # too small for another scale
                x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
            d = ((1.0 - self.ssim_map(x, y)) * 0.5).clamp(0.0, 1.0).mean(dim=1, keepdim=True)
            maps.append(d if s == 0 else F.interpolate(d, size=size, mode="bilinear", align_corners=False))
        return torch.stack(maps).mean(0)


# ---------------------------------------------------------------------------------- LPIPS trunks
class Fire(nn.Module):
    """SqueezeNet Fire module (names as torchvision, so its state dict loads as is)."""

    def __init__(self, c_in: int, squeeze: int, e1: int, e3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(c_in, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))], 1)


def _alexnet_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
    )  # fmt: skip


def _squeezenet11_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256),
    )  # fmt: skip


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.ReLU(inplace=True)]
            c_in = int(v)
    return nn.Sequential(*layers)


#: per trunk: features factory, end index (exclusive) of each LPIPS slice, channels per slice
TRUNKS: dict[str, tuple] = {
    "alex": (_alexnet_features, (2, 5, 8, 10, 12), (64, 192, 384, 256, 256)),
    "squeeze": (_squeezenet11_features, (2, 5, 8, 10, 11, 12, 13), (64, 128, 256, 384, 384, 512, 512)),
    "vgg": (_vgg16_features, (4, 9, 16, 23, 30), (64, 128, 256, 512, 512)),
}


class LPIPSDistance(PerceptualDistance):
    """LPIPS v0.1, spatial: sum over layers of the upsampled ``lin_k((f_k(x) - f_k(y))^2)``."""

    def __init__(self, net: str = "squeeze", backbone_weights: str | os.PathLike | None = None, lin_weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        if net not in TRUNKS:
            raise ValueError(f"LPIPS net must be one of {LPIPS_NETS}, got {net!r}")
        factory, self.ends, chns = TRUNKS[net]
        self.net = net
        self.features = factory()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in chns)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.name = f"lpips-{net}:unloaded"
        if backbone_weights is not None and lin_weights is not None:
            self.load_weights(backbone_weights, lin_weights)
        self.requires_grad_(False)
        self.eval()

    def load_weights(self, backbone_weights: str | os.PathLike, lin_weights: str | os.PathLike) -> None:
        """Load a torchvision trunk state dict and an lpips ``<net>.pth``; mismatches raise with the file name."""
        backbone_weights, lin_weights = Path(backbone_weights), Path(lin_weights)
        trunk = _read_state(backbone_weights)
        trunk = {_trunk_key(k): v for k, v in trunk.items()}
        trunk = {k[len("features.") :]: v for k, v in trunk.items() if k.startswith("features.")}
        try:
            self.features.load_state_dict(trunk, strict=True)
        except RuntimeError as exc:
            raise PerceptualWeightsError(f"{backbone_weights}: not a torchvision {BACKBONE_PREFIX[self.net]} state dict ({exc})") from exc
        lins: dict[int, torch.Tensor] = {}
        for k, v in _read_state(lin_weights).items():
            m = re.match(r"^(?:lin|lins\.)(\d+)\.(?:model\.\d+\.)?weight$", k)
            if m:
                lins[int(m.group(1))] = v
        if sorted(lins) != list(range(len(self.lins))):
            raise PerceptualWeightsError(f"{lin_weights}: expected lpips linear layers lin0..lin{len(self.lins) - 1} for net {self.net!r}, found {sorted(lins)}")
        for i, lin in enumerate(self.lins):
            if lins[i].shape != lin.weight.shape:
                raise PerceptualWeightsError(f"{lin_weights}: lin{i} has shape {tuple(lins[i].shape)}, expected {tuple(lin.weight.shape)} (net {self.net!r})")
            lin.weight.data.copy_(lins[i])
        self.name = f"lpips-{self.net}:{backbone_weights.parent.resolve() if backbone_weights.parent == lin_weights.parent else lin_weights.resolve()}"

    def layer_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs, start = [], 0
        for end in self.ends:
            for i in range(start, end):
                x = self.features[i](x)
            outs.append(x)
            start = end
        return outs

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
        elif x.shape[1] != 3:
            x, y = x.mean(1, keepdim=True).repeat(1, 3, 1, 1), y.mean(1, keepdim=True).repeat(1, 3, 1, 1)
        fx = self.layer_features((x - self.shift) / self.scale)
        fy = self.layer_features((y - self.shift) / self.scale)
        total = torch.zeros((x.shape[0], 1, *x.shape[-2:]), device=x.device, dtype=x.dtype)
        for a, b, lin in zip(fx, fy, self.lins):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + F.interpolate(lin((a - b) ** 2), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return total


def _trunk_key(key: str) -> str:
    """Accept an LPIPS full checkpoint (``net.slice<k>.<i>.*``) as well as torchvision's ``features.<i>.*``."""
    key = key.removeprefix("module.")
    m = re.match(r"^net\.slice\d+\.(\d+)\.(.*)$", key)
    return f"features.{m.group(1)}.{m.group(2)}" if m else key


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PerceptualWeightsError(f"{path}: LPIPS weight file not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PerceptualWeightsError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


# ---------------------------------------------------------------------------------- factory
def find_lpips_files(net: str, directory: str | os.PathLike) -> tuple[Path, Path]:
    """``(backbone, lin)`` in ``directory``: ``<net>_backbone.pth`` or ``<torchvision prefix>*.pth``, and ``<net>.pth``."""
    directory = Path(directory)
    lin = directory / f"{net}.pth"
    candidates = [directory / f"{net}_backbone.pth", *sorted(directory.glob(f"{BACKBONE_PREFIX[net]}*.pth"))]
    backbone = next((p for p in candidates if p.is_file()), None)
    if backbone is None or not lin.is_file():
        raise PerceptualWeightsError(
            f"{directory}: LPIPS-{net} needs the lpips linear layers {lin.name} and a torchvision backbone "
            f"({net}_backbone.pth or {BACKBONE_PREFIX[net]}*.pth); found backbone={backbone}, lin={'yes' if lin.is_file() else 'no'}"
        )
    return backbone, lin


def _warn_substitute_once(reason: str) -> None:
    global _warned_substitute
    if not _warned_substitute:
        _warned_substitute = True
        log.warning(
            "LPIPS weights not available (%s): using the SSIM dissimilarity substitute for the perceptual map; "
            "records say perceptual='%s'. Give lpips_weights + lpips_backbone_weights or set %s to use LPIPS.",
            reason, SSIM_NAME, ENV_DIR,
        )  # fmt: skip


def make_perceptual(
    name_or_path: str | os.PathLike = "auto",
    net: str = "squeeze",
    backbone_weights: str | os.PathLike | None = None,
    lin_weights: str | os.PathLike | None = None,
    ssim_scales: int = 3,
) -> PerceptualDistance:
    """Build a perceptual distance; never downloads.

    ``name_or_path``: ``"auto"`` (LPIPS when weight files are given or found in
    ``$UAD_BENCH_LPIPS_DIR``, else the SSIM substitute with a one-time warning),
    ``"ssim"``, ``"lpips"`` / ``"lpips-<net>"`` (weights required: a missing file raises),
    or a directory holding the two LPIPS files.
    """
    choice = str(name_or_path)
    if choice == "ssim":
        return SSIMDistance(scales=ssim_scales)
    if choice.startswith("lpips-"):
        choice, net = "lpips", choice.split("-", 1)[1]
    if net not in LPIPS_NETS:
        raise ValueError(f"LPIPS net must be one of {LPIPS_NETS}, got {net!r}")
    if choice not in ("auto", "lpips"):  # a directory
        if not Path(choice).is_dir():
            raise ValueError(f"perceptual must be 'auto', 'ssim', 'lpips', 'lpips-<{'|'.join(LPIPS_NETS)}>' or a directory, got {choice!r}")
        return LPIPSDistance(net, *find_lpips_files(net, choice))
    if backbone_weights is not None or lin_weights is not None:
        if backbone_weights is None or lin_weights is None:
            raise PerceptualWeightsError("LPIPS needs both lpips_backbone_weights (torchvision trunk) and lpips_weights (lpips linear layers)")
        return LPIPSDistance(net, backbone_weights, lin_weights)
    env = os.environ.get(ENV_DIR)
    if env:
        try:
            return LPIPSDistance(net, *find_lpips_files(net, env))
        except PerceptualWeightsError:
            if choice == "lpips":
                raise
            _warn_substitute_once(f"${ENV_DIR}={env} lacks the LPIPS-{net} files")
            return SSIMDistance(scales=ssim_scales)
    if choice == "lpips":
        raise PerceptualWeightsError(f"perceptual='lpips' needs lpips_weights + lpips_backbone_weights or ${ENV_DIR}; nothing is downloaded")
    _warn_substitute_once("no weight files given")
    return SSIMDistance(scales=ssim_scales)


def perceptual_names() -> Sequence[str]:
    return ("auto", "ssim", "lpips", *(f"lpips-{n}" for n in LPIPS_NETS))


# ---------------------------------------------------------------------------------- method glue
@dataclass
class PerceptualConfig:
    """The perceptual-distance knobs, shared by the configs of THOR and AutoDDPM.

    Both authors' codes use LPIPS-SqueezeNet; without local weights ``auto`` falls back
    to the SSIM substitute.
    """

    perceptual: str = inference_field("auto")  # auto | ssim | lpips | lpips-<net> | a directory
    lpips_net: str = inference_field("squeeze")
    lpips_weights: str | None = inference_field(None)  # lpips linear layers <net>.pth
    lpips_backbone_weights: str | None = inference_field(None)  # torchvision trunk state dict
    ssim_scales: int = inference_field(3)


class PerceptualMixin:
    """For methods whose config includes :class:`PerceptualConfig`: builds the distance
    lazily (rebuilt when those inference knobs change) and writes its name into
    ``self.notes["perceptual"]``."""

    def perceptual_distance(self) -> PerceptualDistance:
        c = self.config  # type: ignore[attr-defined]
        device = self.device  # type: ignore[attr-defined]
        key = (c.perceptual, c.lpips_net, c.lpips_weights, c.lpips_backbone_weights, c.ssim_scales, str(device))
        if getattr(self, "_perceptual_key", None) != key:
            dist = make_perceptual(c.perceptual, c.lpips_net, c.lpips_backbone_weights, c.lpips_weights, c.ssim_scales)
            self._perceptual, self._perceptual_key = dist.to(device), key
            self.notes["perceptual"] = dist.name  # type: ignore[attr-defined]
        return self._perceptual
