"""Train a classifier on few labels, its trunk the VQ-VAE's encoder (fine-tuned from the checkpoint's weights), the
same network from random weights, or a small standard CNN; then predict a folder.

    python finetune.py -m checkpoints/<run>.pth --labels 10                 # 10% of the training labels
    python finetune.py -m checkpoints/<run>.pth --labels 10 --trunk scratch  # or cnn: the baselines
    python finetune.py --predict checkpoints/<run>-classifier-pretrained-10.pth --data DIR --out predictions.csv

Training takes a class-balanced share (--labels, in %) of the training split's labels (class folders), holds out
--held-out of them for early stopping, trains the head alone first when the trunk is pretrained, then everything, and
reports accuracy and balanced accuracy on the validation split. The checkpoint rebuilds the classifier alone.
Predicting writes one row per image: file, the class predicted, the probability of each class (and the true class
when the image is in a class folder).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import checkpoints
import utils
from checkpoints import evaluation_slices, labelled_splits
from classifier import TRUNK_CHOICES, FineTuning, check_trunk, fit_classifier, predict_probabilities
from dataset import balanced_subset
from metrics import classification_scores
from modules import VQVAEConfig, weights_fingerprint
from utils import UsageError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("-m", "--model", help="the VQ-VAE checkpoint (train.py) whose encoder and data are used")
    parser.add_argument("--predict", metavar="CLASSIFIER", help="predict with this classifier checkpoint instead of "
                        "training one")
    parser.add_argument("--data", help="data folder; default: the one the VQ-VAE was trained on")
    parser.add_argument("--split", choices=("test", "validate", "train"), default="test",
                        help="--predict: split to predict (test falls back to validate; a folder without split "
                        "folders is predicted whole)")
    parser.add_argument("--out", help="--predict: the CSV to write (default: predictions.csv)")
    parser.add_argument("--labels", type=float, default=10.0, help="percentage of the training labels to use, "
                        "class-balanced")
    parser.add_argument("--trunk", choices=TRUNK_CHOICES, default="pretrained",
                        help="pretrained: the VQ-VAE's encoder with its weights; scratch: the same network from "
                        "random weights; cnn: a small standard CNN")
    training = parser.add_argument_group("training")
    utils.add_config_arguments(training, FineTuning)
    parser.add_argument("--seed", type=int, default=0, help="draws the labelled slices and seeds the training")
    parser.add_argument("--run-name", help="checkpoint name (default: <vqvae>-classifier-<trunk>-<labels>)")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="where the classifier is saved")
    parser.add_argument("--metrics-json", help="also write the validation metrics to this JSON file")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--cache-dir", default=".cache/slices", help="where decoded slices are cached")
    return parser


def train(args: argparse.Namespace, device: torch.device) -> dict:
    settings = utils.config_from_args(FineTuning, args)
    vqvae_checkpoint = checkpoints.load_checkpoint(args.model, expected_kind="vqvae")
    check_trunk(args.trunk, VQVAEConfig.from_dict(vqvae_checkpoint["config"]))
    splits = labelled_splits(vqvae_checkpoint, args.data, ("train", "validate"), args.cache_dir)
    names = splits["train"].class_names
    chosen = balanced_subset(splits["train"].labels, args.labels, names, args.seed)
    print(f"training a {args.trunk} classifier on {len(chosen)} labelled slices ({args.labels:g}% of "
          f"{len(splits['train'])}, {len(names)} classes), {settings.held_out:.0%} of them held out for early "
          f"stopping, on {device}")
    model, result = fit_classifier(args.trunk, vqvae_checkpoint, splits["train"].images[chosen],
                                   splits["train"].labels[chosen], len(names), settings, args.seed, device)
    validation = splits["validate"]
    predictions = predict_probabilities(model, validation.images).argmax(dim=1).cpu()
    metrics = {**classification_scores(predictions, validation.labels, len(names)),
               "labelled": len(chosen), "steps": result.steps, "best_step": result.best_step,
               "seconds": result.seconds, "validation_slices": len(validation)}
    print(f"validation split ({len(validation)} slices): accuracy {metrics['accuracy']:.3f}, balanced accuracy "
          f"{metrics['balanced_accuracy']:.3f} (weights of step {result.best_step} of {result.steps}, "
          f"{result.seconds:.0f}s)")
    run_name = args.run_name or f"{Path(args.model).stem}-classifier-{args.trunk}-{args.labels:g}"
    path = Path(args.checkpoint_dir) / f"{run_name}.pth"
    checkpoints.save_checkpoint(path, {
        "kind": "classifier", "model": model.state_dict(), "config": model.config.to_dict(), "class_names": names,
        "preprocessing": vqvae_checkpoint["preprocessing"],
        "data": {**vqvae_checkpoint.get("data", {}), **({"root": args.data, "demo": False} if args.data else {})},
        "training": settings.to_dict(), "metrics": metrics, "labels_percent": args.labels, "seed": args.seed,
        "vqvae": {"path": str(Path(args.model).resolve()),
                  "fingerprint": weights_fingerprint(checkpoints.load_vqvae(args.model, torch.device("cpu"),
                                                                            vqvae_checkpoint)[0])}})
    print(f"checkpoint {path}\nnext: python finetune.py --predict {path} --data DIR --out predictions.csv")
    if args.metrics_json:
        utils.write_json(args.metrics_json, metrics)
    return {**metrics, "checkpoint": str(path)}


def predict(args: argparse.Namespace, device: torch.device) -> dict:
    model, checkpoint = checkpoints.load_classifier(args.predict, device)
    _, slices, _ = evaluation_slices(checkpoint, args.data, args.split, args.cache_dir, 1)
    names = checkpoint["class_names"]
    probabilities = predict_probabilities(model, slices.images).cpu()
    rows = []
    for index, values in enumerate(probabilities):
        label = int(slices.labels[index])
        true = slices.class_names[label] if label >= 0 else ""
        rows.append({"file": slices.sources[index], "class": names[int(values.argmax())],
                     **{f"p_{name}": float(value) for name, value in zip(names, values)}, "true_class": true})
    out = Path(args.out or "predictions.csv")
    utils.write_csv_rows(out, rows)
    known = [row for row in rows if row["true_class"]]
    accuracy = sum(row["class"] == row["true_class"] for row in known) / len(known) if known else None
    print(f"predicted {len(rows)} images to {out}" + (f"; accuracy {accuracy:.3f} on the {len(known)} in class "
                                                      "folders" if known else ""))
    return {"predictions": str(out), "images": len(rows), "accuracy": accuracy}


def main(argv: list[str] | None = None) -> dict:
    args = utils.absolute_paths(build_parser().parse_args(argv), ("model", "predict", "data", "cache_dir"))
    device = utils.pick_device(args.device)
    if args.predict:
        return predict(args, device)
    if not args.model:
        raise UsageError("-m VQVAE_CHECKPOINT is needed to train (or --predict CLASSIFIER to predict)")
    return train(args, device)


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
