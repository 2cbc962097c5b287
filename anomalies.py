"""Finding what is not normal with a VQ-VAE and a prior trained on normal anatomy: each image's codes scored by the
prior, the unlikely ones redrawn from it (the "healed" image), and a pixel map of what healing changed (Pinaya et
al. 2022, "Unsupervised brain imaging 3D anomaly detection and segmentation with transformers"; Naval Marimont and
Tarroni 2020, "Latent spatial restoration")."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from priors import level_priors
from utils import Config, UsageError, option

SCORES = ("map", "unlikely_bits", "bits")


# The image flipped so that raster order reads it from another corner (mirrored, upside down, both), each flip its
# own inverse: a lesion judged from several sides is healed in all of them, a normal code found odd from one side
# mostly in that one only.
ORDERINGS = {1: [()], 2: [(), (-1,)], 4: [(), (-1,), (-2,), (-2, -1)]}


@dataclass
class AnomalyConfig(Config):
    """How anomaly.py scores images; each field is one of its options (defaults measured on brain MRI with
    synthetic lesions: docs/RESULTS.md, "Finding anomalies")."""

    threshold: float = option(0.0, "a code is redrawn when the prior gives it a probability below this, given the "
                              "(healed) codes before it; 0: calibrated by --redraw-share")
    redraw_share: float = option(0.05, "with --threshold 0: the threshold is the probability below which this share "
                                 "of the codes of the prior's own validation slices falls (normal anatomy, for a prior "
                                 "trained with --classes NORMAL); healing in 4 orderings redraws about twice that")
    resamplings: int = option(2, "healed versions drawn per image and ordering; the map averages them")
    orderings: int = option(4, "raster orders the image is read in: 1, 2 (also mirrored, right to left) or 4 (also "
                            "upside down); each costs as much as the first", choices=tuple(ORDERINGS))
    smoothing: float = option(2.0, "sigma, in pixels of the network's input, of the Gaussian that smooths the map")
    top_share: float = option(0.01, "the image score 'map' is the mean of this share of the map's highest pixels")
    score: str = option("map", "what the scores.csv column 'score' holds: map (the map's highest pixels), "
                        "unlikely_bits (the bits of the codes below the threshold, as LSR and Pinaya et al.), bits "
                        "(of all codes)", choices=SCORES)

    def __post_init__(self) -> None:
        if not 0 <= self.threshold < 1:
            raise UsageError(f"--threshold {self.threshold}: a probability, between 0 and 1 (0: calibrated)")
        if not 0 < self.redraw_share < 1:
            raise UsageError(f"--redraw-share {self.redraw_share}: a share, between 0 and 1")
        if self.resamplings < 1:
            raise UsageError(f"--resamplings {self.resamplings}: at least 1")
        if self.orderings not in ORDERINGS:
            raise UsageError(f"--orderings {self.orderings}: one of {', '.join(map(str, ORDERINGS))}")
        if not 0 < self.top_share <= 1:
            raise UsageError(f"--top-share {self.top_share}: a share, above 0 and at most 1")


@dataclass
class Restoration:
    """One batch scored: the images, their reconstructions, the healed versions of each (`resamplings` per
    ordering), which codes healing replaced, and the bits the prior gives each code as encoded (per ordering), all
    turned back to the images' own orientation."""

    images: torch.Tensor  # [B, C, H, W]
    reconstructions: torch.Tensor  # [B, C, H, W]
    healed: torch.Tensor  # [orderings x resamplings, B, C, H, W]
    replaced: list[torch.Tensor]  # per level [orderings x resamplings, B, h, w], bool
    code_bits: list[torch.Tensor]  # per level [orderings, B, h, w], -log2 p(code | codes before it)
    uniform_bits: float  # log2 K: what a code costs under uniform guessing
    seconds: dict[str, float] = field(default_factory=dict)


def concatenate(parts: Sequence[Restoration]) -> Restoration:
    """The Restorations of consecutive batches as one (the seconds of each stage summed)."""
    return Restoration(torch.cat([part.images for part in parts]), torch.cat([part.reconstructions for part in parts]),
                       torch.cat([part.healed for part in parts], dim=1),
                       [torch.cat(level, dim=1) for level in zip(*(part.replaced for part in parts))],
                       [torch.cat(level, dim=1) for level in zip(*(part.code_bits for part in parts))],
                       parts[0].uniform_bits, add_seconds({}, *(part.seconds for part in parts)))


def add_seconds(total: dict[str, float], *parts: dict[str, float]) -> dict[str, float]:
    """`total` with each stage's seconds of `parts` added."""
    for part in parts:
        for stage, value in part.items():
            total[stage] = total.get(stage, 0.0) + value
    return total


def check_prior(prior: torch.nn.Module, vqvae: torch.nn.Module) -> None:
    """A one-line refusal for what cannot be healed: volumes, and priors without a likelihood in raster order."""
    if vqvae.config.spatial_dims != 2:
        raise UsageError("anomaly maps are made for 2D slices; this VQ-VAE models 3D volumes")
    levels = level_priors(prior)
    kind = type(levels[0]).__name__
    if not all(hasattr(level, "restore") for level in levels):
        raise UsageError(f"this prior is a {kind}: anomaly maps need the transformer prior's likelihood in raster "
                         "order (train_prior.py --prior transformer)")


class Timer:
    """Seconds spent per named stage, with the GPU synchronised so that each stage gets its own time."""

    def __init__(self, device: torch.device, seconds: dict[str, float]):
        self.device, self.seconds = device, seconds

    def __call__(self, stage: str):
        timer = self

        class Stage:
            def __enter__(self):
                self.began = timer._now()

            def __exit__(self, *_):
                timer.seconds[stage] = timer.seconds.get(stage, 0.0) + timer._now() - self.began

        return Stage()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


@torch.inference_mode()
def calibrated_threshold(prior: torch.nn.Module, normal_levels: Sequence[torch.Tensor], share: float,
                         batch_size: int = 128) -> float:
    """The probability below which `share` of the codes of normal images fall under the prior (each code given the
    codes before it): the threshold that redraws about that share of normal anatomy's codes, whatever the prior's
    size, training or codebook. `normal_levels`: their code maps, one tensor [N, h, w] per level, on the prior's
    device."""
    parts = []
    for start in range(0, len(normal_levels[0]), batch_size):
        batch = [level[start:start + batch_size] for level in normal_levels]
        parts += [level_bits.flatten().float().cpu() for level_bits in code_bits(prior, batch)]
    bits = torch.cat(parts)
    return float(2 ** -bits.kthvalue(max(1, round((1 - share) * len(bits)))).values)


def code_bits(prior: torch.nn.Module, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """-log2 p of each code of each level [B, h, w], given the codes before it (one teacher-forced pass)."""
    return [F.cross_entropy(logits.float(), codes, reduction="none") / math.log(2)
            for logits, codes in zip(prior.level_logits(levels, None), levels)]


def _flipped(tensor: torch.Tensor, flips: tuple[int, ...]) -> torch.Tensor:
    """The axes `flips` names (-1: left-right, -2: up-down) flipped: the image as an ordering reads it, and back."""
    return tensor.flip(flips) if flips else tensor


@torch.inference_mode()
def restore(vqvae: torch.nn.Module, prior: torch.nn.Module, images: torch.Tensor, config: AnomalyConfig,
            generator: torch.Generator | None = None) -> Restoration:
    """Encode a batch, score its codes under the prior, and heal it `config.resamplings` times in each of
    `config.orderings` raster orders (the image flipped, its codes read in raster order, the result flipped back)."""
    if not config.threshold:
        raise ValueError("the threshold is 0: calibrate it first (calibrated_threshold)")
    seconds: dict[str, float] = {}
    timer = Timer(images.device, seconds)
    healed, replaced, bits = [], [], []
    for flips in ORDERINGS[config.orderings]:
        with timer("encoding"):
            levels = vqvae.code_maps(_flipped(images, flips))
            if not flips:
                reconstructions = vqvae.decode_code_maps(levels).float()
        with timer("prior"):
            bits.append([_flipped(level, flips) for level in code_bits(prior, levels)])
        for _ in range(config.resamplings):
            with timer("resampling"):
                restored, changed = prior.restore_levels(levels, config.threshold, None, generator)
            with timer("decoding"):
                healed.append(_flipped(vqvae.decode_code_maps(restored).float(), flips))
            replaced.append([_flipped(level, flips) for level in changed])
    return Restoration(images.float(), reconstructions, torch.stack(healed),
                       [torch.stack(level) for level in zip(*replaced)], [torch.stack(level) for level in zip(*bits)],
                       math.log2(vqvae.config.num_embeddings), seconds)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """maps [B, H, W] smoothed by a Gaussian of `sigma` pixels (separable, edges replicated); sigma 0: unchanged."""
    if sigma <= 0:
        return maps
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=maps.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    blurred = maps[:, None].float()
    for weights in (kernel.view(1, 1, -1, 1), kernel.view(1, 1, 1, -1)):
        pads = (0, 0, radius, radius) if weights.shape[2] > 1 else (radius, radius, 0, 0)
        blurred = F.conv2d(F.pad(blurred, pads, mode="replicate"), weights)
    return blurred[:, 0]


def to_pixels(code_maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Per-code values [..., h, w] spread over the pixels each code covers [..., H, W]."""
    flat = code_maps.float().reshape(-1, 1, *code_maps.shape[-2:])
    return F.interpolate(flat, size=tuple(size), mode="nearest").reshape(*code_maps.shape[:-2], *size)


def anomaly_maps(restoration: Restoration, config: AnomalyConfig) -> torch.Tensor:
    """The pixel anomaly map [B, H, W]: what healing changed, |input - the mean of its healed versions|, weighted by
    how surprised the prior was by the codes there (bits_maps, in units of uniform guessing), both smoothed.

    The change is Pinaya et al.'s residual to the healed image; where they keep it only inside the codes that were
    redrawn, the weight here is the surprise itself, so a lesion whose codes are odd from most orderings counts more
    than the one normal code that one ordering redrew. Where the VQ-VAE cannot draw the input at all (noise, say),
    every healed version differs from it too. Averaging the healed versions first keeps what all of them agree to
    remove."""
    change = (restoration.images - restoration.healed.mean(dim=0)).abs().mean(dim=1)
    surprise = bits_maps(restoration) / restoration.uniform_bits
    return gaussian_blur(change, config.smoothing) * gaussian_blur(surprise, config.smoothing)


def residual_maps(restoration: Restoration, config: AnomalyConfig) -> torch.Tensor:
    """The plain autoencoder's map [B, H, W]: |input - reconstruction|, smoothed alike (the usual baseline)."""
    return gaussian_blur((restoration.images - restoration.reconstructions).abs().mean(dim=1), config.smoothing)


def bits_maps(restoration: Restoration) -> torch.Tensor:
    """The prior's map without healing [B, H, W]: each code's bits over the pixels it covers (levels summed,
    orderings averaged)."""
    size = restoration.images.shape[-2:]
    return sum(to_pixels(level.mean(dim=0), size) for level in restoration.code_bits)


def top_mean(maps: torch.Tensor, share: float) -> torch.Tensor:
    """The mean of each map's highest `share` of pixels [B]."""
    flat = maps.flatten(1)
    return flat.topk(max(1, round(share * flat.shape[1])), dim=1).values.mean(dim=1)


def image_scores(restoration: Restoration, maps: torch.Tensor, config: AnomalyConfig) -> dict[str, torch.Tensor]:
    """Per image [B]: every score scores.csv holds, 'score' being the one config.score names."""
    threshold_bits = -math.log2(config.threshold)
    all_bits = torch.cat([level.flatten(2) for level in restoration.code_bits], dim=2)  # [orderings, B, codes]
    replaced = torch.cat([level.float().flatten(2) for level in restoration.replaced], dim=2)
    scores = {"map": top_mean(maps, config.top_share),
              "unlikely_bits": (all_bits * (all_bits > threshold_bits)).sum(dim=2).mean(dim=0),
              "bits": all_bits.mean(dim=(0, 2)),
              "codes_replaced": replaced.mean(dim=(0, 2)),
              "residual_mean": (restoration.images - restoration.reconstructions).abs().flatten(1).mean(dim=1)}
    return {"score": scores[config.score], **scores}
