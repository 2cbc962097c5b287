"""Few labels: which starting point gives the best classifier when only 1%, 10% or 100% of the training labels
are known, the VQ-VAE (its codes, its prior's hidden states, its encoder fine-tuned) or nothing (raw pixels, the
same encoder from random weights, a small standard CNN).

    python benchmarks/few_labels.py --data data/brain-mri          # trains the CPU recipe: VQ-VAE 180 s, prior 600 s
    python benchmarks/few_labels.py --data DIR --vqvae VQVAE.pth --prior PRIOR.pth --eval-split test

Methods, each given the same class-balanced label draws (--seeds draws at 1% and 10%, one at 100%):
  pixels    linear probe on the raw pixels, average-pooled to the code map's size
  features  linear probe on the codes (extract_features.py's default set, bag_grid+pooled)
  prior     linear probe on the transformer prior's hidden states at --block, averaged over a 2x2 and a 4x4 grid of
            positions (prior_grid; the prior is trained without labels: train_prior.py --unconditional)
  finetune  the VQ-VAE's encoder with its weights and a pooled linear head (finetune.py --trunk pretrained)
  scratch   the same network from random weights, same recipe, steps and augmentations (--trunk scratch)
  cnn       a small standard CNN of about the encoder's size, trained the same way (--trunk cnn)
Linear probes choose their L2 penalty by cross-validation on the labelled slices; the trained classifiers stop early
on a held-out fifth of them. The evaluated split's labels only score (its images chose the VQ-VAE's and the prior's
best epochs, without labels; --eval-split test where the data has a test split keeps even that apart).

Prints each method's accuracy and balanced accuracy (mean ± standard deviation over draws) as it is measured, and
its seconds; writes <out>/few_labels.json and <out>/few_labels.png.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import checkpoints  # noqa: E402
import figures  # noqa: E402
import utils  # noqa: E402
from classifier import FineTuning, check_trunk, fit_classifier, predict_probabilities  # noqa: E402
from dataset import balanced_subset  # noqa: E402
from features import (SplitFeatures, load_feature_prior, mean_std, prior_features, run_probes,  # noqa: E402
                      split_features, standardised)
from metrics import classification_scores  # noqa: E402
from modules import VQVAE, VQVAE2  # noqa: E402
from training import train_recipe_if_missing  # noqa: E402

PROBED = {"pixels": "pixels", "features": "bag_grid+pooled", "prior": "prior_grid"}  # method -> feature set
TRAINED = {"finetune": "pretrained", "scratch": "scratch", "cnn": "cnn"}  # method -> classifier.TRUNK_CHOICES
METHODS = (*PROBED, *TRAINED)
LABELS = {"pixels": "linear probe: raw pixels", "features": "linear probe: codes (bag_grid+pooled)",
          "prior": "linear probe: prior's hidden states", "finetune": "encoder fine-tuned",
          "scratch": "encoder from scratch", "cnn": "small CNN from scratch"}
SCORES = ("accuracy", "balanced_accuracy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("--data", default="data/brain-mri", help="split folders with class folders")
    parser.add_argument("--vqvae", help="a VQ-VAE checkpoint (default: train the CPU recipe's, 180 s)")
    parser.add_argument("--prior", help="a transformer prior of its codes, trained without labels (default: train "
                        "the CPU recipe's, 600 s, unconditional)")
    parser.add_argument("--block", type=int, help="the prior's block whose outputs are probed (default: three quarters "
                        "of the way up)")
    parser.add_argument("--eval-split", choices=("validate", "test"), default="validate",
                        help="the split every method is scored on")
    parser.add_argument("--percents", type=float, nargs="+", default=[1, 10, 100], help="shares of the training "
                        "labels, in %%")
    parser.add_argument("--seeds", type=int, default=5, help="label draws per share below 100%%")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    utils.add_config_arguments(parser.add_argument_group("the trained classifiers (finetune.py's options)"),
                               FineTuning)
    # The CPU budget (20 minutes for every method at 64x64): fewer steps than finetune.py's, the same for every
    # trained method; checks more often, so that early stopping still has room.
    parser.set_defaults(steps=400, evaluate_every=25)
    parser.add_argument("--feature-batch-size", type=int, default=128, help="slices per forward pass of the "
                        "probed features")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="resources/few_labels", help="few_labels.json and few_labels.png")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="where the models it trains go")
    parser.add_argument("--cache-dir", default=".cache/slices")
    parser.add_argument("--metrics-json", help="also write accuracy_<method>_<percent> and balanced_accuracy_... "
                        "here")
    return parser


def seeds_for(percent: float, seeds: int) -> list[int]:
    return list(range(seeds if percent < 100 else 1))  # all the labels: one draw is every draw


def probe_methods(args: argparse.Namespace, methods: list[str], features: dict[str, SplitFeatures],
                  results: dict) -> None:
    """Each probed method's scores, over the same draws as the trained methods; its seconds include its features'."""
    for method in methods:
        began = time.perf_counter()
        for percent in args.percents:
            scores = run_probes(features, args.eval_split, [percent], [PROBED[method]], seeds_for(percent, args.seeds),
                                baselines=())
            for score in SCORES:
                for suffix in ("", "_std"):
                    results[f"{score}_{method}_{percent:g}{suffix}"] = scores[f"{score}_{PROBED[method]}_{percent:g}"
                                                                              f"{suffix}"]
            report(results, method, percent)
        results[f"seconds_{method}"] += time.perf_counter() - began


def trained_methods(args: argparse.Namespace, methods: list[str], settings: FineTuning, vqvae_checkpoint: dict,
                    splits: dict, device: torch.device, results: dict) -> None:
    """Each classifier trained on every draw, scored on the evaluated split."""
    train, test = splits["train"], splits[args.eval_split]
    classes = len(train.class_names)
    for method in methods:
        began = time.perf_counter()
        for percent in args.percents:
            scores: dict[str, list[float]] = {score: [] for score in SCORES}
            for seed in seeds_for(percent, args.seeds):
                chosen = balanced_subset(train.labels, percent, train.class_names, seed)
                model, _ = fit_classifier(TRAINED[method], vqvae_checkpoint, train.images[chosen], train.labels[chosen],
                                          classes, settings, seed, device)
                predicted = predict_probabilities(model, test.images).argmax(dim=1).cpu()
                for score, value in classification_scores(predicted, test.labels, classes).items():
                    scores[score].append(value)
            for score, values in scores.items():
                results[f"{score}_{method}_{percent:g}"], results[f"{score}_{method}_{percent:g}_std"] = \
                    mean_std(values)
            report(results, method, percent)
        results[f"seconds_{method}"] += time.perf_counter() - began


def report(results: dict, method: str, percent: float) -> None:
    key = f"{method}_{percent:g}"
    print(f"  {method:>9} {percent:>5g}%  accuracy {results[f'accuracy_{key}']:.3f} ± "
          f"{results[f'accuracy_{key}_std']:.3f}  balanced {results[f'balanced_accuracy_{key}']:.3f} ± "
          f"{results[f'balanced_accuracy_{key}_std']:.3f}", flush=True)


def compute_features(args: argparse.Namespace, methods: list[str], model: VQVAE | VQVAE2, splits: dict,
                     device: torch.device, results: dict) -> dict[str, SplitFeatures]:
    """The probed methods' features of both splits, each slice's from itself alone. Their seconds go to the methods
    that use them: the one pass that encodes the slices and pools the pixels split between pixels and features,
    the prior's pass on those codes to prior."""
    began = time.perf_counter()
    features = {split: split_features(model, splits[split], device, args.cache_dir, args.feature_batch_size)
                for split in ("train", args.eval_split)}
    for method in set(methods) & {"pixels", "features"}:
        results[f"seconds_{method}"] += (time.perf_counter() - began) / len(set(methods) & {"pixels", "features"})
    if "prior" in methods:
        began = time.perf_counter()
        prior, block = load_feature_prior(args.prior, device, args.vqvae, args.block, refuse_labels=True)
        results["prior_block"] = block
        for part in features.values():
            part.sets.update(prior_features(prior, part.codes[0], block, device, args.feature_batch_size))
        results["seconds_prior"] += time.perf_counter() - began
    return features


def save_figure(args: argparse.Namespace, methods: list[str], results: dict, features: dict | None,
                test_name: str, class_names: list[str]) -> None:
    """Accuracy against labels per method, beside the evaluated split's best probed features in 2D (PCA)."""
    curves = {LABELS[method]: ([results[f"accuracy_{method}_{p:g}"] for p in args.percents],
                               [results[f"accuracy_{method}_{p:g}_std"] for p in args.percents],
                               method in ("pixels", "scratch", "cnn")) for method in methods}
    projected, classes = "", {}
    if features:
        probed = [method for method in methods if method in PROBED and method != "pixels"] or ["pixels"]
        projected = PROBED[probed[-1]]
        test = features[args.eval_split]
        vectors, = standardised(test.vectors(projected))
        _, _, components = torch.linalg.svd(vectors, full_matrices=False)
        classes = {name: vectors[test.slices.labels == index] @ components[:2].t()
                   for index, name in enumerate(class_names)}
    figures.save_probe_figure(Path(args.out) / "few_labels.png", args.percents, curves, classes, test_name, projected,
                              title="classifiers from few labels: mean and standard deviation over label draws")


def main() -> None:
    args = build_parser().parse_args()
    methods = list(dict.fromkeys(args.methods))
    settings = utils.config_from_args(FineTuning, args)  # bad options fail now, not after the probes
    train_recipe_if_missing(args, "fewlabels-vqvae", ["--unconditional"], need_prior="prior" in methods)
    device = utils.pick_device(args.device)
    model, vqvae_checkpoint = checkpoints.load_vqvae(args.vqvae, device)
    for trunk in {TRAINED[method] for method in methods if method in TRAINED}:
        check_trunk(trunk, model.config)
    splits = checkpoints.labelled_splits(vqvae_checkpoint, args.data, ("train", args.eval_split), args.cache_dir)
    train, test = splits["train"], splits[args.eval_split]
    results: dict = {"train_slices": len(train), "evaluated_slices": len(test), "eval_split": args.eval_split,
                     "labelled": {f"{p:g}": len(balanced_subset(train.labels, p, train.class_names, 0))
                                  for p in args.percents},
                     **{f"seconds_{method}": 0.0 for method in methods}}
    print(f"{len(train)} training slices, {len(test)} {args.eval_split} slices, {len(train.class_names)} classes "
          f"({', '.join(train.class_names)}), {tuple(train.images.shape[2:])}; labelled per share: "
          f"{results['labelled']}; {args.seeds} draws below 100%")
    features = None
    probed = [method for method in methods if method in PROBED]
    if probed:
        features = compute_features(args, probed, model, splits, device, results)
        probe_methods(args, probed, features, results)
    trained_methods(args, [method for method in methods if method in TRAINED], settings, vqvae_checkpoint, splits,
                    device, results)
    print("seconds: " + ", ".join(f"{method} {results[f'seconds_{method}']:.0f}" for method in methods) +
          f"; all {sum(results[f'seconds_{method}'] for method in methods):.0f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    utils.write_json(Path(args.out) / "few_labels.json", results)
    save_figure(args, methods, results, features, test.name, train.class_names)
    print(f"wrote {args.out}/few_labels.json and few_labels.png")
    if args.metrics_json:
        utils.write_json(args.metrics_json, results)


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
