"""Turn every slice (or volume, with a 3D model) into codes and fixed-length features with a trained VQ-VAE;
optionally probe them with labels.

    python extract_features.py -m checkpoints/<run>.pth --out features.npz
    python extract_features.py -m checkpoints/<run>.pth --probe --metrics-json probe.json

Feature sets per slice (every level of a two-level model, concatenated), written to the .npz under these names:
  bag          the normalised histogram of the codes it uses (K per level)
  bag_grid     that histogram in each cell of a 3x3 grid of the slice (9K per level; volumes: 3x3x3, 27K)
  pooled       its code vectors averaged and max-pooled over the slice (2D per level)
  grid         its code vectors averaged over a 2x2 and a 4x4 grid of the slice, a small spatial pyramid (20D;
               volumes: 2x2x2 and 4x4x4, 72D)
  latent       the encoder's continuous output before quantization, averaged and max-pooled (2D per level)
  latent_grid  that continuous output averaged over the 2x2 and 4x4 grids (20D per level)
  pixels       the raw slice average-pooled to the code-map size: the baseline

--probe fits a multinomial logistic regression (L-BFGS, L2 penalty chosen by cross-validation on the labelled
slices) on 1%, 10% and 100% of the training labels (class-balanced draws), --seeds times, for each set of --features
(names, or names joined by "+", concatenated), for the pixel baseline and for pixels pooled to the dimension of the
first feature set. It reports each accuracy's mean and standard deviation over the seeds.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

import checkpoints
import figures
import utils
from checkpoints import checkpoint_data
from codes import encode_split
from dataset import SliceSet, load_split
from modules import VQVAE, VQVAE2
from readers import Preprocessing
from utils import UsageError

FEATURE_SETS = ("bag", "bag_grid", "pooled", "grid", "latent", "latent_grid")
GRIDS = (2, 4)  # the spatial pyramid of the grid features
# Cells per side of the bags with layout. On brain MRI (README, "Codes as features") 3x3 led at 10% of the labels
# (0.843 against 0.824 for 2x2) and tied at 1%; 4x4 leaves too few codes per cell to count (0.725 ± 0.077 at 1%).
BAG_GRID = 3
# First the set reported as accuracy_features_*, the best measured (README, "Codes as features"); the second, the
# previous default, for comparison. More sets cost probe time.
DEFAULT_FEATURES = ["bag_grid+pooled", "bag+pooled+latent_grid"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("-m", "--model", required=True, help="VQ-VAE checkpoint written by train.py")
    parser.add_argument("--data", help="data folder; default: the one the checkpoint was trained on")
    parser.add_argument("--out", default="features.npz", help="where the features are written")
    parser.add_argument("--probe", action="store_true", help="train and test linear probes (needs class folders)")
    parser.add_argument("--features", nargs="+", default=DEFAULT_FEATURES, metavar="SET",
                        help="feature sets to probe, each a name or names joined by '+'; the first is the one "
                        "reported as accuracy_features_* (and the size the matched pixel baseline takes)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1, 10, 100],
                        help="percentages of the training labels the probe may use")
    parser.add_argument("--seeds", type=int, default=5, help="label draws (and fits) per fraction")
    parser.add_argument("--metrics-json", help="write the probe accuracies to this JSON file")
    parser.add_argument("--seed", type=int, default=0, help="the first seed of the label draws")
    parser.add_argument("--batch-size", type=int, default=128, help="slices per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--cache-dir", default=".cache/slices", help="cache of decoded slices and codes")
    parser.add_argument("--resources-dir", default="resources", help="figures go to <dir>/<checkpoint>/")
    return parser


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
def level_features(quantizer, codes: torch.Tensor, latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every feature set of one level, for a batch of code maps [B, *S] and their latents [B, D, *S]."""
    vectors, latents, num_codes = quantizer.lookup(codes), latents.float(), quantizer.num_embeddings
    return {"bag": bags_on_grid(codes, num_codes, cells_per_side=1), "bag_grid": bags_on_grid(codes, num_codes),
            "pooled": mean_and_max(vectors), "grid": pyramid(vectors),
            "latent": mean_and_max(latents), "latent_grid": pyramid(latents)}


def feature_size(name: str, config) -> int:
    """How many numbers a feature set (or several joined by '+') has per slice."""
    pyramid_cells = sum(size**config.spatial_dims for size in GRIDS)
    bag_cells = BAG_GRID**config.spatial_dims
    per_level = {"bag": config.num_embeddings, "bag_grid": bag_cells * config.num_embeddings,
                 "pooled": 2 * config.embedding_dim,
                 "grid": pyramid_cells * config.embedding_dim, "latent": 2 * config.embedding_dim,
                 "latent_grid": pyramid_cells * config.embedding_dim}
    return config.levels * sum(per_level[part] for part in name.split("+"))


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


def save_features(path: str | Path, features: dict[str, SplitFeatures], levels: tuple[str, ...]) -> None:
    splits = list(features)
    code_names = ["codes"] if len(levels) == 1 else [f"codes_{level}" for level in levels]

    def column(getter) -> np.ndarray:
        return np.concatenate([getter(features[split]) for split in splits])

    arrays = {
        "path": column(lambda f: np.array(f.slices.sources, dtype=str)),
        "split": column(lambda f: np.array([f.slices.name] * len(f.slices), dtype=str)),
        "label": column(lambda f: f.slices.labels.numpy()),
        "class_names": np.array(features[splits[0]].slices.class_names, dtype=str),
        **{name: column(lambda f, index=index: f.codes[index].numpy()) for index, name in enumerate(code_names)},
        **{name: column(lambda f, name=name: f.sets[name].numpy()) for name in (*FEATURE_SETS, "pixels")},
    }

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)

    utils.atomic_write(path, write)


# ----------------------------------------------------------------------------- linear probe

def balanced_subset(labels: torch.Tensor, percent: float, class_names: list[str], seed: int) -> torch.Tensor:
    """Indices of `percent`% of each class's examples, chosen with a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for class_id, name in enumerate(class_names):
        members = torch.nonzero(labels == class_id).flatten()
        count = round(len(members) * percent / 100)
        if count < 1:
            raise UsageError(f"class '{name}' has {len(members)} training slices: {percent:g}% of them is less than "
                             "one; use a larger --fractions value or more data")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(chosen)


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


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   num_classes: int, generator: torch.Generator) -> float:
    """Test accuracy of a probe fitted on standardised training features with a cross-validated penalty."""
    penalty = cross_validated_penalty(train_x, train_y, num_classes, generator)
    train_x, test_x = standardised(train_x, test_x)
    probe = fit_linear_probe(train_x, train_y, num_classes, penalty)
    with torch.no_grad():
        predictions = probe(test_x).argmax(1)
    return (predictions == test_y).float().mean().item()


BASELINES = ("pixels", "pixels_matched")


def run_probes(features: dict[str, SplitFeatures], evaluation: str, fractions: list[float], sets: list[str],
               seeds: list[int]) -> dict[str, float]:
    """Mean and standard deviation over seeds of each probe's accuracy, per feature set and label fraction.

    Keys: accuracy_<set>_<percent> and ..._std for every set and baseline; accuracy_features_<percent> (and _std)
    for the first set; margin_<percent> (and _std): the first set's accuracy minus the best baseline's, per seed."""
    train, test = features["train"], features[evaluation]
    labels, num_classes = train.slices.labels, len(train.slices.class_names)
    names = [*sets, *BASELINES]
    inputs = {name: (train.vectors(name), test.vectors(name)) for name in names}
    results = {}
    for percent in fractions:
        accuracies = {name: [] for name in names}
        for seed in seeds if percent < 100 else seeds[:1]:  # all the labels: every seed would make the same fit
            subset = balanced_subset(labels, percent, train.slices.class_names, seed)
            for name, (train_x, test_x) in inputs.items():
                accuracies[name].append(probe_accuracy(train_x[subset], labels[subset], test_x, test.slices.labels,
                                                       num_classes, torch.Generator().manual_seed(seed)))
        for name, values in accuracies.items():
            results[f"accuracy_{name}_{percent:g}"], results[f"accuracy_{name}_{percent:g}_std"] = mean_std(values)
        results[f"accuracy_features_{percent:g}"] = results[f"accuracy_{sets[0]}_{percent:g}"]
        results[f"accuracy_features_{percent:g}_std"] = results[f"accuracy_{sets[0]}_{percent:g}_std"]
        best_baseline = max(BASELINES, key=lambda name: results[f"accuracy_{name}_{percent:g}"])
        margins = [ours - theirs for ours, theirs in zip(accuracies[sets[0]], accuracies[best_baseline])]
        results[f"margin_{percent:g}"], results[f"margin_{percent:g}_std"] = mean_std(margins)
    return results


def mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def check_labels(features: dict[str, SplitFeatures], root: Path) -> None:
    train = features["train"].slices
    if not train.class_names or bool((train.labels < 0).any()):
        raise UsageError(f"{root}: --probe needs labels, and the training images are not all in class subfolders "
                         "(e.g. train/<class>/*.png)")
    if len(train.class_names) < 2:
        raise UsageError(f"{root}: --probe needs at least two classes, found only '{train.class_names[0]}'")


def save_probe_figure(folder: Path, results: dict[str, float], fractions: list[float], sets: list[str],
                      test: SplitFeatures) -> None:
    """Accuracy against labels used, per feature set, beside the test split's first feature set in 2D (PCA)."""
    labels = {"pixels": "raw pixels (code-map size)", "pixels_matched": "raw pixels (size of the first set)"}
    curves = {labels.get(name, name): ([results[f"accuracy_{name}_{p:g}"] for p in fractions],
                                       [results[f"accuracy_{name}_{p:g}_std"] for p in fractions], name in BASELINES)
              for name in [*sets, *BASELINES]}
    vectors, = standardised(test.vectors(sets[0]))
    _, _, components = torch.linalg.svd(vectors, full_matrices=False)
    classes = {name: vectors[test.slices.labels == class_id] @ components[:2].t()
               for class_id, name in enumerate(test.slices.class_names)}
    figures.save_probe_figure(folder / "probe.png", fractions, curves, classes, test.slices.name, sets[0])


def check_feature_sets(sets: list[str]) -> None:
    unknown = sorted({part for name in sets for part in name.split("+")} - set(FEATURE_SETS))
    if unknown:
        raise UsageError(f"--features: unknown feature set {', '.join(unknown)}; choose from "
                         f"{', '.join(FEATURE_SETS)} (several joined by '+')")


def print_probe_table(results: dict[str, float], fractions: list[float], sets: list[str]) -> None:
    names = [*sets, *BASELINES]
    width = max(16, *(len(name) + 2 for name in names))
    print("  " + f"{'labels':>7}" + "".join(f"{name:>{width}}" for name in names))
    for percent in fractions:
        cells = "".join(f"{results[f'accuracy_{name}_{percent:g}']:>{width - 9}.3f} ± "
                        f"{results[f'accuracy_{name}_{percent:g}_std']:.3f}" for name in names)
        print(f"  {percent:>6g}%{cells}")
    print("  margin of " + sets[0] + " over the better pixel baseline, per draw: " + ", ".join(
        f"{percent:g}%: {results[f'margin_{percent:g}']:+.3f} ± {results[f'margin_{percent:g}_std']:.3f}"
        for percent in fractions))


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_feature_sets(args.features)
    device = utils.pick_device(args.device)
    model, checkpoint = checkpoints.load_vqvae(args.model, device)
    prep = Preprocessing.from_dict(checkpoint["preprocessing"])
    source = checkpoint_data(checkpoint, args.data)
    matched_size = feature_size(args.features[0], model.config)
    features = {}
    for split in source.files:
        slices = load_split(source, split, prep, args.cache_dir, min_side=model.config.image_multiple)
        features[split] = split_features(model, slices, device, args.cache_dir, args.batch_size, matched_size)
    save_features(args.out, features, model.levels)
    total = sum(len(f.slices) for f in features.values())
    items = utils.items_name(model.config.spatial_dims)
    print(f"wrote features of {total} {items} ({', '.join(f'{s} {len(f.slices)}' for s, f in features.items())}) "
          f"to {args.out}")
    if not args.probe:
        return {"num_slices": total}
    check_labels(features, source.root)
    evaluation = "test" if "test" in features else "validate"
    if evaluation == "validate":
        print("no test split: the probes are evaluated on the validation split")
    seeds = list(range(args.seed, args.seed + args.seeds))
    results = run_probes(features, evaluation, args.fractions, args.features, seeds)
    print(f"linear probe accuracy on the {evaluation} split ({len(features[evaluation].slices)} slices, "
          f"{len(source.class_names)} classes), mean ± standard deviation over {len(seeds)} label draws:")
    print_probe_table(results, args.fractions, args.features)
    folder = Path(args.resources_dir) / Path(args.model).stem
    save_probe_figure(folder, results, args.fractions, args.features, features[evaluation])
    print(f"figure in {folder}/probe.png")
    if args.metrics_json:
        utils.write_json(args.metrics_json, results)
    return results


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
