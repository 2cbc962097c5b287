"""Bits per pixel against quality: VQ-VAE checkpoints beside JPEG on the same slices.

    python benchmarks/rate_distortion.py -m checkpoints/a.pth -m checkpoints/b.pth [--prior checkpoints/a-prior.pth]

Each VQ-VAE's rate is its code indices at log2 K bits each, per pixel; with a prior (of one of the -m models) also
the prior's measured NLL per pixel: the rate an entropy coder driven by the prior would reach. Quality is the mean
SSIM and PSNR over the test split (validation when there is none), of the slices as the model sees them (its own
preprocessing). JPEG (Pillow, standard Huffman tables, grayscale) encodes the very same uint8 slices at a range of
qualities; its rate counts only the entropy-coded scan data, not the fixed header (quantisation and Huffman tables,
markers), which a decoder for one fixed setting would know already. One figure, SSIM against bits per pixel, one
curve per codec, goes to --out.

Last line per model: model=<name> bpp=<x> ssim=<x> jpeg_ssim_at_same_bpp=<x>
"""
from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import checkpoints  # noqa: E402
import figures  # noqa: E402
import metrics  # noqa: E402
import utils  # noqa: E402
from checkpoints import checkpoint_data  # noqa: E402
from codes import encode_split, prior_evaluation_loaders  # noqa: E402
from dataset import BatchLoader, load_split  # noqa: E402
from modules import weights_fingerprint  # noqa: E402
from readers import Preprocessing  # noqa: E402
from sampling import stack_levels  # noqa: E402

JPEG_QUALITIES = (1, 2, 3, 5, 8, 10, 15, 20, 30, 40, 50, 60, 75, 90)


def scan_bytes(jpeg: bytes) -> int:
    """Bytes of a baseline JPEG's entropy-coded scan: everything between the start-of-scan header and the
    end-of-image marker."""
    position = 2  # after SOI
    while position < len(jpeg):
        if jpeg[position] != 0xFF:
            raise ValueError("not a JPEG marker")
        marker = jpeg[position + 1]
        length = int.from_bytes(jpeg[position + 2:position + 4], "big")
        if marker == 0xDA:  # start of scan: its header, then the entropy-coded data up to EOI
            end = len(jpeg) - 2 if jpeg[-2:] == b"\xff\xd9" else len(jpeg)
            return end - (position + 2 + length)
        position += 2 + length
    raise ValueError("no scan in this JPEG")


def jpeg_round_trip(image: np.ndarray, quality: int) -> tuple[np.ndarray, int]:
    """(decoded uint8 image, scan bytes) of one grayscale image [H, W] at one quality."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="JPEG", quality=quality, optimize=False)
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as decoded:
        return np.asarray(decoded.convert("L")), scan_bytes(data)


def jpeg_curve(images: torch.Tensor) -> list[dict]:
    """SSIM, PSNR and bits per pixel of JPEG on uint8 slices [N, 1, H, W] at each quality."""
    references = images.float() / 255
    pixels = images[0].numel() * len(images)
    codec = f"JPEG ({images.shape[-2]}x{images.shape[-1]})"
    curve = []
    for quality in JPEG_QUALITIES:
        decoded, bits = [], 0
        for image in images[:, 0].numpy():
            picture, size = jpeg_round_trip(image, quality)
            decoded.append(picture)
            bits += 8 * size
        decoded = torch.from_numpy(np.stack(decoded))[:, None].float() / 255
        curve.append({"codec": codec, "quality": quality, "bpp": bits / pixels,
                      "ssim": metrics.ssim_per_image(decoded, references).mean().item(),
                      "psnr": metrics.psnr_per_image(decoded, references).mean().item()})
    return curve


def at_rate(curve: list[dict], bpp: float) -> float:
    """JPEG's SSIM at a rate, interpolated linearly between its measured qualities (nan outside them)."""
    points = sorted((point["bpp"], point["ssim"]) for point in curve)
    rates, ssims = zip(*points)
    return float(np.interp(bpp, rates, ssims, left=math.nan, right=math.nan))


def evaluate_model(path: str, priors: list[tuple[str, dict]], split: str, device: torch.device, cache_dir: str,
                   ) -> tuple[list[dict], torch.Tensor]:
    """The model's points (indices, and with a matching prior its NLL) and the uint8 slices it was measured on."""
    model, checkpoint = checkpoints.load_vqvae(path, device)
    prep = Preprocessing.from_dict(checkpoint["preprocessing"])
    if prep.channels != 1:
        raise utils.UsageError(f"{path}: this comparison is for grayscale slices; the model takes {prep.channels}")
    source = checkpoint_data(checkpoint)
    split = split if split in source.files else "validate"
    slices = load_split(source, split, prep, cache_dir, min_side=model.config.image_multiple)
    loader = BatchLoader(slices.images, slices.labels, 64, shuffle=False, device=device)
    quality = metrics.evaluate_vqvae(model, loader, description=split)
    pixels = prep.image_size[0] * prep.image_size[1]
    levels = encode_split(model, slices, device, cache_dir)
    positions = sum(level.shape[1] * level.shape[2] for level in levels)  # codes per image, over all levels
    name = Path(path).stem
    points = [{"codec": name, "bpp": positions * math.log2(model.config.num_embeddings) / pixels,
               "ssim": quality["ssim"], "psnr": quality["psnr"], "split": split, "images": len(slices)}]
    for prior_path, prior_checkpoint in priors:
        if prior_checkpoint["vqvae"]["fingerprint"] != weights_fingerprint(model):
            continue
        prior, prior_checkpoint, _, _ = checkpoints.load_prior(prior_path, device, path, prior_checkpoint)
        conditional = prior_checkpoint["conditional"]
        labelled, unlabelled = prior_evaluation_loaders(stack_levels(levels), slices.labels, 64, device, conditional)
        counts = prior_checkpoint.get("class_counts") or [1] * len(prior_checkpoint["class_names"])
        log_prior = metrics.class_log_prior(counts) if conditional else None
        nll = metrics.evaluate_prior(prior, labelled, log_prior, unlabelled)
        # A conditional prior's class must be sent too, -log2 p(class) bits (maps without one: in the mixture).
        class_bits = sum(-log_prior[label] / math.log(2) for label in slices.labels.tolist() if label >= 0) \
            / len(slices) if conditional else 0.0
        points.append({**points[0], "codec": f"{name} + prior", "bpp": (nll["bits_per_image"] + class_bits) / pixels})
    return points, slices.images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", action="append", required=True, help="VQ-VAE checkpoint (repeatable)")
    parser.add_argument("--prior", action="append", default=[], help="prior checkpoint of one of the models")
    parser.add_argument("--split", default="test", help="test, or validate (test falls back to validate)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache/slices"))
    parser.add_argument("--out", default="resources/rate_distortion.png", help="the figure")
    args = parser.parse_args()
    device = utils.pick_device(args.device)
    priors = [(path, checkpoints.load_checkpoint(path, expected_kind="prior")) for path in args.prior]
    points, curves = [], {}
    for path in args.model:
        model_points, images = evaluate_model(path, priors, args.split, device, args.cache_dir)
        key = (tuple(images.shape), int(images[:, :, ::7, ::7].sum()))  # JPEG once per distinct set of slices
        if key not in curves:
            curves[key] = jpeg_curve(images)
        for point in model_points:
            point["jpeg_ssim_at_same_bpp"] = at_rate(curves[key], point["bpp"])
        points += model_points
    jpeg_points = [point for curve in curves.values() for point in curve]
    print(f"{'codec':>30} {'bpp':>7} {'SSIM':>7} {'PSNR':>6}  JPEG SSIM at the same rate")
    for point in jpeg_points + points:
        same = point.get("jpeg_ssim_at_same_bpp")
        print(f"{point['codec']:>30} {point['bpp']:7.3f} {point['ssim']:7.4f} {point['psnr']:6.2f}  "
              + ("" if same is None else f"{same:.4f}"))
    figures.save_rate_distortion(Path(args.out), jpeg_points + points)
    print(f"figure: {args.out}")
    for point in points:
        print(f"model={point['codec'].replace(' ', '')} bpp={point['bpp']:.4f} ssim={point['ssim']:.4f} "
              f"jpeg_ssim_at_same_bpp={point['jpeg_ssim_at_same_bpp']:.4f}")


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
