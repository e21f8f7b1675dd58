"""The pixel-space UNet shared by the diffusion baselines (DDPM, AnoDDPM, pDDPM, AutoDDPM, THOR).

As in the THOR / ci-ber code: MONAI ``DiffusionModelUNet``, channels (128, 256, 256),
attention at the two lower levels (and, always, the middle block), one residual block per
level, 256 channels per attention head. It is called as ``model(x, timesteps)`` with
``timesteps`` a ``LongTensor`` of shape ``(B,)``.

The authors' copy of the MONAI-Generative UNet (ci-ber/THOR_DDPM
``net_utils/nets/diffusion_unet.py``) applies no linear projection after self-attention;
MONAI >= 1.4 adds one unless ``include_fc=False``. We build it without (``include_fc``
False by default): the paper configuration then has 18,040,449 parameters, as theirs, and
their checkpoints load with ``load_unet_checkpoint`` (MONAI's ``load_old_state_dict``
renames the MONAI-Generative keys).

MONAI >= 1.4 spells the width argument ``channels=`` (the old MONAI-Generative package
used ``num_channels=``); every channel count must be divisible by ``norm_num_groups``
and every attention level's width by ``num_head_channels``.

Attention. ``use_flash_attention=True`` computes self-attention with PyTorch's
``scaled_dot_product_attention`` (flash / memory-efficient kernels on CUDA) instead of
materialising the ``HW x HW`` attention matrix; the weights are the same and so are the
outputs, to float rounding (tested against the matrix form and the authors' UNet). The
pixel diffusion methods switch it on for CUDA devices; on the CPU they keep the matrix
form, so CPU training stays bit-for-bit what it was.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

#: Names of the backbone fields a method config carries (same names as ``build_unet``).
BACKBONE_FIELDS = ("channels", "attention_levels", "num_res_blocks", "num_head_channels", "norm_num_groups", "include_fc")


@dataclass
class BackboneConfig:
    """The UNet's hyperparameters; method configs repeat these field names (see ``backbone_kwargs``)."""

    channels: tuple[int, ...] = (128, 256, 256)
    attention_levels: tuple[bool, ...] = (False, True, True)
    num_res_blocks: int = 1
    num_head_channels: int = 256
    norm_num_groups: int = 32
    include_fc: bool = False  # MONAI's projection after attention; the authors' UNet has none


def backbone_kwargs(config: Any) -> dict[str, Any]:
    """The ``build_unet`` keyword arguments held by any config that has the backbone fields."""
    return {f.name: getattr(config, f.name) for f in fields(BackboneConfig)}


def check_backbone(channels: Sequence[int], attention_levels: Sequence[bool], num_head_channels: int, norm_num_groups: int) -> None:
    """Fail early, with a readable message, on combinations MONAI rejects deep inside."""
    if len(channels) != len(attention_levels):
        raise ValueError(f"channels {tuple(channels)} and attention_levels {tuple(attention_levels)} must have the same length")
    for c in channels:
        if c % norm_num_groups:
            raise ValueError(f"every channel count must be divisible by norm_num_groups={norm_num_groups}; {c} is not")
    for c, attn in zip(channels, attention_levels):
        if attn and c % num_head_channels:
            raise ValueError(f"attention level width {c} is not divisible by num_head_channels={num_head_channels}")


def build_unet(
    in_channels: int = 1,
    out_channels: int = 1,
    channels: Sequence[int] = (128, 256, 256),
    attention_levels: Sequence[bool] = (False, True, True),
    num_res_blocks: int = 1,
    num_head_channels: int = 256,
    norm_num_groups: int = 32,
    include_fc: bool = False,
    spatial_dims: int = 2,
    use_flash_attention: bool = False,
) -> nn.Module:
    """MONAI ``DiffusionModelUNet``; the input side must be divisible by ``2 ** (len(channels) - 1)``."""
    from monai.networks.nets import DiffusionModelUNet

    check_backbone(channels, attention_levels, num_head_channels, norm_num_groups)
    return DiffusionModelUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(int(c) for c in channels),
        attention_levels=tuple(bool(a) for a in attention_levels),
        num_res_blocks=int(num_res_blocks),
        num_head_channels=int(num_head_channels),
        norm_num_groups=int(norm_num_groups),
        include_fc=bool(include_fc),
        use_flash_attention=bool(use_flash_attention),
    )


def load_unet_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load an authors' UNet checkpoint into ``model`` (a ``build_unet`` network), in place.

    Accepts what the ci-ber repositories save (``{"model_weights": state_dict, ...}`` of
    their ``DDPM`` wrapper, keys prefixed ``unet.``), a bare state dict of the UNet, and
    either key layout: MONAI's or MONAI-Generative's (renamed by MONAI's
    ``load_old_state_dict``). A checkpoint that does not fit raises a ``ValueError``
    naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"unet_checkpoint {path}: no such file")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    state = blob.get("model_weights", blob.get("state_dict", blob)) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"unet_checkpoint {path}: expected a state dict (or a dict with 'model_weights'), got {type(blob).__name__}")
    if all(k.startswith("unet.") for k in state):
        state = {k[len("unet.") :]: v for k, v in state.items()}
    try:
        if set(state) == set(model.state_dict()):
            model.load_state_dict(state)
        else:
            model.load_old_state_dict(dict(state))  # type: ignore[operator]
    except (KeyError, RuntimeError) as exc:
        raise ValueError(f"unet_checkpoint {path}: does not fit the configured UNet ({type(exc).__name__}: {exc})") from exc
