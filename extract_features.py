"""Turn every slice into codes and fixed-length features with a trained VQ-VAE; optionally probe them with labels.

    python extract_features.py -m checkpoints/<run>.pth --out features.npz
    python extract_features.py -m checkpoints/<run>.pth --out features.npz --probe --metrics-json probe.json

Features per slice: the normalised histogram of the codes it uses (bag of codes) and its quantized embeddings
pooled over space (mean and max). --probe fits a multinomial logistic regression on 1%, 10% and 100% of the
training labels (class-balanced, fixed seed) and compares it with the same probe on raw pixels downsampled to
the code-map size.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import utils
from dataset import Preprocessing, SliceSet, checkpoint_data, encode_split, load_split
from modules import VQVAE
from utils import UsageError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the description's own line breaks kept."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("-m", "--model", required=True, help="VQ-VAE checkpoint written by train.py")
    parser.add_argument("--data", help="data folder; default: the one the checkpoint was trained on")
    parser.add_argument("--out", default="features.npz", help="where the features are written")
    parser.add_argument("--probe", action="store_true", help="train and test linear probes (needs class folders)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1, 10, 100],
                        help="percentages of the training labels the probe may use")
    parser.add_argument("--metrics-json", help="write the probe accuracies to this JSON file")
    parser.add_argument("--seed", type=int, default=0, help="seeds the choice of labelled slices")
    parser.add_argument("--batch-size", type=int, default=128, help="slices per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--cache-dir", default=".cache/slices", help="cache of decoded slices and codes")
    parser.add_argument("--resources-dir", default="resources", help="figures go to <dir>/<checkpoint>/")
    return parser.parse_args(argv)


@dataclass
class SplitFeatures:
    slices: SliceSet
    codes: torch.Tensor  # [N, h, w], int16 (int32 for K > 32767)
    bag_of_codes: torch.Tensor  # [N, K]
    embedding_mean: torch.Tensor  # [N, D]
    embedding_max: torch.Tensor  # [N, D]
    pixels: torch.Tensor  # [N, C * h * w]: the slices average-pooled to the code-map size, the baseline

    def vectors(self) -> torch.Tensor:
        return torch.cat([self.bag_of_codes, self.embedding_mean, self.embedding_max], dim=1)


@torch.no_grad()
def split_features(model: VQVAE, slices: SliceSet, device: torch.device, cache_dir: str, batch_size: int,
                   ) -> SplitFeatures:
    """Every feature of a split, computed batch by batch: memory stays a small multiple of the features."""
    codes = encode_split(model, slices, device, cache_dir, batch_size)
    num_codes, scale = model.config.num_embeddings, model.config.scale
    parts: dict[str, list[torch.Tensor]] = {"bag": [], "mean": [], "max": [], "pixels": []}
    for start in range(0, len(codes), batch_size):
        batch = codes[start:start + batch_size].to(device).long()
        flat = batch.flatten(1)
        counts = torch.zeros(len(batch), num_codes, device=device).scatter_add_(
            1, flat, torch.ones(flat.shape, device=device))  # a histogram per slice, without a one-hot tensor
        parts["bag"].append((counts / flat.shape[1]).cpu())
        embedded = model.quantizer.lookup(batch).flatten(2)
        parts["mean"].append(embedded.mean(dim=2).cpu())
        parts["max"].append(embedded.amax(dim=2).cpu())
        parts["pixels"].append(F.avg_pool2d(slices.as_float(slice(start, start + batch_size)), scale).flatten(1))
    return SplitFeatures(slices, codes, *(torch.cat(parts[name]) for name in ("bag", "mean", "max", "pixels")))


def save_features(path: str | Path, features: dict[str, SplitFeatures]) -> None:
    splits = list(features)

    def column(getter) -> np.ndarray:
        return np.concatenate([getter(features[split]) for split in splits])

    arrays = {
        "path": column(lambda f: np.array(f.slices.sources, dtype=str)),
        "split": column(lambda f: np.array([f.slices.name] * len(f.codes), dtype=str)),
        "label": column(lambda f: f.slices.labels.numpy()),
        "class_names": np.array(features[splits[0]].slices.class_names, dtype=str),
        "codes": column(lambda f: f.codes.numpy()),
        "bag_of_codes": column(lambda f: f.bag_of_codes.numpy()),
        "embedding_mean": column(lambda f: f.embedding_mean.numpy()),
        "embedding_max": column(lambda f: f.embedding_max.numpy()),
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


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   num_classes: int) -> float:
    mean = train_x.mean(0)
    std = train_x.std(0).clamp_min(1e-6) if len(train_x) > 1 else torch.ones_like(mean)
    probe = fit_linear_probe((train_x - mean) / std, train_y, num_classes)
    with torch.no_grad():
        predictions = probe((test_x - mean) / std).argmax(1)
    return (predictions == test_y).float().mean().item()


def run_probes(features: dict[str, SplitFeatures], evaluation: str, fractions: list[float],
               seed: int) -> dict[str, float]:
    train, test = features["train"], features[evaluation]
    class_names = train.slices.class_names
    inputs = {"features": (train.vectors(), test.vectors()), "pixels": (train.pixels, test.pixels)}
    results = {}
    for percent in fractions:
        subset = balanced_subset(train.slices.labels, percent, class_names, seed)
        for name, (train_x, test_x) in inputs.items():
            results[f"accuracy_{name}_{percent:g}"] = probe_accuracy(
                train_x[subset], train.slices.labels[subset], test_x, test.slices.labels, len(class_names))
    return results


def check_labels(features: dict[str, SplitFeatures], root: Path) -> None:
    train = features["train"].slices
    if not train.class_names or bool((train.labels < 0).any()):
        raise UsageError(f"{root}: --probe needs labels, and the training images are not all in class subfolders "
                         "(e.g. train/<class>/*.png)")
    if len(train.class_names) < 2:
        raise UsageError(f"{root}: --probe needs at least two classes, found only '{train.class_names[0]}'")


def save_probe_figures(folder: Path, results: dict[str, float], fractions: list[float], test: SplitFeatures) -> None:
    plt = utils.pyplot()
    fig, (accuracy_axis, pca_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("features", "pixels"):
        accuracy_axis.plot(fractions, [results[f"accuracy_{name}_{p:g}"] for p in fractions], marker="o",
                           label="VQ-VAE features" if name == "features" else "raw pixels (code-map size)")
    accuracy_axis.set_xscale("log")
    accuracy_axis.set_xlabel("% of training labels used")
    accuracy_axis.set_ylabel(f"accuracy on the {test.slices.name} split")
    accuracy_axis.set_title("linear probe")
    accuracy_axis.legend(fontsize=8)
    accuracy_axis.grid(alpha=0.3)
    vectors = test.vectors()
    vectors = (vectors - vectors.mean(0)) / vectors.std(0).clamp_min(1e-6)
    _, _, components = torch.linalg.svd(vectors, full_matrices=False)
    projected = (vectors @ components[:2].t()).numpy()
    for class_id, name in enumerate(test.slices.class_names):
        members = (test.slices.labels == class_id).numpy()
        pca_axis.scatter(projected[members, 0], projected[members, 1], s=6, alpha=0.6, label=name)
    pca_axis.set_title(f"PCA of the features ({test.slices.name} split)")
    pca_axis.legend(fontsize=8, markerscale=2)
    utils.save_figure(fig, folder / "probe.png")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = utils.pick_device(args.device)
    model, checkpoint = utils.load_vqvae(args.model, device)
    prep = Preprocessing.from_dict(checkpoint["preprocessing"])
    source = checkpoint_data(checkpoint, args.data)
    features = {}
    for split in source.files:
        slices = load_split(source, split, prep, args.cache_dir, min_side=model.config.scale)
        features[split] = split_features(model, slices, device, args.cache_dir, args.batch_size)
    save_features(args.out, features)
    total = sum(len(f.codes) for f in features.values())
    print(f"wrote features of {total} slices ({', '.join(f'{s} {len(f.codes)}' for s, f in features.items())}) "
          f"to {args.out}")
    if not args.probe:
        return {"num_slices": total}
    check_labels(features, source.root)
    evaluation = "test" if "test" in features else "validate"
    if evaluation == "validate":
        print("no test split: the probes are evaluated on the validation split")
    results = run_probes(features, evaluation, args.fractions, args.seed)
    print(f"linear probe accuracy on the {evaluation} split ({len(features[evaluation].codes)} slices, "
          f"{len(source.class_names)} classes):")
    print(f"  {'labels':>7}  {'features':>8}  {'pixels':>8}")
    for percent in args.fractions:
        print(f"  {percent:>6g}%  {results[f'accuracy_features_{percent:g}']:8.3f}  "
              f"{results[f'accuracy_pixels_{percent:g}']:8.3f}")
    folder = Path(args.resources_dir) / Path(args.model).stem
    save_probe_figures(folder, results, args.fractions, features[evaluation])
    print(f"figure in {folder}/probe.png")
    if args.metrics_json:
        utils.write_json(args.metrics_json, results)
    return results


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
