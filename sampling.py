"""What every prior over code maps shares: drawing codes from logits (temperature, top-k, top-p), scoring them in
bits, the level-generic interface, and the code maps of several levels stacked into one tensor."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def stack_levels(levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Code maps of several levels [N, h_l, w_l] (coarsest first, each half the next) as one tensor [N, L, h, w]
    at the finest size, coarser maps repeated 2x2 per halving; a single level stays [N, h, w]."""
    if len(levels) == 1:
        return levels[0]
    height, width = levels[-1].shape[-2:]
    return torch.stack([level.repeat_interleave(height // level.shape[-2], dim=-2)
                        .repeat_interleave(width // level.shape[-1], dim=-1) for level in levels], dim=1)


def unstack_levels(stacked: torch.Tensor, count: int) -> list[torch.Tensor]:
    """stack_levels undone: [B, L, h, w] back to one map per level (each coarser level every 2nd row and column)."""
    if count == 1:
        return [stacked]
    return [stacked[:, level, :: 2 ** (count - 1 - level), :: 2 ** (count - 1 - level)] for level in range(count)]


def bits_per_code(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits [B, K, H, W] against codes [B, H, W] in bits, one mean value per code map."""
    return F.cross_entropy(logits.float(), codes, reduction="none").mean(dim=(1, 2)) / math.log(2)


def truncate_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits [B, K] with all but the k most likely codes (top_k > 0), and all but the smallest set of codes whose
    probability reaches top_p (nucleus sampling, top_p < 1), set to -inf. The most likely code always stays."""
    if top_k > 0 and top_k < logits.shape[1]:
        kth = logits.topk(top_k, dim=1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        ordered, order = logits.sort(dim=1, descending=True)
        before = ordered.softmax(dim=1).cumsum(dim=1) - ordered.softmax(dim=1)  # probability of the codes above each
        dropped = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, order, before >= top_p)
        logits = logits.masked_fill(dropped, -math.inf)
    return logits


def draw_codes(logits: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None,
               top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """One code per row of logits [B, K], drawn from softmax(logits / temperature), optionally truncated to the top
    k codes or the top-p nucleus, by inverting the cumulative distribution: one uniform number per row
    (torch.multinomial draws K per row: 4x slower on [64, 512] here)."""
    logits = truncate_logits(logits.float() / max(temperature, 1e-6), top_k, top_p)
    probabilities = torch.softmax(logits, dim=1)
    cumulative = probabilities.cumsum(dim=1)
    uniform = torch.rand(len(logits), 1, device=logits.device, generator=generator) * cumulative[:, -1:]
    return (cumulative < uniform).sum(dim=1).clamp_max(logits.shape[1] - 1)


def mixture_level_bits(per_class: Sequence[Sequence[torch.Tensor]], class_log_prior: Sequence[float],
                       ) -> list[torch.Tensor]:
    """Bits per level of maps that have no class label, under a class-conditional prior: the levels up to l have
    the mixture likelihood sum_c p(c) p(levels <= l | c), and level l gets what it adds to the levels before it.

    per_class[c][l]: bits [B] of level l under class c; class_log_prior: log p(c), natural logs, as plain numbers
    (so that nothing is read back from the GPU)."""
    levels = len(per_class[0])
    cumulative = [[sum(bits[: level + 1]) for bits in per_class] for level in range(levels)]
    mixture = [-torch.logsumexp(torch.stack([log_share - math.log(2) * bits for log_share, bits
                                              in zip(class_log_prior, per_level)], dim=1), dim=1) / math.log(2)
               for per_level in cumulative]
    return [mixture[0]] + [mixture[level] - mixture[level - 1] for level in range(1, levels)]


class CodePrior(nn.Module):
    """A prior over one level's code maps: forward(codes [B, H, W], labels [B] or None, condition or None) gives
    logits [B, K, H, W] of each code given the codes before it (and the class, and a coarser level's codes when
    there is a condition); sample(...) draws maps [B, H, W]. The level-generic methods below let the jobs treat it
    like a HierarchicalPrior (priors.py), whose code maps come as a list, one per level."""

    levels = ("codes",)
    score = "bits_per_code"  # what picks its best checkpoint: the validation NLL

    def bits_per_code(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
                      condition: torch.Tensor | None = None) -> torch.Tensor:
        """-log2 p(codes | label, condition) / (H W) of each code map [B, H, W]."""
        return bits_per_code(self(codes, labels, condition), codes)

    def level_bits(self, levels: Sequence[torch.Tensor], labels: torch.Tensor | None = None) -> list[torch.Tensor]:
        """-log2 p of each map of each level [B], in bits (not per code)."""
        codes = levels[0]
        return [self.bits_per_code(codes, labels) * codes[0].numel()]

    def level_logits(self, levels: Sequence[torch.Tensor], labels: torch.Tensor | None = None) -> list[torch.Tensor]:
        return [self(levels[0], labels)]

    def loss(self, levels: Sequence[torch.Tensor], labels: torch.Tensor | None = None) -> torch.Tensor:
        """The training objective: mean NLL in bits per code over every code of every level."""
        return level_loss(self.level_bits(levels, labels), levels)

    def sample_levels(self, batch_size: int, shapes: Sequence[Sequence[int]], labels: torch.Tensor | None = None,
                      temperature: float = 1.0, generator: torch.Generator | None = None,
                      **drawing) -> list[torch.Tensor]:
        return [self.sample(batch_size, tuple(shapes[0]), labels, temperature, generator, **drawing)]


    def restore_levels(self, levels: Sequence[torch.Tensor], threshold: float, labels: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each level's codes with the unlikely ones redrawn, and which were (priors with a restore() only)."""
        restored, replaced = self.restore(levels[0], threshold, labels, generator=generator)
        return [restored], [replaced]


def level_loss(level_bits: Sequence[torch.Tensor], levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean bits per code over every code of every level, from each level's bits per map [B]."""
    return sum(level_bits).mean() / sum(codes[0].numel() for codes in levels)


class PriorObjective(nn.Module):
    """A prior's training loss as a forward pass (DistributedDataParallel and torch.compile wrap forward):
    forward(level maps, labels) -> mean bits per code."""

    def __init__(self, prior: nn.Module):
        super().__init__()
        self.prior = prior

    def forward(self, levels: Sequence[torch.Tensor], labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.prior.loss(levels, labels)
