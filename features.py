"""Fixed-length features of slices from a trained VQ-VAE's codes (bags of codes, pooled code vectors, encoder
outputs, pixel baselines) and linear probes on them: a multinomial logistic regression whose L2 penalty is chosen
by cross-validation on the labelled slices alone."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

import checkpoints
from codes import encode_split
from dataset import SliceSet, balanced_subset
from metrics import balanced_accuracy
from modules import VQVAE, VQVAE2, VQVAEConfig
from utils import UsageError

FEATURE_SETS = ("bag", "bag_grid", "pooled", "grid", "latent", "latent_grid")
GRIDS = (2, 4)  # the spatial pyramid of the grid features
# Cells per side of the bags with layout. On brain MRI (docs/RESULTS.md, "Codes as features") 3x3 led at 10% of the
# labels (0.843 against 0.824 for 2x2) and tied at 1%; 4x4 leaves too few codes per cell to count (0.725 ± 0.077).
BAG_GRID = 3

@dataclass
class SplitFeatures:
    slices: SliceSet
    codes: list[torch.Tensor]  # per level [N, h, w], int16 (int32 for K > 32767)
    sets: dict[str, torch.Tensor]  # FEATURE_SETS and the pixel baselines, each [N, size]

    def vectors(self, name: str) -> torch.Tensor:
        """A feature set, or several joined by '+', concatenated."""
        return torch.cat([self.sets[part] for part in name.split("+")], dim=1)


def average_pool(maps: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """[B, C, *S] averaged over a grid of `size` cells per side (2D or 3D)."""
    pool = F.adaptive_avg_pool3d if maps.dim() == 5 else F.adaptive_avg_pool2d
    return pool(maps, size)


def pyramid(maps: torch.Tensor) -> torch.Tensor:
    """[B, D, *S] averaged over each grid of GRIDS: [B, D * (4 + 16)] (volumes: [B, D * (8 + 64)])."""
    return torch.cat([average_pool(maps, size).flatten(1) for size in GRIDS], dim=1)


def mean_and_max(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(2)
    return torch.cat([flat.mean(dim=2), flat.amax(dim=2)], dim=1)


def grid_cells(shape: Sequence[int], cells_per_side: int) -> torch.Tensor:
    """The grid cell of each position of a code map of `shape` (flattened in row-major order)."""
    cell = torch.zeros((), dtype=torch.long)
    for axis, extent in enumerate(shape):
        along = torch.arange(extent) * cells_per_side // extent
        cell = cell.unsqueeze(-1) * cells_per_side + along.view(*([1] * axis), extent)
    return cell.flatten()


def bags_on_grid(codes: torch.Tensor, num_codes: int, cells_per_side: int = BAG_GRID) -> torch.Tensor:
    """Histograms of the codes [B, *S] in each cell of a grid: [B, cells * K], each cell's summing to 1, counted with
    one scatter (a one-hot tensor of HipMRI's codes would not fit in memory)."""
    batch = len(codes)
    cell = grid_cells(codes.shape[1:], cells_per_side).to(codes.device)
    cells = cells_per_side ** (codes.dim() - 1)
    target = (torch.arange(batch, device=codes.device)[:, None] * cells + cell).flatten()  # [B * positions]
    bags = torch.zeros(batch * cells, num_codes, device=codes.device)
    bags.view(-1).scatter_add_(0, target * num_codes + codes.flatten(), torch.ones(target.shape, device=codes.device))
    per_cell = torch.bincount(cell, minlength=cells).clamp_min(1).repeat(batch).to(bags)
    return (bags / per_cell[:, None]).view(batch, cells * num_codes)


@torch.no_grad()
def level_features(quantizer: torch.nn.Module, codes: torch.Tensor, latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every feature set of one level, for a batch of code maps [B, *S] and their latents [B, D, *S]."""
    vectors, latents, num_codes = quantizer.lookup(codes), latents.float(), quantizer.num_embeddings
    return {"bag": bags_on_grid(codes, num_codes, cells_per_side=1), "bag_grid": bags_on_grid(codes, num_codes),
            "pooled": mean_and_max(vectors), "grid": pyramid(vectors),
            "latent": mean_and_max(latents), "latent_grid": pyramid(latents)}


def feature_size(name: str, config: VQVAEConfig, prior_width: int = 0) -> int:
    """How many numbers a feature set (or several joined by '+') has per slice (prior_width: the width of the
    transformer prior whose hidden states the prior sets hold)."""
    pyramid_cells = sum(size**config.spatial_dims for size in GRIDS)
    bag_cells = BAG_GRID**config.spatial_dims
    per_level = {"bag": config.num_embeddings, "bag_grid": bag_cells * config.num_embeddings,
                 "pooled": 2 * config.embedding_dim,
                 "grid": pyramid_cells * config.embedding_dim, "latent": 2 * config.embedding_dim,
                 "latent_grid": pyramid_cells * config.embedding_dim}
    whole = {"prior": prior_width, "prior_grid": pyramid_cells * prior_width}
    return sum(whole[part] if part in whole else config.levels * per_level[part] for part in name.split("+"))


def matched_grid(size: int, channels: int, image_shape: Sequence[int]) -> tuple[int, ...]:
    """The pooling grid that gives raw pixels (or voxels) about `size` numbers (at most the image itself)."""
    side = max(1, round((size / channels) ** (1 / len(image_shape))))
    return tuple(min(side, extent) for extent in image_shape)


@torch.no_grad()
def split_features(model: VQVAE | VQVAE2, slices: SliceSet, device: torch.device, cache_dir: str, batch_size: int,
                   matched_size: int = 0) -> SplitFeatures:
    """Every feature set of a split, of every level, computed batch by batch: memory stays a small multiple of the
    features. matched_size > 0 adds "pixels_matched": the slices pooled to about that many numbers."""
    model.eval()
    codes = encode_split(model, slices, device, cache_dir, batch_size)
    channels, image_shape = slices.images.shape[1], tuple(slices.images.shape[2:])
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(slices), batch_size):
        images = slices.as_float(slice(start, start + batch_size))
        latents = model.latent_maps(images.to(device))
        per_level = [level_features(quantizer, level[start:start + batch_size].to(device).long(), level_latents)
                     for quantizer, level, level_latents in zip(model.quantizers, codes, latents)]
        batch = {name: torch.cat([level[name] for level in per_level], dim=1).cpu() for name in FEATURE_SETS}
        batch["pixels"] = average_pool(images, [side // model.config.scale for side in image_shape]).flatten(1)
        if matched_size:
            batch["pixels_matched"] = average_pool(images, matched_grid(matched_size, channels, image_shape)).flatten(1)
        for name, values in batch.items():
            parts.setdefault(name, []).append(values)
    return SplitFeatures(slices, codes, {name: torch.cat(values) for name, values in parts.items()})


PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # the L2 penalties cross-validation chooses from
CV_FOLDS = 5


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     weight_decay: float = 1e-2) -> torch.nn.Linear:
    """Multinomial logistic regression with an L2 penalty, fitted to convergence by L-BFGS."""
    probe = torch.nn.Linear(features.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(features), labels) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def standardised(train_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Features scaled by the training part's mean and standard deviation."""
    mean = train_x.mean(0)
    std = train_x.std(0).clamp_min(1e-6) if len(train_x) > 1 else torch.ones_like(mean)
    return [(values - mean) / std for values in (train_x, *others)]


def stratified_folds(labels: torch.Tensor, folds: int, generator: torch.Generator) -> torch.Tensor:
    """A fold number for each item, every class spread evenly over the folds."""
    fold_of = torch.empty(len(labels), dtype=torch.long)
    for label in labels.unique():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        fold_of[members] = torch.arange(len(members)) % folds
    return fold_of


def cross_validated_penalty(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                            generator: torch.Generator) -> float:
    """The penalty of PENALTIES whose probes predict the held-out folds of the labelled slices with the lowest
    cross-entropy (stratified folds; ties go to the larger penalty). Log-loss, not accuracy, so that the choice
    also sees how sure the probe is."""
    folds = min(CV_FOLDS, int(torch.bincount(labels).min()))
    if folds < 2:
        return 1e-2  # too few labels to hold any out
    fold_of = stratified_folds(labels, folds, generator)
    losses = []
    for penalty in PENALTIES:
        loss = 0.0
        for fold in range(folds):
            held = fold_of == fold
            train_x, held_x = standardised(features[~held], features[held])
            probe = fit_linear_probe(train_x, labels[~held], num_classes, penalty)
            with torch.no_grad():
                loss += F.cross_entropy(probe(held_x), labels[held], reduction="sum").item()
        losses.append(loss)
    best = min(losses)
    return max(penalty for penalty, loss in zip(PENALTIES, losses) if loss <= best * (1 + 1e-6))


def probe_predictions(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int,
                      generator: torch.Generator) -> torch.Tensor:
    """The classes a probe fitted on standardised training features with a cross-validated penalty predicts."""
    penalty = cross_validated_penalty(train_x, train_y, num_classes, generator)
    train_x, test_x = standardised(train_x, test_x)
    probe = fit_linear_probe(train_x, train_y, num_classes, penalty)
    with torch.no_grad():
        return probe(test_x).argmax(1)


BASELINES = ("pixels", "pixels_matched")


def run_probes(features: dict[str, SplitFeatures], evaluation: str, fractions: list[float], sets: list[str],
               seeds: list[int], baselines: Sequence[str] = BASELINES) -> dict[str, float]:
    """Mean and standard deviation over seeds of each probe's accuracy and balanced accuracy (the mean recall of
    the classes), per feature set and label fraction.

    Keys: accuracy_<set>_<percent>, balanced_accuracy_<set>_<percent> and their _std for every set and baseline;
    accuracy_features_<percent> (and _std) for the first set; margin_<percent> (and _std): the first set's
    accuracy minus the best baseline's, per seed."""
    train, test = features["train"], features[evaluation]
    labels, num_classes = train.slices.labels, len(train.slices.class_names)
    names = [*sets, *baselines]
    inputs = {name: (train.vectors(name), test.vectors(name)) for name in names}
    results = {}
    for percent in fractions:
        scores = {(name, kind): [] for name in names for kind in ("accuracy", "balanced_accuracy")}
        for seed in seeds if percent < 100 else seeds[:1]:  # all the labels: every seed would make the same fit
            subset = balanced_subset(labels, percent, train.slices.class_names, seed)
            for name, (train_x, test_x) in inputs.items():
                predicted = probe_predictions(train_x[subset], labels[subset], test_x, num_classes,
                                              torch.Generator().manual_seed(seed))
                scores[name, "accuracy"].append((predicted == test.slices.labels).float().mean().item())
                scores[name, "balanced_accuracy"].append(balanced_accuracy(predicted, test.slices.labels,
                                                                           num_classes))
        for (name, kind), values in scores.items():
            results[f"{kind}_{name}_{percent:g}"], results[f"{kind}_{name}_{percent:g}_std"] = mean_std(values)
        results[f"accuracy_features_{percent:g}"] = results[f"accuracy_{sets[0]}_{percent:g}"]
        results[f"accuracy_features_{percent:g}_std"] = results[f"accuracy_{sets[0]}_{percent:g}_std"]
        if not baselines:
            continue
        best_baseline = max(baselines, key=lambda name: results[f"accuracy_{name}_{percent:g}"])
        margins = [ours - theirs for ours, theirs in zip(scores[sets[0], "accuracy"],
                                                          scores[best_baseline, "accuracy"])]
        results[f"margin_{percent:g}"], results[f"margin_{percent:g}_std"] = mean_std(margins)
    return results


def mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def check_feature_sets(sets: list[str], with_prior: bool = False) -> None:
    parts = {part for name in sets for part in name.split("+")}
    unknown = sorted(parts - set(FEATURE_SETS) - set(PRIOR_SETS))
    if unknown:
        raise UsageError(f"--features: unknown feature set {', '.join(unknown)}; choose from "
                         f"{', '.join(FEATURE_SETS + PRIOR_SETS)} (several joined by '+')")
    if parts & set(PRIOR_SETS) and not with_prior:
        raise UsageError("--features: the prior's feature sets need a transformer prior: --prior PRIOR.pth")


# ----------------------------------------------------------------------------- a prior's hidden states

PRIOR_SETS = ("prior", "prior_grid")
# The default block, as a share of the prior's depth. iGPT and ViT-VQGAN found the best probe in the middle blocks;
# on brain MRI at 64x64 (docs/RESULTS.md, "Few labels") the CPU recipe's 4-block prior probes best at block 3:
# prior_grid 0.788 and 0.876 with 1% and 10% of the labels, against 0.779 and 0.872 at block 2 and 0.747 and 0.830
# (the plain average) at block 1.
PRIOR_BLOCK_SHARE = 0.75


@torch.no_grad()
def prior_features(prior: torch.nn.Module, codes: torch.Tensor, block: int, device: torch.device,
                   batch_size: int = 128) -> dict[str, torch.Tensor]:
    """A transformer prior's hidden states after `block` (1 = the first) for each code map [N, h, w] (no class
    given): averaged over every position ("prior", width numbers) and over a 2x2 and a 4x4 grid of positions
    ("prior_grid", 20 x width). One pass per map, so a slice's features are its own."""
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in PRIOR_SETS}
    for start in range(0, len(codes), batch_size):
        maps = codes[start:start + batch_size].to(device).long()
        states = prior.hidden_states(maps, blocks=block).float()  # [B, h w, width]
        grid = states.transpose(1, 2).reshape(len(maps), -1, *maps.shape[1:])
        parts["prior"].append(states.mean(dim=1).cpu())
        parts["prior_grid"].append(pyramid(grid).cpu())
    return {name: torch.cat(values) for name, values in parts.items()}


def load_feature_prior(path: str, device: torch.device, vqvae_path: str | None = None, block: int | None = None,
                       refuse_labels: bool = False) -> tuple[torch.nn.Module, int]:
    """The transformer prior at `path` (refusing another kind, or one of another VQ-VAE) and the block whose
    outputs are its features (default: three quarters of the way up, PRIOR_BLOCK_SHARE). A prior that saw class
    labels (conditional, or trained on some classes only) carries them into its features: a warning, or with
    refuse_labels an error."""
    prior, checkpoint, _, _ = checkpoints.load_prior(path, device, vqvae_path)
    if not hasattr(prior, "hidden_states"):
        raise UsageError(f"--prior {path}: is not a one-level transformer prior (train_prior.py --prior "
                         "transformer); its hidden states are the prior features")
    depth = prior.config.depth
    block = max(1, round(PRIOR_BLOCK_SHARE * depth)) if block is None else block
    if not 1 <= block <= depth:
        raise UsageError(f"--block {block}: this prior has blocks 1 to {depth}")
    classes = checkpoint.get("args", {}).get("classes")
    if checkpoint["conditional"] or classes:
        seen = "the class labels of every training slice" if checkpoint["conditional"] else \
            f"the slices of {' '.join(classes)} only, chosen by their labels"
        message = (f"--prior {path}: was trained on {seen}: its features carry them (train_prior.py --unconditional "
                   "on every training slice for a probe with few labels)")
        if refuse_labels:
            raise UsageError(message)
        print(f"warning: {message}")
    return prior, block
