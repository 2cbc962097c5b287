"""Score every image of a split for what is not normal, with a prior trained on normal anatomy: a score per image,
a pixel map per image at the file's own size, and the healed image (its unlikely codes redrawn from the prior).

    python train_prior.py -m checkpoints/<run>.pth --classes notumor       # a prior of normal anatomy
    python anomaly.py -m checkpoints/<run>-prior.pth --data DIR [--split test] --out OUT

Writes OUT/scores.csv (one row per image: file, class, score and the scores behind it; written last), OUT/maps/
(<file>.npy: float32 maps at the file's size; for NIfTI inputs also <file>, the map with the input's affine),
OUT/healed/ (the healed images in the input's own format), OUT/anomaly.json (the settings and times), and figures in
<resources-dir>/<prior>/: the top-scoring images (input | healed | map) and the scores' histogram per class. A slice
of a 3D volume adds .slice<i> to the names (i: its index along the slice axis) and fills the column 'slice'.
"""
from __future__ import annotations

import argparse
import dataclasses
import heapq
import sys
import time
from pathlib import Path

import torch

import checkpoints
import figures
import utils
from anomalies import AnomalyConfig, add_seconds, anomaly_maps, calibrated_threshold, check_prior, image_scores, \
    restore
from checkpoints import checkpoint_data, evaluation_slices
from codes import encode_split
from dataset import BatchLoader, load_split
from modules import weights_fingerprint
from outputs import FileOutputs, empty_folder
from priors import level_priors
from readers import Preprocessing
from utils import UsageError

COLUMNS = ("score", "map", "unlikely_bits", "bits", "codes_replaced", "residual_mean")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("-m", "--model", required=True, help="a prior checkpoint (train_prior.py), trained on normal "
                        "anatomy only (--classes NORMAL, or --data NORMAL_DIR)")
    parser.add_argument("--data", help="a data folder, a folder of images (class folders or not), or one file; "
                        "default: the data the VQ-VAE was trained on")
    parser.add_argument("--split", choices=("test", "validate", "train"), default="test",
                        help="split to score (test falls back to validate; a folder without split folders is scored "
                        "whole)")
    parser.add_argument("--out", help="a new folder for scores.csv, maps/ and healed/ (default: "
                        "anomalies/<prior>-<split>)")
    scoring = parser.add_argument_group("scoring")
    utils.add_config_arguments(scoring, AnomalyConfig)
    parser.add_argument("--examples", type=int, default=8, help="top-scoring images shown in the figure (0: no "
                        "figures)")
    parser.add_argument("--batch-size", type=int, default=128, help="images scored at once (128: the fastest on 2 CPU "
                        "cores)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the redrawn codes")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--cache-dir", default=".cache/slices", help="where decoded slices are cached")
    parser.add_argument("--resources-dir", default="resources", help="figures go to <resources-dir>/<prior>/")
    parser.add_argument("--vqvae", help="the prior's VQ-VAE checkpoint, if it has moved since training")
    return parser


def class_free(checkpoint: dict, prior: torch.nn.Module) -> None:
    """A class-conditional prior scores against its class-free likelihood (the images' classes are what is asked)."""
    if not checkpoint["conditional"]:
        return
    if not level_priors(prior)[0].config.class_dropout:
        raise UsageError(f"{checkpoint['run_name']}: a class-conditional prior trained without class dropout has no "
                         "class-free likelihood; train one on the normal class only (train_prior.py --classes NAME)")
    print("this prior is class-conditional: scoring against its class-free likelihood (a prior of the normal class "
          "only, train_prior.py --classes NAME, is the usual choice)")


def calibrate(args: argparse.Namespace, config: AnomalyConfig, checkpoint: dict, prior: torch.nn.Module, vqvae,
              vqvae_checkpoint: dict, device: torch.device) -> AnomalyConfig:
    """The threshold below which --redraw-share of the codes of the prior's own validation slices fall (the data
    and classes it was trained on: normal anatomy), unless --threshold gives one."""
    if config.threshold:
        return config
    trained = checkpoint.get("args", {})
    prep = Preprocessing.from_dict(vqvae_checkpoint["preprocessing"])
    try:
        source = checkpoint_data(vqvae_checkpoint, trained.get("data"), log=ignore)
        if trained.get("classes"):
            source = source.only_classes(trained["classes"])
        normal = load_split(source, "validate", prep, args.cache_dir, min_side=vqvae.config.image_multiple, log=ignore)
    except UsageError as problem:
        raise UsageError(f"cannot calibrate the threshold on the prior's own validation slices ({problem}); pass "
                         "--threshold P") from None
    levels = [level.long().to(device) for level in encode_split(vqvae, normal, device, args.cache_dir, log=ignore)]
    threshold = calibrated_threshold(prior, levels, config.redraw_share)
    classes = f" ({', '.join(trained['classes'])})" if trained.get("classes") else ""
    print(f"threshold {threshold:.3g}: {config.redraw_share:.0%} of the codes of the prior's own {len(normal)} "
          f"validation slices{classes} fall below it")
    return dataclasses.replace(config, threshold=threshold)


def ignore(_message: str) -> None:
    pass


class TopImages:
    """The `count` highest-scoring images seen so far, with their healed version and map (for the figure)."""

    def __init__(self, count: int):
        self.count, self.kept = count, []

    def offer(self, score: float, order: int, name: str, image: torch.Tensor, healed: torch.Tensor,
              values: torch.Tensor) -> None:
        item = (score, -order, name, image.cpu(), healed.cpu(), values.cpu())  # ties: the first seen ranks higher
        (heapq.heappush if len(self.kept) < self.count else heapq.heappushpop)(self.kept, item)

    def ranked(self) -> list[tuple]:
        return sorted(self.kept, reverse=True)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.examples < 0:
        raise UsageError(f"--examples {args.examples}: 0 or more")
    config = utils.config_from_args(AnomalyConfig, args)
    device = utils.pick_device(args.device)
    prior, checkpoint, vqvae, vqvae_checkpoint = checkpoints.load_prior(args.model, device, args.vqvae)
    check_prior(prior, vqvae)
    class_free(checkpoint, prior)
    config = calibrate(args, config, checkpoint, prior, vqvae, vqvae_checkpoint, device)
    source, slices, prep = evaluation_slices(vqvae_checkpoint, args.data, args.split, args.cache_dir,
                                             vqvae.config.image_multiple)
    split = slices.name
    out = empty_folder(args.out or Path("anomalies") / f"{Path(args.model).stem}-{split}", "--out")
    print(f"scoring {len(slices)} {split} slices on {device}: codes below probability {config.threshold:.3g} redrawn, "
          f"{config.resamplings} healed version{'s' * (config.resamplings > 1)} in each of {config.orderings} "
          f"ordering{'s' * (config.orderings > 1)}")
    began = time.perf_counter()
    rows, top, seconds = score_split(args, config, vqvae, prior, slices, FileOutputs(out, args.data, source.root,
                                                                                     prep), device)
    report = summarise(args, config, checkpoint, prior, split, rows, seconds, time.perf_counter() - began, device)
    utils.write_json(out / "anomaly.json", report)
    utils.write_csv_rows(out / "scores.csv", rows)  # last: a folder with scores.csv holds a finished run
    if args.examples:
        draw(args, split, rows, top)
    return {**report, "out": str(out)}


def score_split(args: argparse.Namespace, config: AnomalyConfig, vqvae, prior: torch.nn.Module, slices,
                writer: FileOutputs, device: torch.device) -> tuple[list[dict], TopImages, dict[str, float]]:
    """Score every slice, batch by batch, writing its map and healed image as each batch is done: the rows of
    scores.csv, the highest-scoring images, and the seconds of each stage."""
    rows, top, seconds = [], TopImages(args.examples), {}
    generator = torch.Generator(device=device).manual_seed(args.seed)
    loader = BatchLoader(slices.images, slices.labels, args.batch_size, shuffle=False, device=device)
    for index, (images, _) in enumerate(utils.progress_bar(loader, desc="scoring", unit="batch")):
        restoration = restore(vqvae, prior, images, config, generator)
        maps = anomaly_maps(restoration, config)
        scores = {name: values.tolist() for name, values in image_scores(restoration, maps, config).items()}
        written = time.perf_counter()
        for offset in range(len(images)):
            item = index * args.batch_size + offset
            source, label = slices.sources[item], int(slices.labels[item])
            name, slice_index = str(writer.relative(source)), writer.origin(source).slice_index
            rows.append({"file": name, "slice": "" if slice_index is None else slice_index,
                         "class": slices.class_names[label] if label >= 0 else "",
                         **{column: scores[column][offset] for column in COLUMNS}})
            writer.write_map("maps", source, maps[offset])
            writer.write_image("healed", source, restoration.healed[0, offset])
            top.offer(scores["score"][offset], item, name, images[offset], restoration.healed[0, offset], maps[offset])
        add_seconds(seconds, restoration.seconds, {"writing": time.perf_counter() - written})
    return rows, top, seconds


def summarise(args: argparse.Namespace, config: AnomalyConfig, checkpoint: dict, prior: torch.nn.Module, split: str,
              rows: list[dict], seconds: dict, total: float, device: torch.device) -> dict:
    """Say what was scored, how long each stage took and what scored highest; what anomaly.json keeps."""
    stages = ", ".join(f"{stage} {value:.1f}s" for stage, value in seconds.items())
    print(f"scored {len(rows)} images in {total:.1f}s ({stages})")
    for row in sorted(rows, key=lambda row: row["score"], reverse=True)[:3]:
        print(f"  highest: {row['file']} score {row['score']:.4f}, {row['codes_replaced']:.1%} of its codes redrawn")
    return {"prior": str(Path(args.model).resolve()), "prior_fingerprint": weights_fingerprint(prior),
            "vqvae": checkpoint["vqvae"], "data": args.data, "split": split, "images": len(rows),
            "settings": config.to_dict(), "seed": args.seed, "device": str(device), "seconds": total,
            "stage_seconds": seconds, "torch": torch.__version__}


def draw(args: argparse.Namespace, split: str, rows: list[dict], top: TopImages) -> None:
    figures_dir = Path(args.resources_dir) / Path(args.model).stem
    ranked = top.ranked()
    figures.save_anomaly_examples(
        figures_dir / f"anomaly_{split}_top.png", torch.stack([item[3] for item in ranked]),
        torch.stack([item[4] for item in ranked]), torch.stack([item[5] for item in ranked]),
        [f"{item[2]}\nscore {item[0]:.3g}" for item in ranked],
        f"the {len(ranked)} highest-scoring {split} images")
    classes = sorted({row["class"] for row in rows})
    groups = {name or "no class": [row["score"] for row in rows if row["class"] == name] for name in classes}
    figures.save_histogram(figures_dir / f"anomaly_{split}_scores.png", groups,
                           f"anomaly scores on the {split} split ({len(rows)} images)", f"score ({args.score})")
    print(f"figures in {figures_dir}/")


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
