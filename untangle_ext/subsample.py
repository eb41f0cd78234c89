"""Conv statistics from a seeded random subset of output positions (issue 15, item 6).

Neighbouring output positions of a convolution see overlapping, highly correlated
patches, so a random fraction ``rate`` of them per image estimates the same moments
at a fraction of the product cost. Each image keeps ``ceil(rate * P)`` of its ``P``
positions, drawn without replacement and uniformly, so every sum is an unbiased
estimate of the full one scaled by the sampled fraction, and the sample counts
count the sampled positions: the patterns (ratios of means) stay consistent.

Which positions an image keeps depends only on the seed, the layer's index in the
program and the image's *content* (an exact integer hash of its bits): the same
seed gives the same positions whatever the batch size, order, class chunking or
torch.distributed sharding, so those runs agree to float64 rounding. The forward
pass itself is unchanged (every position is computed; only the statistics are
subsampled). Linear layers have one position per sample and are never subsampled.
"""
from __future__ import annotations

import math
import numbers

import torch

_M32 = 0xFFFFFFFF
#: Integer type with the bit width of each floating dtype (content hashing reads the raw bits).
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


def check_rate(rate: object, name: str = "position_rate") -> float:
    """``rate`` as a float in (0, 1], else a ValueError naming the argument and the valid range."""
    ok = isinstance(rate, numbers.Real) and not isinstance(rate, bool) and math.isfinite(float(rate)) \
        and 0.0 < float(rate) <= 1.0
    if not ok:
        raise ValueError(f"{name}={rate!r} is not a fraction in (0, 1]: it is the share of each conv layer's output "
                         "positions whose statistics are accumulated (1 = all of them, the exact full estimate)")
    return float(rate)


def mix32(v: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash, elementwise on int64 (no product exceeds 2^59, so nothing overflows)."""
    v = v & _M32
    v = ((v >> 16) ^ v) * 0x45D9F3B & _M32
    v = ((v >> 16) ^ v) * 0x45D9F3B & _M32
    return (v >> 16) ^ v


class PositionSampler:
    """Chooses ``ceil(rate * P)`` of the ``P`` output positions per image, from the seed and the image content."""

    def __init__(self, rate: float, seed: int = 0):
        self.rate = check_rate(rate)
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise ValueError(f"position_seed={seed!r} must be an integer (it fixes which positions are sampled)")
        self.seed = int(seed)
        self._weights: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"PositionSampler(rate={self.rate:g}, seed={self.seed})"

    def take(self, total: int) -> int:
        """How many of ``total`` positions an image keeps (at least one)."""
        return min(total, max(1, math.ceil(self.rate * total)))

    def _hash_weights(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Two seeded vectors of 16-bit multipliers for the low and high halves of each element's bits."""
        key = (length, device)
        if key not in self._weights:
            gen = torch.Generator().manual_seed(self.seed)
            w = torch.randint(1, 1 << 16, (2, length), generator=gen, dtype=torch.int64)
            self._weights[key] = (w[0].to(device), w[1].to(device))
        return self._weights[key]

    def image_keys(self, x: torch.Tensor) -> torch.Tensor:
        """One 32-bit key per image of ``x`` (N, ...), an exact function of the seed and the image's bits."""
        if x.dtype not in _BITS:
            raise TypeError(f"position subsampling hashes floating images; got dtype {x.dtype}")
        bits = x.detach().contiguous().view(_BITS[x.dtype]).reshape(x.shape[0], -1).long()
        if x.dtype == torch.float64:
            bits = bits ^ (bits >> 32)
        bits = bits & _M32
        lo, hi = self._hash_weights(bits.shape[1], x.device)
        h = ((bits & 0xFFFF) * lo).sum(1) + ((bits >> 16) * hi).sum(1)  # < 2^32 per element: exact in int64
        return mix32(h ^ (h >> 32))

    def select(self, keys: torch.Tensor, layer_index: int, total: int) -> torch.Tensor:
        """Positions (N, k), ascending per row, that images with ``keys`` keep among ``total`` in layer ``layer_index``."""
        salt = mix32(mix32(torch.tensor(layer_index + 1, device=keys.device)) ^ (self.seed & _M32))
        base = mix32(keys ^ salt)
        positions = mix32(torch.arange(total, device=keys.device))
        scores = mix32(base.unsqueeze(1) ^ positions)  # distinct per row (mix32 is a bijection): no ties
        chosen = scores.topk(self.take(total), dim=1, largest=False, sorted=False).indices
        return chosen.sort(dim=1).values
