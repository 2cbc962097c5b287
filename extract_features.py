"""Turn every slice (or volume, with a 3D model) into codes and fixed-length features with a trained VQ-VAE;
optionally probe them with labels.

    python extract_features.py -m checkpoints/<run>.pth --out features.npz
    python extract_features.py -m checkpoints/<run>.pth --probe --metrics-json probe.json
    python extract_features.py -m checkpoints/<run>.pth --prior PRIOR.pth --features prior_grid --probe

Feature sets per slice (every level of a two-level model, concatenated), written to the .npz under these names:
  bag          the normalised histogram of the codes it uses (K per level)
  bag_grid     that histogram in each cell of a 3x3 grid of the slice (9K per level; volumes: 3x3x3, 27K)
  pooled       its code vectors averaged and max-pooled over the slice (2D per level)
  grid         its code vectors averaged over a 2x2 and a 4x4 grid of the slice, a small spatial pyramid (20D;
               volumes: 2x2x2 and 4x4x4, 72D)
  latent       the encoder's continuous output before quantization, averaged and max-pooled (2D per level)
  latent_grid  that continuous output averaged over the 2x2 and 4x4 grids (20D per level)
  pixels       the raw slice average-pooled to the code-map size: the baseline
With --prior (a transformer prior of the codes, trained without labels: train_prior.py --unconditional):
  prior        its hidden states after --block, averaged over the code map's positions (its width)
  prior_grid   those states averaged over the 2x2 and 4x4 grids (20 x its width): with few labels the best
               features measured (docs/RESULTS.md, "Few labels")

--probe fits a multinomial logistic regression (L-BFGS, L2 penalty chosen by cross-validation on the labelled
slices) on 1%, 10% and 100% of the training labels (class-balanced draws), --seeds times, for each set of --features
(names, or names joined by "+", concatenated), for the pixel baseline and for pixels pooled to the dimension of the
first feature set. It reports each accuracy's (and balanced accuracy's) mean and standard deviation over the
seeds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

import checkpoints
import figures
import utils
from checkpoints import checkpoint_data
from dataset import load_split
from features import BASELINES, FEATURE_SETS, PRIOR_SETS, SplitFeatures, check_feature_sets, feature_size, \
    load_feature_prior, prior_features, run_probes, split_features, standardised
from readers import Preprocessing
from utils import UsageError

# First the set reported as accuracy_features_*, the best of the codes' own sets (docs/RESULTS.md, "Codes as
# features"); the second, the previous default, for comparison. More sets cost probe time.
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
    parser.add_argument("--prior", metavar="PRIOR", help="a transformer prior of this VQ-VAE's codes (train_prior.py): "
                        "adds the feature sets prior and prior_grid, its hidden states averaged over positions")
    parser.add_argument("--block", type=int, help="the prior's block whose outputs are the prior features (1 = the "
                        "first; default: three quarters of the way up, block 3 of 4)")
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
        **{name: column(lambda f, name=name: f.sets[name].numpy()) for name in (*FEATURE_SETS, "pixels", *PRIOR_SETS)
           if name in features[splits[0]].sets},
    }

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)

    utils.atomic_write(path, write)


# ----------------------------------------------------------------------------- linear probe

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
    check_feature_sets(args.features, with_prior=bool(args.prior))
    device = utils.pick_device(args.device)
    model, checkpoint = checkpoints.load_vqvae(args.model, device)
    prior, block = load_feature_prior(args.prior, device, args.model, args.block) if args.prior else (None, 0)
    prep = Preprocessing.from_dict(checkpoint["preprocessing"])
    source = checkpoint_data(checkpoint, args.data)
    matched_size = feature_size(args.features[0], model.config, prior.config.width if prior else 0)
    features = {}
    for split in source.files:
        slices = load_split(source, split, prep, args.cache_dir, min_side=model.config.image_multiple)
        features[split] = split_features(model, slices, device, args.cache_dir, args.batch_size, matched_size)
        if prior is not None:
            features[split].sets.update(prior_features(prior, features[split].codes[0], block, device,
                                                       args.batch_size))
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
