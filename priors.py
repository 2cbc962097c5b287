"""The priors over a VQ-VAE's code maps, by kind, and the two-level prior over a VQ-VAE-2's top and bottom maps;
built from the configs a prior checkpoint holds."""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
import torch.nn as nn

from pixelcnn import GatedPixelCNN, PixelCNNConfig
from sampling import CodePrior, bits_per_code, level_loss
from transformer import MaskedConfig, MaskedPrior, TransformerConfig, TransformerPrior

# kind -> (config dataclass, model): what train_prior.py --prior builds, and what a checkpoint's "kind" rebuilds.
PRIOR_KINDS: dict[str, tuple[type, type]] = {"pixelcnn": (PixelCNNConfig, GatedPixelCNN),
                                             "transformer": (TransformerConfig, TransformerPrior),
                                             "masked": (MaskedConfig, MaskedPrior)}


class HierarchicalPrior(nn.Module):
    """The prior over a VQ-VAE-2's codes: the top map on its own (class-conditional when there are classes), the
    bottom map conditioned also on the whole top map, each level a CodePrior of one kind.

    forward([top, bottom], labels) -> [top logits, bottom logits]; the level-generic methods are CodePrior's."""

    levels = ("top", "bottom")
    score = "bits_per_code"

    def __init__(self, top: CodePrior, bottom: CodePrior):
        super().__init__()
        self.top, self.bottom = top, bottom

    def forward(self, levels: Sequence[torch.Tensor], labels: torch.Tensor | None = None) -> list[torch.Tensor]:
        return self.level_logits(levels, labels)

    def level_logits(self, levels: Sequence[torch.Tensor], labels: torch.Tensor | None = None) -> list[torch.Tensor]:
        top, bottom = levels
        return [self.top(top, labels), self.bottom(bottom, labels, condition=top)]

    def level_bits(self, levels: Sequence[torch.Tensor], labels: torch.Tensor | None = None) -> list[torch.Tensor]:
        return [bits_per_code(logits, codes) * codes[0].numel()
                for logits, codes in zip(self.level_logits(levels, labels), levels)]

    def loss(self, levels: Sequence[torch.Tensor], labels: torch.Tensor | None = None) -> torch.Tensor:
        return level_loss(self.level_bits(levels, labels), levels)

    def sample_levels(self, batch_size: int, shapes: Sequence[Sequence[int]], labels: torch.Tensor | None = None,
                      temperature: float = 1.0, generator: torch.Generator | None = None,
                      **drawing) -> list[torch.Tensor]:
        """Top maps first, then bottom maps conditioned on them."""
        top = self.top.sample(batch_size, tuple(shapes[0]), labels, temperature, generator, **drawing)
        return [top, self.bottom.sample(batch_size, tuple(shapes[1]), labels, temperature, generator, condition=top,
                                        **drawing)]

    def restore_levels(self, levels: Sequence[torch.Tensor], threshold: float, labels: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The top codes restored first, then the bottom codes given the restored top (see TransformerPrior.restore)."""
        top, top_replaced = self.top.restore(levels[0], threshold, labels, generator=generator)
        bottom, bottom_replaced = self.bottom.restore(levels[1], threshold, labels, condition=top, generator=generator)
        return [top, bottom], [top_replaced, bottom_replaced]


def prior_config_from_dict(values: dict):
    """A level's config from a checkpoint; configs written before there were kinds are PixelCNN ones."""
    kind = values.get("kind", "pixelcnn")
    if kind not in PRIOR_KINDS:
        raise ValueError(f"unknown prior kind {kind!r}")
    return PRIOR_KINDS[kind][0].from_dict(values)


def prior_configs(config: dict) -> list:
    """A prior checkpoint's config: one level's, or one per level ({"levels": [...]}) for a hierarchical prior."""
    return [prior_config_from_dict(level) for level in config["levels"]] if "levels" in config \
        else [prior_config_from_dict(config)]


def prior_config_dict(configs: Sequence) -> dict:
    """prior_configs undone: what a prior checkpoint stores as its config."""
    return configs[0].to_dict() if len(configs) == 1 else {"levels": [config.to_dict() for config in configs]}


def build_prior(configs: Sequence) -> CodePrior | HierarchicalPrior:
    """One prior per level: a CodePrior of the config's kind for one-level VQ-VAEs, a HierarchicalPrior for two."""
    models = [PRIOR_KINDS[config.KIND][1](config) for config in configs]
    return models[0] if len(models) == 1 else HierarchicalPrior(*models)


def level_priors(prior: nn.Module) -> list[nn.Module]:
    """The prior of each level: the top's and the bottom's of a HierarchicalPrior, or the prior itself."""
    return [prior.top, prior.bottom] if isinstance(prior, HierarchicalPrior) else [prior]


def sampling_options(prior: nn.Module, **options) -> dict:
    """Of the sampling options given, those the prior's sample() takes (guidance: the transformers; steps: the masked
    prior), so that callers pass every option and no kind is named."""
    accepted = inspect.signature(level_priors(prior)[0].sample).parameters
    return {name: value for name, value in options.items() if name in accepted}
