"""Train a VQ-VAE on 2D MRI slices, or a PixelCNN prior over a trained VQ-VAE's codes.

    python train.py                         # built-in demo phantoms, CPU-friendly
    python train.py --data /path/to/keras_slices_data --epochs 30
    python train.py --prior -m checkpoints/<vqvae>.pth   # then sample with predict.py -m <prior> --sample 16
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import utils
from utils import progress_bar
from dataset import BatchLoader, DataSource, Preprocessing, SliceSet, find_data, load_split, make_demo_data, \
    native_image_size, save_npy
from modules import VQVAE, GatedPixelCNN, PriorConfig, VQVAEConfig
from utils import UsageError

DEFAULT_DEMO_DIR = "data/demo"
RECONSTRUCTION_EXAMPLES = 6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = VQVAEConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="data folder (HipMRI, OASIS or train/val/test layout); none = built-in demo")
    data.add_argument("--demo-dir", default=DEFAULT_DEMO_DIR, help="where the demo data is generated")
    data.add_argument("--image-size", type=int, nargs="+", metavar="N",
                      help="H W, or one N for N x N; default: the most common slice shape in the training split")
    data.add_argument("--channels", type=int, choices=(1, 3), default=1, help="1 = grayscale, 3 = RGB")
    data.add_argument("--resize", choices=("fit", "crop"), default="fit",
                      help="keep the aspect ratio: fit inside and pad, or cover and centre-crop")
    data.add_argument("--slice-axis", type=int, default=2, help="axis along which 3D NIfTI volumes are sliced")
    data.add_argument("--val-fraction", type=float, default=0.1, help="held out of train when there is no val split")
    data.add_argument("--cache-dir", default=".cache/slices", help="where decoded slices are cached")
    model = parser.add_argument_group("model")
    model.add_argument("--hidden-channels", type=int, default=defaults.hidden_channels)
    model.add_argument("--residual-channels", type=int, default=defaults.residual_channels)
    model.add_argument("--residual-layers", type=int, default=defaults.num_residual_layers)
    model.add_argument("--downsamples", type=int, default=defaults.downsamples,
                       help="each halves height and width (2 = 4x smaller code map per side)")
    model.add_argument("--num-embeddings", type=int, default=defaults.num_embeddings, help="codebook size K")
    model.add_argument("--embedding-dim", type=int, default=defaults.embedding_dim, help="code vector length D")
    model.add_argument("--beta", type=float, default=defaults.beta, help="commitment loss weight")
    model.add_argument("--quantizer", choices=("ema", "gradient"), default=defaults.quantizer,
                       help="codebook updated by moving averages, or trained by its gradient")
    model.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    model.add_argument("--dead-code-threshold", type=float, default=defaults.dead_code_threshold,
                       help="re-seed codes used less than this per step (moving average); 0 = never")
    model.add_argument("--kmeans-init", action="store_true", help="initialise the codebook by k-means on encoder "
                       "outputs of the first batches")
    model.add_argument("--normalization", choices=("none", "group"), default=defaults.normalization)
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=10)
    training.add_argument("--batch-size", type=int, default=32)
    training.add_argument("--lr", type=float, default=1e-3, help="peak Adam learning rate")
    training.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                          help="cosine decays over the run (over --time-limit too, when that comes first)")
    training.add_argument("--warmup-steps", type=int, default=100)
    training.add_argument("--ssim-weight", type=float, default=0.0, help="weight of (1 - SSIM) added to the MSE")
    training.add_argument("--time-limit", type=float, metavar="SECONDS",
                          help="stop after the step that crosses this many seconds of training, keeping the best")
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    prior = parser.add_argument_group("prior (with --prior)")
    prior.add_argument("--prior", action="store_true", help="train a PixelCNN prior on the codes of -m VQVAE")
    prior.add_argument("-m", "--model", help="the VQ-VAE checkpoint whose codes the prior learns")
    prior.add_argument("--prior-hidden-channels", type=int, default=PriorConfig.hidden_channels)
    prior.add_argument("--prior-layers", type=int, default=PriorConfig.num_layers)
    prior.add_argument("--prior-kernel-size", type=int, default=PriorConfig.kernel_size)
    prior.add_argument("--unconditional", action="store_true",
                       help="ignore class folders (by default the prior is conditioned on the class when there is one)")
    output = parser.add_argument_group("output")
    output.add_argument("--run-name", help="names the checkpoint and figures; default: data-HxW-timestamp")
    output.add_argument("--checkpoint-dir", default="checkpoints")
    output.add_argument("--resources-dir", default="resources")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> VQVAEConfig:
    return VQVAEConfig(in_channels=args.channels, hidden_channels=args.hidden_channels,
                       residual_channels=args.residual_channels, num_residual_layers=args.residual_layers,
                       downsamples=args.downsamples, num_embeddings=args.num_embeddings,
                       embedding_dim=args.embedding_dim, beta=args.beta, quantizer=args.quantizer,
                       ema_decay=args.ema_decay, dead_code_threshold=args.dead_code_threshold,
                       normalization=args.normalization)


def check_image_size(size: tuple[int, int], scale: int) -> None:
    if any(side % scale or side < max(scale, 8) for side in size):
        raise UsageError(f"--image-size {size[0]} {size[1]}: each side must be a multiple of {scale} "
                         f"(2**downsamples) and at least {max(scale, 8)}")



def prepare_data(args: argparse.Namespace, scale: int) -> tuple[DataSource, Preprocessing, SliceSet, SliceSet]:
    if args.data is None:
        data_dir = make_demo_data(args.demo_dir)
        print(f"no --data given: training on the built-in DEMO data (synthetic phantoms, not real MRI) in {data_dir}."
              "\n  For real scans: python train.py --data /path/to/keras_slices_data (HipMRI) "
              "or /path/to/keras_png_slices_data (OASIS)")
    else:
        data_dir = args.data
    source = find_data(data_dir, args.val_fraction)
    for note in source.notes:
        print(note)
    if args.image_size is None:
        image_size = native_image_size(source.files["train"], scale, args.slice_axis)
        print(f"image size {image_size[0]}x{image_size[1]} (the most common slice shape, padded to a multiple of "
              f"{scale}); set --image-size to change it")
    else:
        image_size = tuple(args.image_size * 2 if len(args.image_size) == 1 else args.image_size)
        if len(image_size) != 2:
            raise UsageError("--image-size takes one number (square) or two (H W)")
    check_image_size(image_size, scale)
    prep = Preprocessing(image_size=image_size, channels=args.channels, resize=args.resize,
                         slice_axis=args.slice_axis)
    train_set = load_split(source, "train", prep, args.cache_dir, min_side=scale)
    val_set = load_split(source, "validate", prep, args.cache_dir, min_side=scale)
    print(f"train: {len(train_set)} slices, validation: {len(val_set)} slices, {image_size[0]}x{image_size[1]}")
    return source, prep, train_set, val_set


class TrainingClock:
    """Wall-clock budget and learning-rate schedule, both measured as progress through the run in [0, 1]."""

    def __init__(self, args: argparse.Namespace, total_steps: int):
        self.args, self.total_steps, self.step = args, total_steps, 0
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def out_of_time(self) -> bool:
        return self.args.time_limit is not None and self.elapsed >= self.args.time_limit

    def progress(self) -> float:
        by_steps = self.step / max(1, self.total_steps)
        by_time = self.elapsed / self.args.time_limit if self.args.time_limit else 0.0
        return min(1.0, max(by_steps, by_time))

    def learning_rate(self) -> float:
        warmup = min(1.0, (self.step + 1) / max(1, self.args.warmup_steps))
        if self.args.lr_schedule == "constant":
            return self.args.lr * warmup
        return self.args.lr * warmup * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * self.progress())))


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor, ssim_weight: float) -> torch.Tensor:
    loss = F.mse_loss(reconstruction.float(), images)
    if ssim_weight > 0:
        loss = loss + ssim_weight * (1 - utils.ssim_per_image(reconstruction, images).mean())
    return loss


def train(epoch: int, loader: BatchLoader, model: VQVAE, optimizer: torch.optim.Optimizer, clock: TrainingClock,
          args: argparse.Namespace) -> dict:
    """One epoch (or less, if the time limit is crossed). Metrics stay on the device until the end."""
    model.train()
    loader.set_epoch(epoch)
    device = loader.device
    num_codes = model.config.num_embeddings
    sums = torch.zeros(2, device=device)  # reconstruction loss, vq loss
    code_counts = torch.zeros(num_codes, device=device)
    steps = 0
    progress = progress_bar(loader, desc=f"epoch {epoch}", unit="batch")
    for images, _ in progress:
        for group in optimizer.param_groups:
            group["lr"] = clock.learning_rate()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            reconstruction, indices, vq_loss = model(images)
        recon_loss = reconstruction_loss(reconstruction, images, args.ssim_weight)
        optimizer.zero_grad(set_to_none=True)
        (recon_loss + vq_loss).backward()
        optimizer.step()
        clock.step += 1
        steps += 1
        sums += torch.stack([recon_loss.detach(), vq_loss.detach()])
        code_counts += torch.bincount(indices.flatten(), minlength=num_codes)
        if steps % 25 == 0:
            recon, vq = (sums / steps).tolist()
            progress.set_postfix(recon=f"{recon:.4f}", vq=f"{vq:.4f}")
        if clock.out_of_time:
            break
    progress.close()
    recon, vq = (sums / max(1, steps)).tolist()
    return {"train_recon_loss": recon, "train_vq_loss": vq, "train_perplexity": utils.perplexity(code_counts),
            "train_codebook_usage": utils.codebook_usage(code_counts), "steps": steps}


@torch.no_grad()
def evaluate(model: VQVAE, loader: BatchLoader, description: str = "validate") -> dict:
    """Loss, per-image SSIM and PSNR, and code use over a whole split."""
    model.eval()
    device = loader.device
    losses, ssims, psnrs = [], [], []
    code_counts = torch.zeros(model.config.num_embeddings, device=device)
    for images, _ in progress_bar(loader, desc=description, unit="batch"):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            reconstruction, indices, vq_loss = model(images)
        reconstruction = reconstruction.float().clamp(0, 1)
        losses.append(F.mse_loss(reconstruction, images, reduction="none").mean(dim=(1, 2, 3)) + vq_loss)
        ssims.append(utils.ssim_per_image(reconstruction, images))
        psnrs.append(utils.psnr_per_image(reconstruction, images))
        code_counts += torch.bincount(indices.flatten(), minlength=model.config.num_embeddings)
    ssim = torch.cat(ssims)
    return {"loss": torch.cat(losses).mean().item(), "ssim": ssim.mean().item(), "ssim_per_image": ssim.cpu(),
            "psnr": torch.cat(psnrs).mean().item(), "perplexity": utils.perplexity(code_counts),
            "codebook_usage": utils.codebook_usage(code_counts), "code_counts": code_counts.cpu()}


@torch.no_grad()
def kmeans_initialise(model: VQVAE, loader: BatchLoader, batches: int = 8) -> None:
    model.eval()
    latents = []
    for index, (images, _) in enumerate(loader):
        if index == batches:
            break
        latents.append(model.encode(images).permute(0, 2, 3, 1).reshape(-1, model.config.embedding_dim))
    vectors = torch.cat(latents)
    if len(vectors) < model.config.num_embeddings:
        raise UsageError(f"--kmeans-init needs at least {model.config.num_embeddings} encoder outputs; "
                         f"the first {batches} batches give {len(vectors)}")
    model.quantizer.kmeans_init(vectors)


def save_reconstructions(path: Path, model: VQVAE, images: torch.Tensor, title: str) -> None:
    model.eval()
    with torch.no_grad():
        reconstruction, indices, _ = model(images)
    utils.save_image_rows(path, {"input": images, "codes": indices, "reconstruction": reconstruction},
                          title=title, code_columns=("codes",), num_codes=model.config.num_embeddings)


def save_curves(path: Path, metrics_csv: Path) -> None:
    utils.save_training_curves(path, utils.read_csv_rows(metrics_csv), {
        "loss": ("train_recon_loss", "train_vq_loss", "val_loss"),
        "validation SSIM": ("val_ssim",),
        "codebook perplexity": ("train_perplexity", "val_perplexity"),
        "codebook usage": ("train_codebook_usage", "val_codebook_usage"),
    })


def format_epoch(epoch: int, row: dict) -> str:
    return (f"epoch {epoch:3d} | train recon {row['train_recon_loss']:.5f} vq {row['train_vq_loss']:.5f} | "
            f"val loss {row['val_loss']:.5f} ssim {row['val_ssim']:.4f} psnr {row['val_psnr']:.2f} | "
            f"perplexity {row['val_perplexity']:.1f} usage {row['val_codebook_usage']:.3f} | {row['seconds']:.0f}s")


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


def vqvae_fingerprint(model: VQVAE) -> str:
    """Identifies a VQ-VAE's weights, so a prior can tell whether the codes it learned still mean the same."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def encode_split(model: VQVAE, slices: SliceSet, device: torch.device, cache_dir: str | Path,
                 batch_size: int = 128) -> torch.Tensor:
    """Code maps [N, h, w] of a split, computed once per (data, VQ-VAE) and cached on disk."""
    path = Path(cache_dir) / f"codes-{slices.name}-{slices.cache_key}-{vqvae_fingerprint(model)}.npy"
    if path.exists():
        return torch.from_numpy(np.load(path)).long()
    model.eval()
    loader = BatchLoader(slices.images, slices.labels, batch_size, shuffle=False, device=device)
    codes = torch.cat([model.code_map(images).cpu()
                       for images, _ in progress_bar(loader, desc=f"encoding {slices.name}", unit="batch")])
    save_npy(path, codes.numpy().astype(np.int16 if model.config.num_embeddings <= 32767 else np.int32))
    return codes


def to_codes(stored: torch.Tensor) -> torch.Tensor:
    return stored.long()


def bits_per_code(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in bits, one value per code map."""
    return F.cross_entropy(logits.float(), codes, reduction="none").mean(dim=(1, 2)) / math.log(2)


def train_prior_epoch(epoch: int, loader: BatchLoader, prior: GatedPixelCNN, optimizer: torch.optim.Optimizer,
                      clock: TrainingClock, conditional: bool) -> float:
    prior.train()
    loader.set_epoch(epoch)
    total, steps = torch.zeros((), device=loader.device), 0
    progress = progress_bar(loader, desc=f"prior epoch {epoch}", unit="batch")
    for codes, labels in progress:
        for group in optimizer.param_groups:
            group["lr"] = clock.learning_rate()
        with torch.autocast(loader.device.type, dtype=torch.bfloat16, enabled=loader.device.type == "cuda"):
            logits = prior(codes, labels if conditional else None)
        loss = bits_per_code(logits, codes).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clock.step += 1
        steps += 1
        total += loss.detach()
        if steps % 25 == 0:
            progress.set_postfix(bits=f"{(total / steps).item():.3f}")
        if clock.out_of_time:
            break
    progress.close()
    return (total / max(1, steps)).item()


@torch.no_grad()
def evaluate_prior(prior: GatedPixelCNN, loader: BatchLoader, conditional: bool) -> float:
    """Mean negative log-likelihood of a split's code maps, in bits per code."""
    prior.eval()
    values = []
    for codes, labels in progress_bar(loader, desc="prior NLL", unit="batch"):
        with torch.autocast(loader.device.type, dtype=torch.bfloat16, enabled=loader.device.type == "cuda"):
            logits = prior(codes, labels if conditional else None)
        values.append(bits_per_code(logits, codes))
    return torch.cat(values).mean().item()


def code_loader(codes: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool, device: torch.device,
                seed: int = 0) -> BatchLoader:
    return BatchLoader(codes.short() if codes.max() <= 32767 else codes, labels, batch_size, shuffle, device, seed,
                       drop_last=shuffle and len(codes) > batch_size, convert=to_codes)


def main_prior(args: argparse.Namespace) -> dict:
    if not args.model:
        raise UsageError("--prior needs -m VQVAE_CHECKPOINT: the VQ-VAE whose codes the prior learns")
    device = utils.pick_device(args.device)
    vqvae, vqvae_checkpoint = load_vqvae(args.model, device)
    prep = Preprocessing.from_dict(vqvae_checkpoint["preprocessing"])
    source = find_data(resolve_data_dir(args.data, vqvae_checkpoint), args.val_fraction)
    splits = {split: load_split(source, split, prep, args.cache_dir, min_side=vqvae.config.scale)
              for split in ("train", "validate")}
    codes = {split: encode_split(vqvae, slices, device, args.cache_dir) for split, slices in splits.items()}
    conditional = not args.unconditional and bool(source.class_names) and bool((splits["train"].labels >= 0).all())
    config = PriorConfig(num_embeddings=vqvae.config.num_embeddings, hidden_channels=args.prior_hidden_channels,
                         num_layers=args.prior_layers, kernel_size=args.prior_kernel_size,
                         num_classes=len(source.class_names) if conditional else 0)
    prior = GatedPixelCNN(config).to(device)
    optimizer = torch.optim.Adam(prior.parameters(), lr=args.lr)
    train_loader = code_loader(codes["train"], splits["train"].labels, args.batch_size, True, device, args.seed)
    val_loader = code_loader(codes["validate"], splits["validate"].labels, args.batch_size * 2, False, device)
    run_name = args.run_name or f"{Path(args.model).stem}-prior"
    checkpoint_path = Path(args.checkpoint_dir) / f"{run_name}.pth"
    figures_dir = Path(args.resources_dir) / run_name
    metrics_csv = figures_dir / "metrics.csv"
    metrics_csv.unlink(missing_ok=True)
    uniform = math.log2(config.num_embeddings)
    print(f"prior: {sum(p.numel() for p in prior.parameters()) / 1e6:.2f}M parameters over "
          f"{tuple(codes['train'].shape[1:])} code maps, "
          f"{'conditioned on ' + str(len(source.class_names)) + ' classes' if conditional else 'unconditional'}; "
          f"uniform guessing costs {uniform:.2f} bits per code")
    clock = TrainingClock(args, total_steps=args.epochs * len(train_loader))
    best = {"val_bits_per_code": math.inf}
    for epoch in range(1, args.epochs + 1):
        train_bits = train_prior_epoch(epoch, train_loader, prior, optimizer, clock, conditional)
        row = {"epoch": epoch, "train_bits_per_code": train_bits,
               "val_bits_per_code": evaluate_prior(prior, val_loader, conditional), "seconds": clock.elapsed}
        utils.append_csv_row(metrics_csv, row)
        tqdm.write(f"prior epoch {epoch:3d} | train {train_bits:.3f} bits/code | validation "
                   f"{row['val_bits_per_code']:.3f} bits/code ({row['val_bits_per_code'] / uniform:.0%} of uniform)"
                   f" | {row['seconds']:.0f}s")
        if row["val_bits_per_code"] < best["val_bits_per_code"]:
            best = row
            utils.save_checkpoint(checkpoint_path, {
                "kind": "prior", "config": config.to_dict(), "model": prior.state_dict(),
                "optimizer": optimizer.state_dict(), "epoch": epoch, "metrics": row, "conditional": conditional,
                "class_names": source.class_names, "code_shape": list(codes["train"].shape[1:]),
                "vqvae": {"path": str(Path(args.model).resolve()), "fingerprint": vqvae_fingerprint(vqvae)},
                "args": vars(args)})
        if clock.out_of_time:
            print(f"time limit of {args.time_limit:g}s reached during epoch {epoch}: stopping")
            break
    utils.save_training_curves(figures_dir / "curves.png", utils.read_csv_rows(metrics_csv),
                               {"prior NLL (bits per code)": ("train_bits_per_code", "val_bits_per_code")})
    print(f"best validation NLL {best['val_bits_per_code']:.3f} bits per code (epoch {best['epoch']}); "
          f"checkpoint {checkpoint_path}")
    print(f"next: python predict.py -m {checkpoint_path} --sample 16")
    return {"checkpoint": str(checkpoint_path), "best": best, "figures": str(figures_dir)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    utils.seed_everything(args.seed)
    if args.prior:
        return main_prior(args)
    device = utils.pick_device(args.device)
    config = build_config(args)
    source, prep, train_set, val_set = prepare_data(args, config.scale)
    run_name = args.run_name or (f"{'demo' if args.data is None else Path(source.root).name}-"
                                 f"{prep.image_size[0]}x{prep.image_size[1]}-{time.strftime('%Y%m%d-%H%M%S')}")
    checkpoint_path = Path(args.checkpoint_dir) / f"{run_name}.pth"
    figures_dir = Path(args.resources_dir) / run_name
    metrics_csv = figures_dir / "metrics.csv"
    metrics_csv.unlink(missing_ok=True)

    model = VQVAE(config).to(device, memory_format=torch.channels_last)  # faster convolutions, CPU and GPU
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    train_loader = BatchLoader(train_set.images, train_set.labels, args.batch_size, shuffle=True, device=device,
                               seed=args.seed, drop_last=len(train_set) > args.batch_size)
    val_loader = BatchLoader(val_set.images, val_set.labels, args.batch_size * 2, shuffle=False, device=device)
    examples = val_set.as_float(slice(0, RECONSTRUCTION_EXAMPLES)).to(device)
    if args.kmeans_init:
        kmeans_initialise(model, train_loader)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, codes "
          f"{prep.image_size[0] // config.scale}x{prep.image_size[1] // config.scale} from K={config.num_embeddings}"
          f", device {device}; run {run_name}")

    clock = TrainingClock(args, total_steps=args.epochs * len(train_loader))
    best_ssim, best_row = -1.0, {}
    for epoch in range(1, args.epochs + 1):
        train_metrics = train(epoch, train_loader, model, optimizer, clock, args)
        val = evaluate(model, val_loader)
        row = {"epoch": epoch, **{k: v for k, v in train_metrics.items() if k != "steps"},
               **{f"val_{k}": val[k] for k in ("loss", "ssim", "psnr", "perplexity", "codebook_usage")},
               "lr": clock.learning_rate(), "seconds": clock.elapsed}
        utils.append_csv_row(metrics_csv, row)
        tqdm.write(format_epoch(epoch, row))
        checkpoint = {"kind": "vqvae", "config": config.to_dict(), "preprocessing": prep.to_dict(),
                      "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                      "step": clock.step, "metrics": row, "best_val_ssim": max(best_ssim, row["val_ssim"]),
                      "data": {"root": str(source.root), "class_names": source.class_names,
                               "demo": args.data is None}, "args": vars(args)}
        if row["val_ssim"] > best_ssim:
            best_ssim, best_row = row["val_ssim"], row
            utils.save_checkpoint(checkpoint_path, checkpoint)
        save_reconstructions(figures_dir / f"reconstructions_epoch_{epoch:03d}.png", model, examples,
                             f"{run_name}, epoch {epoch}: validation SSIM {row['val_ssim']:.3f}")
        if clock.out_of_time:
            print(f"time limit of {args.time_limit:g}s reached during epoch {epoch}: stopping")
            break
    save_curves(figures_dir / "curves.png", metrics_csv)
    print(f"best validation SSIM {best_ssim:.4f} (epoch {best_row['epoch']}); checkpoint {checkpoint_path}; "
          f"figures in {figures_dir}/")
    print(f"next: python predict.py -m {checkpoint_path}")
    return {"checkpoint": str(checkpoint_path), "best": best_row, "figures": str(figures_dir)}


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
