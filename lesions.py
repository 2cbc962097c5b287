"""Synthetic lesions with known masks, pasted inside the head of normal slices, in the manner of the MOOD challenge
(Zimmerer et al. 2022): bright and dark blobs and noise patches of random elliptic shapes and sizes, what
benchmarks/anomaly.py measures anomaly maps on. A slice's lesion depends only on its seed."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("bright", "dark", "noise")


def head_mask(image: torch.Tensor) -> torch.Tensor:
    """bool [H, W]: the head of a slice [C, H, W] in [0, 1]: the smoothed image above a tenth of its 99th
    percentile."""
    gray = image.float().mean(dim=0)[None, None]
    smooth = F.avg_pool2d(F.pad(gray, (2, 2, 2, 2), mode="replicate"), 5, stride=1)[0, 0]
    return smooth > 0.1 * float(gray.flatten().quantile(0.99))


def _ellipse(shape: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float], angle: float,
             ) -> torch.Tensor:
    """Float [H, W]: 1 inside the ellipse, falling to 0 over about a pixel at its border (no aliased edge)."""
    rows, columns = torch.meshgrid(torch.arange(shape[0], dtype=torch.float32),
                                   torch.arange(shape[1], dtype=torch.float32), indexing="ij")
    dy, dx = rows - centre[0], columns - centre[1]
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    distance = torch.sqrt((u / radii[0]) ** 2 + (v / radii[1]) ** 2)  # 1 on the border
    return ((1 - distance) * min(radii) + 0.5).clamp(0, 1)


def add_lesion(image: torch.Tensor, kind: str, seed: int, radii: tuple[float, float] = (0.06, 0.15),
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A slice [C, H, W] in [0, 1] with one lesion of `kind` inside its head, and the lesion's mask bool [H, W]: the
    pixels it changed by more than 0.05. The ellipse's radii are drawn from `radii`, as shares of the shorter side
    (by default 6% to 15%: a tumour of 2 to 5 cm across in a head of 17 cm); bright blobs take an intensity of 0.8
    to 1, dark ones 0 to 0.1, noise patches uniform noise."""
    device, image = image.device, image.cpu()  # drawn on the CPU from its seed: the same lesion on any device
    generator = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    height, width = image.shape[-2:]
    side = min(height, width)
    radii = (uniform(*radii) * side, uniform(*radii) * side)
    inside = head_mask(image)
    reach = math.ceil(max(radii))  # the centre lies at least a radius inside the head
    eroded = -F.max_pool2d(-inside[None, None].float(), 2 * reach + 1, stride=1, padding=reach)[0, 0] > 0.5
    candidates = torch.nonzero(eroded if eroded.any() else inside if inside.any() else torch.ones_like(inside))
    row, column = candidates[int(torch.randint(len(candidates), (), generator=generator))].tolist()
    blob = _ellipse((height, width), (row, column), radii, uniform(0, math.pi)) * inside
    if kind == "bright":
        fill = torch.full(image.shape, uniform(0.8, 1.0))
    elif kind == "dark":
        fill = torch.full(image.shape, uniform(0.0, 0.1))
    elif kind == "noise":
        fill = torch.rand(image.shape, generator=generator)
    else:
        raise ValueError(f"unknown lesion kind {kind!r}; the kinds are {', '.join(KINDS)}")
    lesioned = image.float() * (1 - blob) + fill * blob
    changed = (lesioned - image.float()).abs().amax(dim=0) > 0.05
    return lesioned.clamp(0, 1).to(device), (changed & (blob > 0.5)).to(device)
