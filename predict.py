"""Evaluate a trained VQ-VAE on the test split and draw what it does.

    python predict.py -m checkpoints/<run>.pth [--data DIR] [--metrics-json metrics.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import utils
from dataset import BatchLoader, Preprocessing, find_data, load_split, make_demo_data
from modules import VQVAE, VQVAEConfig
from train import evaluate, save_reconstructions
from utils import UsageError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-m", "--model", required=True, help="checkpoint written by train.py")
    parser.add_argument("--data", help="data folder; default: the one the checkpoint was trained on")
    parser.add_argument("--split", choices=("test", "validate", "train"), default="test",
                        help="split to evaluate (test falls back to validate when there is none)")
    parser.add_argument("--metrics-json", help="also write the metrics to this JSON file")
    parser.add_argument("--examples", type=int, default=8, help="slices shown in the reconstruction figure")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--cache-dir", default=".cache/slices")
    parser.add_argument("--resources-dir", default="resources", help="figures go to <resources-dir>/<checkpoint>/")
    return parser.parse_args(argv)


def load_vqvae(path: str | Path, device: torch.device) -> tuple[VQVAE, dict]:
    """Rebuild a VQ-VAE from its checkpoint alone."""
    checkpoint = utils.load_checkpoint(path, expected_kind="vqvae")
    try:
        model = VQVAE(VQVAEConfig.from_dict(checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
    except (ValueError, TypeError, RuntimeError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0][:160]
        raise UsageError(f"{path}: checkpoint does not match this version's model ({first_line})") from None
    return model.to(device).eval(), checkpoint


def resolve_data_dir(args_data: str | None, checkpoint: dict) -> Path:
    if args_data is not None:
        return Path(args_data)
    recorded = checkpoint.get("data", {})
    if recorded.get("demo"):  # regenerated if deleted: it is deterministic
        return make_demo_data(Path(recorded["root"]).parent)
    if "root" not in recorded:
        raise UsageError("the checkpoint does not record its data folder: pass --data")
    return Path(recorded["root"])


def choose_split(available: dict, wanted: str) -> str:
    if wanted in available:
        return wanted
    if wanted == "test":
        print("no test split: evaluating on the validation split instead")
        return "validate"
    raise UsageError(f"the data has no {wanted} split")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = utils.pick_device(args.device)
    model, checkpoint = load_vqvae(args.model, device)
    prep = Preprocessing.from_dict(checkpoint["preprocessing"])
    source = find_data(resolve_data_dir(args.data, checkpoint))
    split = choose_split(source.files, args.split)
    slices = load_split(source, split, prep, args.cache_dir, min_side=model.config.scale)
    loader = BatchLoader(slices, args.batch_size, shuffle=False, device=device)
    results = evaluate(model, loader, description=split)

    ssim = results["ssim_per_image"]
    metrics = {"ssim_mean": ssim.mean().item(), "ssim_min": ssim.min().item(), "ssim_max": ssim.max().item(),
               "psnr_mean": results["psnr"], "codebook_usage": results["codebook_usage"],
               "perplexity": results["perplexity"], "num_images": len(slices), "split": split}
    print(f"{split} split, {len(slices)} slices: SSIM mean {metrics['ssim_mean']:.4f} (min {metrics['ssim_min']:.4f},"
          f" max {metrics['ssim_max']:.4f}) | PSNR {metrics['psnr_mean']:.2f} dB | codebook usage "
          f"{metrics['codebook_usage']:.3f} (perplexity {metrics['perplexity']:.1f} of {model.config.num_embeddings})")
    if args.metrics_json:
        utils.atomic_write(args.metrics_json, lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))

    figures = Path(args.resources_dir) / Path(args.model).stem
    shown = torch.linspace(0, len(slices) - 1, min(args.examples, len(slices))).long()
    save_reconstructions(figures / f"{split}_reconstructions.png", model, slices.as_float(shown).to(device),
                         f"{split} slices: input | code map | reconstruction")
    utils.save_histogram(figures / f"{split}_ssim_histogram.png", ssim.numpy(),
                         f"per-slice SSIM on the {split} split (mean {metrics['ssim_mean']:.3f})", "SSIM")
    utils.save_code_usage_figure(figures / f"{split}_code_usage.png", results["code_counts"],
                                 f"code use on the {split} split: {metrics['codebook_usage']:.0%} of "
                                 f"{model.config.num_embeddings} codes used")
    print(f"figures in {figures}/")
    return metrics


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
