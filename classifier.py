"""Classifiers for few labels: a VQ-VAE's encoder as the trunk (fine-tuned from the checkpoint's weights, or the
same network from random weights), or a small standard CNN, each with a pooled linear head; the training recipe
they share (the head alone first, then everything at a lower rate; flips, shifts and intensity jitter; early
stopping on a held-out part of the labelled slices) and prediction."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules import VQVAEConfig, make_encoder
from utils import Config, UsageError, option

TRUNKS = ("encoder", "cnn")
GRID_CELLS = (2, 4)  # cells per side of the grid pooling


@dataclass
class ClassifierConfig(Config):
    """What rebuilds a classifier from its checkpoint: the trunk's kind and sizes, the classes."""

    trunk: str = "encoder"  # "encoder": a VQ-VAE's encoder (config in `vqvae`); "cnn": SmallCNN
    num_classes: int = 2
    in_channels: int = 1
    vqvae: dict = field(default_factory=dict)  # the VQ-VAE config whose encoder is the trunk
    cnn_widths: tuple[int, ...] = (16, 32, 64, 128)
    dropout: float = 0.2
    # "grid": means over 2x2 and 4x4 cells of the trunk's output (where things are matters: on brain MRI at 100% of
    # the labels the fine-tuned encoder reached 0.732 with it, 0.692 with "global", the mean and max over the whole
    # map, which the small CNN keeps: its 4x4 output has seen the whole slice already).
    pooling: str = "grid"

    LEGACY: ClassVar[dict] = {}

    def __post_init__(self) -> None:
        if self.trunk not in TRUNKS:
            raise ValueError(f"unknown trunk {self.trunk!r}; the trunks are {', '.join(TRUNKS)}")
        if self.pooling not in ("grid", "global"):
            raise ValueError(f"unknown pooling {self.pooling!r}: grid or global")
        self.cnn_widths = tuple(self.cnn_widths)


class SmallCNN(nn.Sequential):
    """A standard small CNN: per width a 3x3 convolution, batch norm, ReLU and 2x2 max-pooling."""

    def __init__(self, in_channels: int, widths: tuple[int, ...]):
        layers: list[nn.Module] = []
        for width in widths:
            layers += [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                       nn.MaxPool2d(2)]
            in_channels = width
        super().__init__(*layers)
        self.out_channels = in_channels


class Classifier(nn.Module):
    """trunk -> pooled (on a grid, or mean and max over space) -> dropout -> linear: forward(images [B, C, H, W])
    -> logits [B, classes]."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        if config.trunk == "encoder":
            vqvae = VQVAEConfig.from_dict(config.vqvae)
            self.trunk, width = make_encoder(vqvae), vqvae.embedding_dim
        else:
            self.trunk = SmallCNN(config.in_channels, config.cnn_widths)
            width = self.trunk.out_channels
        pooled = 2 * width if config.pooling == "global" else sum(cells * cells for cells in GRID_CELLS) * width
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(pooled, config.num_classes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.trunk(images)
        if self.config.pooling == "grid":
            return torch.cat([F.adaptive_avg_pool2d(maps, cells).flatten(1) for cells in GRID_CELLS], dim=1)
        return torch.cat([maps.flatten(2).mean(dim=2), maps.flatten(2).amax(dim=2)], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


TRUNK_CHOICES = ("pretrained", "scratch", "cnn")  # finetune.py --trunk


def check_trunk(trunk: str, vqvae_config: VQVAEConfig) -> None:
    """Refuse, in one line, a VQ-VAE whose slices or encoder a classifier cannot take (before any data is read)."""
    if vqvae_config.spatial_dims != 2:
        raise UsageError("classifiers take 2D slices: this VQ-VAE models 3D volumes (train one with --spatial-dims 2)")
    if trunk != "cnn" and vqvae_config.levels != 1:
        raise UsageError(f"--trunk {trunk}: the encoder of a one-level VQ-VAE is the trunk; this one has "
                         f"{vqvae_config.levels} levels (--trunk cnn works with any)")


def classifier_for(trunk: str, vqvae_checkpoint: dict, num_classes: int) -> Classifier:
    """The classifier a TRUNK_CHOICES name makes of a VQ-VAE checkpoint: its encoder with the trained weights
    (pretrained) or random ones (scratch), or the small CNN, for the checkpoint's image channels."""
    vqvae_config = VQVAEConfig.from_dict(vqvae_checkpoint["config"])
    check_trunk(trunk, vqvae_config)
    if trunk == "cnn":
        return Classifier(ClassifierConfig("cnn", num_classes, vqvae_config.in_channels, pooling="global"))
    model = Classifier(ClassifierConfig("encoder", num_classes, vqvae_config.in_channels, vqvae_config.to_dict()))
    if trunk == "pretrained":
        model.trunk.load_state_dict({key[len("encoder."):]: value for key, value in vqvae_checkpoint["model"].items()
                                     if key.startswith("encoder.")})
    return model


@dataclass
class FineTuning(Config):
    """How a classifier is trained on few labels; each field is one of finetune.py's options."""

    steps: int = option(1000, "optimisation steps at most (early stopping may end sooner)")
    frozen_steps: int = option(100, "first steps with the trunk frozen, the head alone learning (pretrained trunks "
                               "only)")
    lr: float = option(1e-3, "learning rate of the head (and of a trunk trained from random weights)")
    trunk_lr: float = option(3e-4, "learning rate of a pretrained trunk once unfrozen")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    batch_size: int = option(32, "labelled slices per step")
    held_out: float = option(0.2, "share of the labelled slices held out (per class, at least one) for early stopping")
    evaluate_every: int = option(50, "steps between early-stopping checks")
    patience: int = option(6, "checks without a better held-out loss before stopping")
    shift: float = option(0.1, "augmentation: random shifts up to this share of each side")
    jitter: float = option(0.1, "augmentation: random contrast and brightness changes up to this much")

    def __post_init__(self) -> None:
        if not 0 < self.held_out < 1:
            raise UsageError(f"--held-out {self.held_out}: a share, between 0 and 1")
        for name in ("steps", "batch_size", "evaluate_every", "patience"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)}: at least 1")
        if self.frozen_steps < 0:
            raise UsageError(f"--frozen-steps {self.frozen_steps}: 0 or more")


def augment(images: torch.Tensor, settings: FineTuning, generator: torch.Generator) -> torch.Tensor:
    """Random left-right flips, shifts (zero-filled) and contrast and brightness jitter, per image."""
    batch, device = len(images), images.device

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=generator.device).to(device)

    flipped = uniform(batch) < 0.5
    images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
    shifts = (uniform(batch, 2) * 2 - 1) * settings.shift * 2  # affine_grid units: 2 is the whole side
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = shifts
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = 1 + (uniform(batch, 1, 1, 1) * 2 - 1) * settings.jitter
    brightness = (uniform(batch, 1, 1, 1) * 2 - 1) * settings.jitter / 2
    return (images * contrast + brightness).clamp(0, 1)


def split_held_out(labels: torch.Tensor, share: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices to train on and to hold out: `share` of each class held out, at least one of each class with two or
    more examples (a class with one example trains only)."""
    train, held = [], []
    for label in labels.unique():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        count = min(max(1, round(share * len(members))), len(members) - 1)
        held.append(members[:count])
        train.append(members[count:])
    return torch.cat(train), torch.cat(held)


@dataclass
class TrainingResult:
    steps: int  # steps taken
    best_step: int  # the step whose weights were kept
    held_out_loss: float
    held_out_accuracy: float
    seconds: float = 0.0


def train_classifier(model: Classifier, images: torch.Tensor, labels: torch.Tensor, settings: FineTuning,
                     pretrained: bool, seed: int = 0, log: Callable[[str], None] | None = None) -> TrainingResult:
    """Train on labelled images [N, C, H, W] in [0, 1] (on the model's device): the head alone for
    `frozen_steps` when the trunk is pretrained, then everything (a pretrained trunk at `trunk_lr`); the weights of
    the best held-out loss are kept (checked every `evaluate_every` steps, stopped after `patience` checks without a
    better one). With one labelled example per class nothing can be held out: all `steps` are taken and the last
    weights kept."""
    began = time.perf_counter()
    device = images.device
    generator = torch.Generator().manual_seed(seed)
    train_index, held_index = split_held_out(labels.cpu(), settings.held_out, generator)
    train_index, held_index = train_index.to(device), held_index.to(device)
    torch.manual_seed(seed)  # dropout
    optimizer = torch.optim.AdamW([
        {"params": model.head.parameters(), "lr": settings.lr},
        {"params": model.trunk.parameters(), "lr": settings.trunk_lr if pretrained else settings.lr}],
        weight_decay=settings.weight_decay)
    frozen = settings.frozen_steps if pretrained else 0
    best = (math.inf, 0.0, 0, copy.deepcopy(model.state_dict()))
    waited, step = 0, 0
    while step < settings.steps:
        model.train()
        for parameter in model.trunk.parameters():
            parameter.requires_grad_(step >= frozen)
        chosen = train_index[torch.randint(len(train_index), (settings.batch_size,), generator=generator).to(device)]
        loss = F.cross_entropy(model(augment(images[chosen], settings, generator)), labels[chosen])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if len(held_index) and (step % settings.evaluate_every == 0 or step == settings.steps):
            held_loss, held_accuracy = evaluate(model, images[held_index], labels[held_index])
            if held_loss < best[0]:
                best, waited = (held_loss, held_accuracy, step, copy.deepcopy(model.state_dict())), 0
            elif step > frozen:  # the frozen phase is not judged: the trunk has not moved yet
                waited += 1
                if waited >= settings.patience:
                    break
            if log:
                log(f"step {step}: held-out loss {held_loss:.3f}, accuracy {held_accuracy:.3f}")
    if len(held_index):
        model.load_state_dict(best[3])
    else:
        best = (math.nan, math.nan, step, None)
    model.eval()
    return TrainingResult(step, best[2], best[0], best[1], time.perf_counter() - began)


def fit_classifier(trunk: str, vqvae_checkpoint: dict, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   settings: FineTuning, seed: int = 0, device: torch.device | str = "cpu",
                   ) -> tuple[Classifier, TrainingResult]:
    """classifier_for(trunk) trained by train_classifier on labelled images [N, C, H, W] (uint8 or in [0, 1]); its
    random weights come from `seed` too, so a run repeats whatever ran before it."""
    torch.manual_seed(seed)
    model = classifier_for(trunk, vqvae_checkpoint, num_classes).to(device)
    images = images.to(device)
    images = images.float().div(255) if images.dtype == torch.uint8 else images.float()
    result = train_classifier(model, images, labels.to(device), settings, pretrained=trunk == "pretrained", seed=seed)
    return model, result


@torch.no_grad()
def evaluate(model: Classifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
             ) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on labelled images."""
    probabilities = predict_probabilities(model, images, batch_size)
    loss = F.nll_loss(probabilities.clamp_min(1e-12).log(), labels).item()
    return loss, (probabilities.argmax(dim=1) == labels).float().mean().item()


@torch.no_grad()
def predict_probabilities(model: Classifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Class probabilities [N, classes] of images [N, C, H, W] (uint8 or in [0, 1])."""
    model.eval()
    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        batch = batch.float().div(255) if batch.dtype == torch.uint8 else batch.float()
        parts.append(model(batch).softmax(dim=1))
    return torch.cat(parts)
