"""Evaluate a trained VQ-VAE (or PixelCNN prior) on the test split and draw what it does.

    python predict.py -m checkpoints/<run>.pth [--data DIR] [--metrics-json metrics.json]
    python predict.py -m checkpoints/<run>.pth --data scan.nii.gz          # any file, or folder of files
    python predict.py -m checkpoints/<run>-prior.pth --sample 16 [--temperature 1.0] [--label CLASS]
    python predict.py -m checkpoints/<run>-prior.pth --sample 1000 --save-samples samples/   # a data set to keep
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import checkpoints
import figures
import metrics
import utils
from checkpoints import checkpoint_data, evaluation_slices
from codes import encode_split, prior_evaluation_loaders
from dataset import BatchLoader, load_split
from modules import weights_fingerprint
from outputs import FileOutputs, empty_folder
from priors import prior_configs, sampling_options
from readers import NIFTI_SUFFIXES, Preprocessing, write_image
from sampling import stack_levels
from utils import UsageError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("-m", "--model", required=True,
                        help="checkpoint written by train.py (VQ-VAE) or train_prior.py (prior)")
    parser.add_argument("--data", help="data folder (a folder without split folders, or a single file, is evaluated "
                        "whole); default: the one the checkpoint was trained on")
    parser.add_argument("--split", choices=("test", "validate", "train"), default="test",
                        help="split to evaluate (test falls back to validate when there is none)")
    parser.add_argument("--metrics-json", help="also write the metrics to this JSON file")
    parser.add_argument("--examples", type=int, help="slices (default 8) or volumes (default 3, each in three "
                        "planes) shown in the reconstruction figure")
    parser.add_argument("--save-reconstructions", metavar="DIR", help="VQ-VAE checkpoints: write each evaluated "
                        "file's reconstruction to a new folder DIR, named and sized as its input (NIfTI with its "
                        "affine, in its own intensities)")
    parser.add_argument("--batch-size", type=int, default=64, help="slices per forward pass, and samples drawn at once")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--cache-dir", default=".cache/slices", help="where decoded slices and code maps are cached")
    parser.add_argument("--resources-dir", default="resources", help="figures go to <resources-dir>/<checkpoint>/")
    sampling = parser.add_argument_group("prior checkpoints")
    sampling.add_argument("--sample", type=int, default=0, metavar="N", help="generate N new slices")
    sampling.add_argument("--temperature", type=float, default=1.0, help="below 1: safer, less varied samples")
    sampling.add_argument("--top-k", type=int, default=0, help="draw each code among the k likeliest only; 0 = all")
    sampling.add_argument("--top-p", type=float, default=1.0, help="draw each code among the likeliest whose "
                          "probabilities sum to p (nucleus sampling); 1 = all")
    sampling.add_argument("--steps", type=int, default=12, help="masked prior: parallel steps that fill a map")
    sampling.add_argument("--guidance", type=float, default=3.0, help="class-conditional transformer priors: "
                          "classifier-free guidance weight w, each draw from cond + w (cond - uncond); 0 = none (3: "
                          "the class asked for in 87%% of brain MRI samples, against 56%% without; docs/RESULTS.md)")
    sampling.add_argument("--save-samples", metavar="DIR", help="write each sample as its own file, "
                          "DIR/<class>/sample_00001.png (.nii.gz for models trained on NIfTI), their code maps in "
                          "DIR/codes.npz and how they were drawn in DIR/samples.json: a data set --data can read")
    sampling.add_argument("--seed", type=int, default=0, help="seeds the sampling")
    sampling.add_argument("--label", help="class to generate (conditional priors); default: cycle through classes")
    sampling.add_argument("--vqvae", help="the prior's VQ-VAE checkpoint, if it has moved since training")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = utils.pick_device(args.device)
    checkpoint = checkpoints.load_checkpoint(args.model)
    if checkpoint["kind"] == "prior":
        if args.save_reconstructions:
            raise UsageError("--save-reconstructions takes a VQ-VAE checkpoint; this is a prior's")
        return predict_prior(args, device, checkpoint)
    model, checkpoint = checkpoints.load_vqvae(args.model, device, checkpoint)
    if args.save_reconstructions and model.config.spatial_dims == 3:
        raise UsageError("--save-reconstructions writes 2D slices; this VQ-VAE models 3D volumes")
    reconstructions_dir = empty_folder(args.save_reconstructions, "--save-reconstructions") \
        if args.save_reconstructions else None
    source, slices, prep = evaluation_slices(checkpoint, args.data, args.split, args.cache_dir,
                                             model.config.image_multiple)
    split = slices.name
    dims = model.config.spatial_dims
    items = utils.items_name(dims)
    loader = BatchLoader(slices.images, slices.labels, args.batch_size, shuffle=False, device=device)
    results = metrics.evaluate_vqvae(model, loader, description=split)

    ssim = results["ssim_per_image"]
    use = {key: value for key, value in results.items() if key.startswith(("codebook_usage", "perplexity"))}
    report = {"ssim_mean": ssim.mean().item(), "ssim_min": ssim.min().item(), "ssim_max": ssim.max().item(),
               "psnr_mean": results["psnr"], "mae_mean": results["mae"], "seam_ratio": results["seam_ratio"], **use,
               "num_images": len(slices), "split": split}
    code_use = "; ".join(f"{label}codebook usage {report['codebook_usage' + suffix]:.3f} (perplexity "
                         f"{report['perplexity' + suffix]:.1f} of {model.config.num_embeddings})"
                         for suffix, label in metrics.level_names(model.levels))
    print(f"{split} split, {len(slices)} {items}: {'3D ' if dims == 3 else ''}SSIM mean {report['ssim_mean']:.4f} "
          f"(min {report['ssim_min']:.4f}, max {report['ssim_max']:.4f}) | PSNR {report['psnr_mean']:.2f} dB | "
          f"MAE {report['mae_mean']:.4f} | seams {report['seam_ratio']:.2f} (1 = as the images) | {code_use}")
    if args.metrics_json:
        utils.write_json(args.metrics_json, report)
    if reconstructions_dir is not None:
        save_reconstructions(FileOutputs(reconstructions_dir, args.data, source.root, prep), model, slices, loader)

    figures_dir = Path(args.resources_dir) / Path(args.model).stem
    examples = args.examples or (3 if dims == 3 else 8)
    shown = slices.as_float(torch.linspace(0, len(slices) - 1, min(examples, len(slices))).long()).to(device)
    figures.save_reconstructions(figures_dir / f"{split}_reconstructions.png", model, shown,
                               f"{split} {items}: input | code map{'s' if len(model.levels) > 1 else ''} | "
                               "reconstruction" + (" (mid-planes)" if dims == 3 else ""))
    if len(model.levels) > 1:
        figures.save_level_contributions(figures_dir / f"{split}_levels.png", model, shown, results["code_counts"],
                                       f"{split} {items}: what each level carries (the other held at its mean code)")
    figures.save_histogram(figures_dir / f"{split}_ssim_histogram.png", ssim.numpy(),
                         f"per-{items[:-1]} {'3D ' if dims == 3 else ''}SSIM on the {split} split "
                         f"(mean {report['ssim_mean']:.3f})", "SSIM")
    figures.save_code_usage_figure(figures_dir / f"{split}_code_usage.png", results["code_counts"], model.levels,
                                 f"code use on the {split} split ({model.config.num_embeddings} codes per level)")
    print(f"figures in {figures_dir}/")
    return report


@torch.inference_mode()
def save_reconstructions(writer: FileOutputs, model, slices, loader: BatchLoader) -> None:
    """Each slice's reconstruction as a file named and sized as its input, under the writer's folder."""
    written = 0
    for images, _ in utils.progress_bar(loader, desc="writing reconstructions", unit="batch"):
        for reconstruction in model(images)[0].float():
            writer.write_image("", slices.sources[written], reconstruction)
            written += 1
    print(f"wrote {written} reconstructions to {writer.folder}/, named as their inputs")


def sample_labels(args: argparse.Namespace, checkpoint: dict, device: torch.device) -> torch.Tensor | None:
    if not checkpoint["conditional"]:
        if args.label:
            raise UsageError(f"--label {args.label}: this prior is unconditional (its data had no class folders)")
        return None
    names = checkpoint["class_names"]
    if args.label is None:
        return torch.arange(args.sample, device=device) % len(names)
    if args.label not in names:
        raise UsageError(f"--label {args.label}: not a class of this prior ({', '.join(names)})")
    return torch.full((args.sample,), names.index(args.label), device=device)


def nearest_slices(samples: torch.Tensor, slices) -> torch.Tensor:
    """For each sample, the training slice closest in pixels (to show the prior is not copying)."""
    flat_samples = samples.flatten(1).cpu()
    best = torch.full((len(samples),), float("inf"))
    nearest = torch.zeros(len(samples), dtype=torch.long)
    for start in range(0, len(slices), 1024):
        chunk = slices.as_float(slice(start, start + 1024)).flatten(1)
        distance, index = torch.cdist(flat_samples, chunk).min(dim=1)
        better = distance < best
        best[better], nearest[better] = distance[better], index[better] + start
    return slices.as_float(nearest)


def drawing_options(args: argparse.Namespace, prior) -> dict:
    """How each code is drawn besides the temperature, as the prior's sample() takes it."""
    return sampling_options(prior, top_k=args.top_k, top_p=args.top_p, guidance=args.guidance, steps=args.steps)


class SampleWriter:
    """Each sample as its own image file under a new folder, DIR/<class>/sample_00001.png (uint8 .nii.gz for models
    trained on NIfTI; straight in DIR for an unconditional prior), each written whole; their code maps and how they
    were drawn are written last, so a folder without samples.json is one whose run did not finish."""

    def __init__(self, folder: str, nifti: bool, class_names: list[str]):
        self.folder, self.nifti, self.class_names = Path(folder), nifti, class_names
        if self.folder.exists() and any(self.folder.iterdir()):
            raise UsageError(f"--save-samples {folder}: the folder is not empty; name a new one (samples of two runs "
                             "would mix)")
        self.files: list[str] = []

    def write(self, images: torch.Tensor, labels: torch.Tensor | None) -> None:
        for image, label in zip(images, labels.tolist() if labels is not None else [None] * len(images)):
            name = f"sample_{len(self.files) + 1:05d}{'.nii.gz' if self.nifti else '.png'}"
            relative = Path(self.class_names[label]) / name if label is not None else Path(name)
            write_image(self.folder / relative, image)
            self.files.append(str(relative))

    def finish(self, codes: list[torch.Tensor], labels: torch.Tensor | None, drawn: dict) -> None:
        arrays = {f"level{index}": level.numpy() for index, level in enumerate(codes)}
        arrays.update(files=np.array(self.files), labels=(labels.cpu() if labels is not None
                                                          else torch.full((len(self.files),), -1)).numpy())

        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)

        utils.atomic_write(self.folder / "codes.npz", write)
        utils.write_json(self.folder / "samples.json", {**drawn, "count": len(self.files),
                                                        "class_names": self.class_names})


def generate(args: argparse.Namespace, prior, checkpoint: dict, vqvae, device: torch.device,
             writer: SampleWriter | None = None, kept: int = 64) -> tuple[list[torch.Tensor], torch.Tensor, float]:
    """Draw --sample code maps, --batch-size at a time, decode each batch and hand it to the writer; returns every
    code map per level (int16, on the CPU), the first `kept` images, and the seconds the sampling itself took."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    labels = sample_labels(args, checkpoint, device)
    drawing = drawing_options(args, prior)
    codes: list[list[torch.Tensor]] = []
    images, seconds = [], 0.0
    for start in utils.progress_bar(range(0, args.sample, args.batch_size), desc="sampling", unit="batch"):
        count = min(args.batch_size, args.sample - start)
        batch_labels = None if labels is None else labels[start: start + count]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        batch = prior.sample_levels(count, code_shapes(checkpoint), batch_labels, args.temperature, generator,
                                    **drawing)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - began
        with torch.inference_mode():
            decoded = vqvae.decode_code_maps(batch).float().clamp(0, 1)
        if writer is not None:
            writer.write(decoded, batch_labels)
        codes.append([level.to("cpu", torch.int16) for level in batch])
        if start < kept:
            images.append(decoded[: kept - start].cpu())
    return [torch.cat(level) for level in zip(*codes)], torch.cat(images), seconds


def code_shapes(checkpoint: dict) -> list[list[int]]:
    return checkpoint.get("code_shapes") or [checkpoint["code_shape"]]  # older checkpoints: one level


def predict_prior(args: argparse.Namespace, device: torch.device, checkpoint: dict) -> dict:
    prior, checkpoint, vqvae, vqvae_checkpoint = checkpoints.load_prior(args.model, device, args.vqvae, checkpoint)
    prep = Preprocessing.from_dict(vqvae_checkpoint["preprocessing"])
    source = checkpoint_data(vqvae_checkpoint, args.data)
    split = source.evaluated_split(args.split)
    slices = load_split(source, split, prep, args.cache_dir, min_side=vqvae.config.image_multiple)
    codes = stack_levels(encode_split(vqvae, slices, device, args.cache_dir))
    conditional = checkpoint["conditional"]
    loader, unlabelled = prior_evaluation_loaders(codes, slices.labels, args.batch_size, device, conditional)
    if unlabelled is not None:
        print(f"{len(unlabelled.data)} {split} slices have no class folder: their NLL is the class-mixture likelihood")
    counts = checkpoint.get("class_counts") or [1] * len(checkpoint["class_names"])  # older checkpoints: uniform
    nll = metrics.evaluate_prior(prior, loader, metrics.class_log_prior(counts) if conditional else None, unlabelled)
    uniform = math.log2(vqvae.config.num_embeddings)
    report = {f"nll_{key}": value for key, value in nll.items()}
    report.update({"uniform_bits_per_code": uniform, "num_images": len(slices), "split": split})
    if "masked_bits_per_code" in nll:  # a masked-token prior has no likelihood
        print(f"{split} split, {len(slices)} code maps: {nll['masked_bits_per_code']:.3f} bits per masked code (mask "
              f"ratios {', '.join(map(str, prior.EVALUATION_RATIOS))}; uniform guessing: {uniform:.2f})")
    else:
        per_level = metrics.format_level_bits(nll, prior.levels)
        print(f"{split} split, {len(slices)} code maps: NLL {nll['bits_per_code']:.3f} bits per code "
              f"({nll['bits_per_code'] / uniform:.0%} of the {uniform:.2f} bits of uniform guessing{per_level}), "
              f"{nll['bits_per_image']:.0f} bits per image")
    figures_dir = Path(args.resources_dir) / Path(args.model).stem
    if args.sample > 0:
        sample(args, prior, checkpoint, vqvae, device, source, prep, figures_dir, report)
    if args.metrics_json:
        utils.write_json(args.metrics_json, report)
    return report


def sample(args: argparse.Namespace, prior, checkpoint: dict, vqvae, device: torch.device, source, prep,
           figures_dir: Path, report: dict) -> None:
    """Draw --sample slices; figures of them beside their nearest training slices; with --save-samples, files."""
    nifti = sum(path.name.lower().endswith(NIFTI_SUFFIXES) for path, _ in source.files["train"]) * 2 > \
        len(source.files["train"])
    writer = SampleWriter(args.save_samples, nifti, checkpoint["class_names"] if checkpoint["conditional"] else []) \
        if args.save_samples else None
    codes, images, seconds = generate(args, prior, checkpoint, vqvae, device, writer)
    report["sample_seconds"] = seconds
    shapes = " and ".join(f"{height}x{width}" for height, width in code_shapes(checkpoint))
    print(f"sampled {args.sample} code maps of {shapes} in {seconds:.2f}s on {device}")
    if writer is not None:
        drawn = {"prior": str(Path(args.model).resolve()), "prior_fingerprint": weights_fingerprint(prior),
                 "prior_kind": prior_configs(checkpoint["config"])[0].KIND, "vqvae": checkpoint["vqvae"],
                 "temperature": args.temperature, **drawing_options(args, prior), "seed": args.seed,
                 "batch_size": args.batch_size, "device": str(device), "label": args.label,
                 "image_size": list(prep.image_size), "format": "nii.gz" if nifti else "png",
                 "sample_seconds": seconds, "torch": torch.__version__}
        writer.finish(codes, sample_labels(args, checkpoint, torch.device("cpu")), drawn)
        print(f"wrote {args.sample} samples to {args.save_samples}/ (a data set: --data {args.save_samples})")
    train_slices = load_split(source, "train", prep, args.cache_dir, min_side=vqvae.config.image_multiple)
    options = drawing_options(args, prior)
    drawing = ", ".join(f"{key.replace('_', '-')} {value:g}" for key, value in options.items())
    figures.save_image_grid(figures_dir / "samples.png", images, title=f"{len(images)} of {args.sample} generated "
                            f"slices (temperature {args.temperature:g}, {drawing}, seed {args.seed})")
    shown = slice(0, min(8, args.sample))
    maps = figures.code_columns(vqvae, [level[shown].long().to(device) for level in codes])
    figures.save_image_rows(figures_dir / "samples_with_nearest.png",
                            {"generated": images[shown], **maps,
                             "nearest training slice": nearest_slices(images[shown], train_slices)},
                            code_colours=figures.model_code_colours(vqvae, list(maps)))
    print(f"figures in {figures_dir}/")


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
