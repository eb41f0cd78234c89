"""Attribution maps → 2-D heatmaps on a symmetric scale (seismic, 0 = white)."""
from __future__ import annotations

from typing import Optional

import torch


def channel_sum(attributions: torch.Tensor) -> torch.Tensor:
    """Sum over the channel axis: (..., C, H, W) → (..., H, W)."""
    return attributions.sum(dim=-3)


def normalise(maps: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Divide by ``scale`` (default: the max |value| of ``maps``) so values lie in [-1, 1]; zeros stay zero."""
    if scale is None:
        scale = maps.abs().max()
    scale = torch.as_tensor(scale, dtype=maps.dtype, device=maps.device)
    return maps / torch.where(scale > 0, scale, torch.ones_like(scale))
