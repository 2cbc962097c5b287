"""How well the prior's anomaly maps find lesions, against the VQ-VAE's plain residual and the prior's bits alone.

    python benchmarks/anomaly.py --data data/brain-mri        # trains the CPU recipe: VQ-VAE 180 s, prior 600 s
    python benchmarks/anomaly.py --data DIR --vqvae VQVAE.pth --prior PRIOR.pth

The VQ-VAE trains on every training slice, the prior (a transformer, train_prior.py --classes NORMAL) on the normal
class's only. Then:

- synthetic lesions (lesions.py: bright and dark blobs, noise patches) on the normal class's validation slices, each
  slice once clean and once lesioned: image AUROC (lesioned against clean), pixel AUPRC and best Dice over every
  pixel of both, per lesion kind and in all, for the prior's map (anomaly.py's), the residual |input -
  reconstruction| (smoothed alike) and the prior's bits per code without healing; a sweep of the threshold and the
  orderings beside them;
- real tumours: each other class's validation slices against the normal class's, image AUROC per class and score,
  beside simple image statistics (mean intensity, head area) that know nothing of tumours: where those separate
  the classes as well, the AUROC measures where the slices came from, not the tumour;
- time: 600 slices scored, split into encoding, prior, resampling and decoding.

Writes <out>/anomaly.json and figures (<out>/synthetic_examples.png, <out>/real_examples.png); each table's rows are
printed as they are measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import anomalies  # noqa: E402
import checkpoints  # noqa: E402
import figures  # noqa: E402
import metrics  # noqa: E402
import utils  # noqa: E402
from anomalies import AnomalyConfig  # noqa: E402
from dataset import load_split  # noqa: E402
from lesions import KINDS, add_lesion  # noqa: E402
from readers import Preprocessing  # noqa: E402
from training import train_recipe_if_missing  # noqa: E402


STATISTICS = ("mean intensity (no model)", "head area (no model)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("--data", default="data/brain-mri", help="split folders with class folders")
    parser.add_argument("--normal-class", default="notumor", help="the class folder of normal anatomy")
    parser.add_argument("--vqvae", help="a VQ-VAE checkpoint (default: train the CPU recipe's, 180 s)")
    parser.add_argument("--prior", help="a transformer prior of the normal class (default: train the CPU recipe's on "
                        "the normal class, 600 s)")
    parser.add_argument("--radii", type=float, nargs=2, default=(0.06, 0.15), help="lesion radii, shares of the side")
    parser.add_argument("--shares", type=float, nargs="+", default=(0.01, 0.02, 0.05, 0.1, 0.2),
                        help="redraw shares swept (the threshold calibrated to each, at the default orderings)")
    parser.add_argument("--orderings", type=int, nargs="+", default=(1, 2, 4), help="orderings swept (at the "
                        "default threshold and as many healed versions in all)")
    parser.add_argument("--timed", type=int, default=600, help="slices scored for the timing")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="resources/anomaly", help="figures and anomaly.json")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="where the models it trains go")
    parser.add_argument("--cache-dir", default=".cache/slices")
    parser.add_argument("--metrics-json", help="also write the headline numbers here")
    return parser


class Scorer:
    """Scores batches of images with one VQ-VAE and prior, batch by batch, into one Restoration; its thresholds are
    calibrated on the codes of `normal` images (as anomaly.py calibrates on the prior's own validation slices)."""

    def __init__(self, vqvae, prior, batch_size: int, seed: int, normal: torch.Tensor):
        self.vqvae, self.prior, self.batch_size, self.seed, self.device = vqvae, prior, batch_size, seed, normal.device
        with torch.inference_mode():
            batches = [vqvae.code_maps(normal[start:start + batch_size]) for start in range(0, len(normal), batch_size)]
        self.normal_levels = [torch.cat(level) for level in zip(*batches)]
        self.config = self.calibrated(AnomalyConfig())

    def calibrated(self, config: AnomalyConfig) -> AnomalyConfig:
        """The config with the threshold its redraw share gives on the normal images."""
        threshold = anomalies.calibrated_threshold(self.prior, self.normal_levels, config.redraw_share)
        return dataclasses.replace(config, threshold=threshold)

    def __call__(self, images: torch.Tensor, config: AnomalyConfig) -> anomalies.Restoration:
        generator = torch.Generator(device=images.device).manual_seed(self.seed)
        return anomalies.concatenate([anomalies.restore(self.vqvae, self.prior, images[start:start + self.batch_size],
                                                        config, generator)
                                      for start in range(0, len(images), self.batch_size)])


def method_maps(restoration: anomalies.Restoration, config: AnomalyConfig) -> dict[str, tuple]:
    """Per method, its pixel map [B, H, W] and image score [B] (the mean of the map's top pixels, or the bits of the
    unlikely codes for the prior's bits)."""
    change = (restoration.images - restoration.healed.mean(dim=0)).abs().mean(dim=1)
    redrawn = torch.stack([anomalies.to_pixels(level.float(), change.shape[-2:]) for level in restoration.replaced])
    maps = {"prior map (anomaly.py)": anomalies.anomaly_maps(restoration, config),
            "healed change alone": anomalies.gaussian_blur(change, config.smoothing),
            "healed change inside redrawn codes (Pinaya et al.)": anomalies.gaussian_blur(
                (restoration.images[None] - restoration.healed).abs().mean(dim=2).mul(redrawn.amax(dim=0)).mean(0),
                config.smoothing),
            "prior bits, no healing": anomalies.gaussian_blur(anomalies.bits_maps(restoration), config.smoothing),
            "residual |x - reconstruction|": anomalies.residual_maps(restoration, config)}
    return {name: (values, anomalies.top_mean(values, config.top_share)) for name, values in maps.items()}


def detection(maps: torch.Tensor, scores: torch.Tensor, pixel_labels: torch.Tensor,
              image_labels: torch.Tensor) -> dict[str, float]:
    return {"image_auroc": metrics.roc_auc(scores, image_labels),
            "pixel_auprc": metrics.average_precision(maps, pixel_labels),
            "best_dice": metrics.best_dice(maps, pixel_labels)[0]}


def synthetic(args: argparse.Namespace, clean: torch.Tensor, scorer: Scorer, report: dict) -> None:
    """Each clean slice lesioned once (kinds in turn); every method and setting scored on both."""
    clean = clean.cpu()  # lesions are drawn on the CPU, from their own seeds
    lesioned, masks = zip(*(add_lesion(image, KINDS[index % len(KINDS)], args.seed + index, tuple(args.radii))
                            for index, image in enumerate(clean)))
    images = torch.cat([clean, torch.stack(lesioned)]).to(scorer.device)
    pixel_labels = torch.cat([torch.zeros(len(clean), *masks[0].shape, dtype=torch.bool), torch.stack(masks)])
    image_labels = torch.cat([torch.zeros(len(clean)), torch.ones(len(clean))])
    kind_of = torch.arange(len(clean)) % len(KINDS)
    print(f"synthetic lesions on {len(clean)} normal validation slices ({', '.join(KINDS)} in turn; "
          f"{float(pixel_labels[len(clean):].float().mean()):.1%} of a lesioned slice's pixels on average)")
    config = scorer.config
    default = scorer(images, config)
    rows = {}
    for name, (maps, scores) in method_maps(default, config).items():
        maps = maps.cpu()
        rows[name] = {"all": detection(maps, scores.cpu(), pixel_labels, image_labels)}
        for kind_index, kind in enumerate(KINDS):
            chosen = torch.cat([torch.nonzero(kind_of == kind_index).flatten() + offset
                                for offset in (0, len(clean))])
            rows[name][kind] = detection(maps[chosen], scores.cpu()[chosen], pixel_labels[chosen],
                                         image_labels[chosen])
        print(f"  {name:32s} " + " | ".join(f"{part} AUROC {values['image_auroc']:.3f} AUPRC "
                                            f"{values['pixel_auprc']:.3f} Dice {values['best_dice']:.3f}"
                                            for part, values in rows[name].items()))
    report["synthetic"] = rows
    scores = anomalies.image_scores(default, anomalies.anomaly_maps(default, config), config)
    report["synthetic_image_scores"] = {name: metrics.roc_auc(values.cpu(), image_labels)
                                        for name, values in scores.items() if name != "score"}
    print("  image AUROC of each score in scores.csv: " + ", ".join(
        f"{name} {value:.3f}" for name, value in report["synthetic_image_scores"].items()))
    report["synthetic_seconds_per_image"] = sum(default.seconds.values()) / len(images)
    report["sweep"] = sweep(args, images, pixel_labels, image_labels, scorer, default)
    draw_synthetic(Path(args.out) / "synthetic_examples.png", default, pixel_labels, config, len(clean))


def sweep(args: argparse.Namespace, images: torch.Tensor, pixel_labels: torch.Tensor, image_labels: torch.Tensor,
          scorer: Scorer, default: anomalies.Restoration) -> list[dict]:
    """The prior's map at other redraw shares (default orderings) and orderings (default share)."""
    base = scorer.config
    healed_versions = base.orderings * base.resamplings  # orderings compared at equal cost
    settings = [{"redraw_share": share} for share in args.shares] + \
        [{"orderings": orderings, "resamplings": healed_versions // orderings} for orderings in args.orderings
         if orderings != base.orderings]
    rows = []
    for changes in settings:
        config = scorer.calibrated(dataclasses.replace(base, **changes))
        restoration = default if config == base else scorer(images, config)
        maps = anomalies.anomaly_maps(restoration, config).cpu()
        scores = anomalies.image_scores(restoration, maps, config)
        normal_codes = torch.cat([level[:, : len(images) // 2].float().flatten() for level in restoration.replaced])
        row = {**changes, "threshold": config.threshold,
               **detection(maps, scores["map"].cpu(), pixel_labels, image_labels),
               "normal_codes_redrawn": float(normal_codes.mean()),
               "seconds_per_image": sum(restoration.seconds.values()) / len(images)}
        rows.append(row)
        print("  sweep " + " ".join(f"{key} {value:.4g}" for key, value in row.items()))
    return rows


def real_tumours(args: argparse.Namespace, slices, scorer: Scorer, report: dict) -> None:
    """Each tumour class's validation slices against the normal class's: image AUROC of every score, and of image
    statistics that know nothing of tumours."""
    config = scorer.config
    images = slices.as_float(slice(None)).to(scorer.device)
    restoration = scorer(images, config)
    maps = anomalies.anomaly_maps(restoration, config)
    scores = {name: values.cpu() for name, values in anomalies.image_scores(restoration, maps, config).items()}
    cpu = images.cpu()
    scores["residual map"] = anomalies.top_mean(anomalies.residual_maps(restoration, config), config.top_share).cpu()
    scores[STATISTICS[0]] = cpu.flatten(1).mean(dim=1)
    scores[STATISTICS[1]] = (cpu.mean(dim=1) > 0.1).flatten(1).float().mean(dim=1)
    normal = slices.class_names.index(args.normal_class)
    rows = {}
    for label, name in enumerate(slices.class_names):
        if label == normal:
            continue
        chosen = (slices.labels == label) | (slices.labels == normal)
        truth = (slices.labels[chosen] == label).float()
        rows[name] = {score: metrics.roc_auc(values[chosen], truth) for score, values in scores.items()
                      if score != "score"}
        for score in STATISTICS:  # no model: which way they separate is beside the point
            rows[name][score] = max(rows[name][score], 1 - rows[name][score])
        print(f"  {name:12s} " + " | ".join(f"{score} {value:.3f}" for score, value in rows[name].items()))
    report["real"] = rows
    draw_real(Path(args.out) / "real_examples.png", restoration, maps, scores["map"], slices, normal)


def timing(args: argparse.Namespace, images: torch.Tensor, scorer: Scorer, report: dict) -> None:
    config = scorer.config
    began = time.perf_counter()
    restoration = scorer(images, config)
    anomalies.image_scores(restoration, anomalies.anomaly_maps(restoration, config), config)
    total = time.perf_counter() - began
    report["timing"] = {"slices": len(images), "seconds": total, **restoration.seconds}
    stages = ", ".join(f"{stage} {value:.1f}s" for stage, value in restoration.seconds.items())
    print(f"timing: {len(images)} slices scored in {total:.1f}s ({stages})")


def draw_synthetic(path: Path, restoration: anomalies.Restoration, pixel_labels: torch.Tensor,
                   config: AnomalyConfig, clean_count: int) -> None:
    shown = [clean_count + index for index in range(min(2 * len(KINDS), clean_count))]
    maps = method_maps(restoration, config)
    columns = {"input": restoration.images[shown].cpu(), "lesion": pixel_labels[shown][:, None].float(),
               "healed (one)": restoration.healed[0, shown].cpu()}
    for name in ("prior map (anomaly.py)", "prior bits, no healing", "residual |x - reconstruction|"):
        values = maps[name][0][shown].cpu()
        columns[name.split(" (")[0].split(" |")[0]] = (values / values.amax(dim=(1, 2), keepdim=True).clamp_min(1e-8)
                                                       )[:, None]
    figures.save_image_rows(path, columns, title="synthetic lesions on normal validation slices: each map scaled to "
                            "its own maximum", row_labels=[KINDS[index % len(KINDS)] for index in range(len(shown))])


def draw_real(path: Path, restoration: anomalies.Restoration, maps: torch.Tensor, scores: torch.Tensor, slices,
              normal: int) -> None:
    """The two highest-scoring slices of each class."""
    chosen, labels = [], []
    for label, name in enumerate(slices.class_names):
        members = torch.nonzero(slices.labels == label).flatten()
        best = members[scores[members].argsort(descending=True)[:2]]
        chosen += best.tolist()
        labels += [f"{name}\nscore {scores[index]:.3f}" for index in best.tolist()]
    figures.save_anomaly_examples(path, restoration.images[chosen].cpu(), restoration.healed[0, chosen].cpu(),
                                  maps[chosen].cpu(), labels, "the two highest-scoring validation slices of each class")


def main() -> None:
    args = build_parser().parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    train_recipe_if_missing(args, "anomaly-vqvae", ["--classes", args.normal_class])
    device = utils.pick_device(args.device)
    prior, _, vqvae, vqvae_checkpoint = checkpoints.load_prior(args.prior, device, args.vqvae)
    anomalies.check_prior(prior, vqvae)
    prep = Preprocessing.from_dict(vqvae_checkpoint["preprocessing"])
    source = checkpoints.checkpoint_data(vqvae_checkpoint, args.data)
    validation = load_split(source, "validate", prep, args.cache_dir, min_side=vqvae.config.image_multiple)
    if args.normal_class not in validation.class_names:
        raise utils.UsageError(f"--normal-class {args.normal_class}: not a class of {source.root}")
    normal = validation.as_float(torch.nonzero(validation.labels == validation.class_names.index(
        args.normal_class)).flatten()).to(device)
    scorer = Scorer(vqvae, prior, args.batch_size, args.seed, normal)
    report = {"vqvae": args.vqvae, "prior": args.prior, "settings": scorer.config.to_dict(),
              "radii": list(args.radii)}
    print(f"threshold {scorer.config.threshold:.3g}: {scorer.config.redraw_share:.0%} of the codes of the "
          f"{len(normal)} normal validation slices fall below it")
    synthetic(args, normal, scorer, report)
    real_tumours(args, validation, scorer, report)
    training = load_split(source, "train", prep, args.cache_dir, min_side=vqvae.config.image_multiple)
    timed = torch.cat([validation.as_float(slice(None)), training.as_float(slice(0, args.timed))])[: args.timed]
    timing(args, timed.to(device), scorer, report)
    utils.write_json(Path(args.out) / "anomaly.json", report)
    if args.metrics_json:
        utils.write_json(args.metrics_json, report)
    print(f"wrote {Path(args.out) / 'anomaly.json'} and figures in {args.out}/")


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
