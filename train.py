"""Train a VQ-VAE on 2D MRI slices, or a PixelCNN prior over a trained VQ-VAE's codes.

    python train.py                         # built-in demo phantoms, CPU-friendly
    python train.py --data /path/to/keras_slices_data --epochs 30
    python train.py --prior -m checkpoints/<vqvae>.pth   # then sample with predict.py -m <prior> --sample 16
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import utils
from utils import progress_bar
from dataset import BatchLoader, DataSource, Preprocessing, SliceSet, find_data, load_split, make_demo_data, \
    native_image_size, save_npy
from modules import VQVAE, GatedPixelCNN, PriorConfig, VQVAEConfig, count_codes
from utils import UsageError

DEFAULT_DEMO_DIR = "data/demo"
RECONSTRUCTION_EXAMPLES = 6
STOP_CHECK_EVERY = 10  # steps between distributed time-limit checks


def build_parser() -> argparse.ArgumentParser:
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
    model.add_argument("--hidden-channels", type=int, default=defaults.hidden_channels,
                       help="channels of the encoder/decoder at the code resolution")
    model.add_argument("--residual-channels", type=int, default=defaults.residual_channels,
                       help="bottleneck channels inside each residual layer")
    model.add_argument("--residual-layers", type=int, default=defaults.num_residual_layers,
                       help="residual layers in the encoder and in the decoder")
    model.add_argument("--downsamples", type=int, default=defaults.downsamples,
                       help="each halves height and width (2 = 4x smaller code map per side)")
    model.add_argument("--num-embeddings", type=int, default=defaults.num_embeddings, help="codebook size K")
    model.add_argument("--embedding-dim", type=int, default=defaults.embedding_dim, help="code vector length D")
    model.add_argument("--beta", type=float, default=defaults.beta, help="commitment loss weight")
    model.add_argument("--quantizer", choices=("ema", "gradient"), default=defaults.quantizer,
                       help="codebook updated by moving averages, or trained by its gradient")
    model.add_argument("--ema-decay", type=float, default=defaults.ema_decay,
                       help="moving-average decay of the EMA codebook")
    model.add_argument("--dead-code-threshold", type=float, default=defaults.dead_code_threshold,
                       help="re-seed codes used less than this per step (moving average); 0 = never")
    model.add_argument("--kmeans-init", action="store_true", help="initialise the codebook by k-means on encoder "
                       "outputs of the first batches")
    model.add_argument("--normalization", choices=("none", "group"), default=defaults.normalization,
                       help="GroupNorm in the convolutional blocks, or none")
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=10, help="passes over the training split")
    training.add_argument("--batch-size", type=int, default=16, help="slices per optimisation step")
    training.add_argument("--lr", type=float, default=1e-3, help="peak Adam learning rate")
    training.add_argument("--lr-schedule", choices=("cosine", "constant"), default="constant",
                          help="cosine decays over the run (over --time-limit too, when that comes first)")
    training.add_argument("--warmup-steps", type=int, default=100, help="linear learning-rate warm-up")
    training.add_argument("--ssim-weight", type=float, default=0.2, help="weight of (1 - SSIM) added to the MSE")
    training.add_argument("--time-limit", type=float, metavar="SECONDS",
                          help="stop after the step that crosses this many seconds of training, keeping the best")
    training.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in all; 0 = no limit")
    training.add_argument("--compile", action="store_true", help="torch.compile the model (faster on GPUs after "
                          "a minute of compiling)")
    training.add_argument("--precision", choices=utils.PRECISIONS, default="auto",
                          help="bf16 autocast (the quantizer stays float32) or fp32; auto = bf16 on GPUs with native "
                          "bfloat16 (compute capability 8.0+), fp32 on older GPUs and CPUs")
    training.add_argument("--seed", type=int, default=0, help="seeds weights, shuffling and codebook restarts")
    training.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    prior = parser.add_argument_group("prior (with --prior)")
    prior.add_argument("--prior", action="store_true", help="train a PixelCNN prior on the codes of -m VQVAE")
    prior.add_argument("-m", "--model", help="the VQ-VAE checkpoint whose codes the prior learns")
    prior.add_argument("--prior-hidden-channels", type=int, default=PriorConfig.hidden_channels,
                       help="channels of the PixelCNN")
    prior.add_argument("--prior-layers", type=int, default=PriorConfig.num_layers, help="gated layers")
    prior.add_argument("--prior-kernel-size", type=int, default=PriorConfig.kernel_size,
                       help="odd kernel width of the gated layers")
    prior.add_argument("--unconditional", action="store_true",
                       help="ignore class folders (by default the prior is conditioned on the class when there is one)")
    output = parser.add_argument_group("output")
    output.add_argument("--run-name", help="names the checkpoint and figures; default: data-HxW-timestamp")
    output.add_argument("--checkpoint-dir", default="checkpoints", help="where <run-name>.pth is written")
    output.add_argument("--resources-dir", default="resources", help="figures and metrics go to <dir>/<run-name>/")
    output.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                        help="also write the -last checkpoint every this many steps (it is always written each epoch)")
    output.add_argument("--resume", metavar="CHECKPOINT", help="continue a run exactly from its -last (or best) "
                        "checkpoint; --epochs, --time-limit, --max-steps, --device, --compile, --precision "
                        "may be changed")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


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


def prepare_data(args: argparse.Namespace, scale: int, log: Callable[[str], None] = print,
                 ) -> tuple[DataSource, Preprocessing, SliceSet, SliceSet]:
    if args.data is None:
        data_dir = make_demo_data(args.demo_dir, log=log)
        log(f"no --data given: training on the built-in DEMO data (synthetic phantoms, not real MRI) in {data_dir}."
              "\n  For real scans: python train.py --data /path/to/keras_slices_data (HipMRI) "
              "or /path/to/keras_png_slices_data (OASIS)")
    else:
        data_dir = args.data
    source = find_data(data_dir, args.val_fraction)
    for note in source.notes:
        log(note)
    if args.image_size is None:
        image_size = native_image_size(source.files["train"], scale, args.slice_axis)
        log(f"image size {image_size[0]}x{image_size[1]} (the most common slice shape, padded to a multiple of "
              f"{scale}); set --image-size to change it")
    else:
        image_size = tuple(args.image_size * 2 if len(args.image_size) == 1 else args.image_size)
        if len(image_size) != 2:
            raise UsageError("--image-size takes one number (square) or two (H W)")
    check_image_size(image_size, scale)
    prep = Preprocessing(image_size=image_size, channels=args.channels, resize=args.resize,
                         slice_axis=args.slice_axis)
    train_set = load_split(source, "train", prep, args.cache_dir, min_side=scale, log=log)
    val_set = load_split(source, "validate", prep, args.cache_dir, min_side=scale, log=log)
    log(f"train: {len(train_set)} slices, validation: {len(val_set)} slices, {image_size[0]}x{image_size[1]}")
    return source, prep, train_set, val_set


class TrainingClock:
    """Wall-clock budget and learning-rate schedule, both measured as progress through the run in [0, 1].

    Time spent before a resume counts too (`already_elapsed`), so a resumed run continues the same schedule.
    """

    def __init__(self, args: argparse.Namespace, total_steps: int, step: int = 0, already_elapsed: float = 0.0,
                 device: torch.device | None = None):
        self.args, self.total_steps, self.step = args, total_steps, step
        self.device = device or torch.device("cpu")
        self.start = time.perf_counter() - already_elapsed

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def out_of_time(self) -> bool:
        return self.args.time_limit is not None and self.elapsed >= self.args.time_limit

    @property
    def out_of_steps(self) -> bool:
        return bool(self.args.max_steps) and self.step >= self.args.max_steps

    def progress(self) -> float:
        by_steps = self.step / max(1, self.total_steps)
        by_time = self.elapsed / self.args.time_limit if self.args.time_limit else 0.0
        return min(1.0, max(by_steps, by_time))

    def learning_rate(self) -> float:
        warmup = min(1.0, (self.step + 1) / max(1, self.args.warmup_steps))
        if self.args.lr_schedule == "constant":
            return self.args.lr * warmup
        return self.args.lr * warmup * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * self.progress())))

    def should_stop(self) -> bool:
        """Out of time or steps. Processes must agree on the time, and that costs a host sync (an all-reduce read
        back), so when distributed the clock is consulted only every STOP_CHECK_EVERY steps."""
        if self.args.time_limit is None or self.out_of_steps:
            return self.out_of_steps  # the same step count on every process
        if not utils.is_distributed():
            return self.out_of_time
        if self.step % STOP_CHECK_EVERY:
            return False
        flag = torch.tensor(float(self.out_of_time), device=self.device)  # NCCL reduces only GPU tensors
        return bool(utils.all_reduce_sum(flag).item() > 0)


@dataclass
class EpochTotals:
    """Running sums of one epoch, kept on the device (no host sync per step); saved in mid-epoch checkpoints."""

    losses: torch.Tensor  # summed reconstruction loss, summed vq loss
    code_counts: torch.Tensor
    batches: int = 0  # batches of this epoch already trained

    @classmethod
    def zeros(cls, num_codes: int, device: torch.device) -> "EpochTotals":
        return cls(torch.zeros(2, device=device), torch.zeros(num_codes, device=device))

    def to_dict(self) -> dict:
        return {"losses": self.losses.cpu(), "code_counts": self.code_counts.cpu(), "batches": self.batches}

    @classmethod
    def from_dict(cls, values: dict, device: torch.device) -> "EpochTotals":
        return cls(values["losses"].to(device), values["code_counts"].to(device), values["batches"])

    def metrics(self) -> dict:
        """Epoch metrics over all processes."""
        losses = utils.all_reduce_sum(self.losses.clone()) / (max(1, self.batches) * world_size())
        counts = utils.all_reduce_sum(self.code_counts.clone())
        recon, vq = losses.tolist()
        return {"train_recon_loss": recon, "train_vq_loss": vq, "train_perplexity": utils.perplexity(counts),
                "train_codebook_usage": utils.codebook_usage(counts)}


def world_size() -> int:
    return torch.distributed.get_world_size() if utils.is_distributed() else 1


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor, ssim_weight: float) -> torch.Tensor:
    loss = F.mse_loss(reconstruction.float(), images)
    if ssim_weight > 0:
        loss = loss + ssim_weight * (1 - utils.ssim_per_image(reconstruction, images).mean())
    return loss


def train(epoch: int, loader: BatchLoader, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          clock: TrainingClock, args: argparse.Namespace, totals: EpochTotals, precision: str = "fp32",
          on_checkpoint: Callable[[EpochTotals], None] | None = None) -> EpochTotals:
    """Train one epoch from batch `totals.batches` on; stops early after the step that runs out of time or steps."""
    model.train()
    loader.set_epoch(epoch)
    device = loader.device
    progress = progress_bar(loader.batches(start=totals.batches), desc=f"epoch {epoch}", unit="batch",
                            initial=totals.batches, total=len(loader))
    for images, _ in progress:
        for group in optimizer.param_groups:
            group["lr"] = clock.learning_rate()
        with utils.autocast(device, precision):
            reconstruction, indices, vq_loss = model(images)
        recon_loss = reconstruction_loss(reconstruction, images, args.ssim_weight)
        optimizer.zero_grad(set_to_none=True)
        (recon_loss + vq_loss).backward()
        optimizer.step()
        clock.step += 1
        totals.batches += 1
        totals.losses += torch.stack([recon_loss.detach(), vq_loss.detach().float()])
        totals.code_counts += count_codes(indices, len(totals.code_counts))
        if progress.disable is False and totals.batches % 25 == 0:  # reading the loss syncs: only for a visible bar
            recon, vq = (totals.losses / totals.batches).tolist()
            progress.set_postfix(recon=f"{recon:.4f}", vq=f"{vq:.4f}")
        if on_checkpoint is not None and args.checkpoint_every and clock.step % args.checkpoint_every == 0:
            on_checkpoint(totals)
        if clock.should_stop():
            break
    progress.close()
    return totals


@torch.no_grad()
def evaluate(model: VQVAE, loader: BatchLoader, description: str = "validate", ssim_weight: float = 0.0,
             precision: str = "fp32") -> dict:
    """Loss (the training objective), SSIM, PSNR and code use over a whole split, summed over all processes."""
    model.eval()
    device = loader.device
    sums = torch.zeros(4, device=device)  # loss, ssim, psnr, images
    ssims = []
    code_counts = torch.zeros(model.config.num_embeddings, device=device)
    for images, _ in progress_bar(loader, desc=description, unit="batch"):
        with utils.autocast(device, precision):
            reconstruction, indices, vq_loss = model(images)
        reconstruction = reconstruction.float().clamp(0, 1)
        ssim = utils.ssim_per_image(reconstruction, images)
        loss = F.mse_loss(reconstruction, images, reduction="none").mean(dim=(1, 2, 3)) + ssim_weight * (1 - ssim)
        loss = loss + vq_loss
        sums += torch.stack([loss.sum(), ssim.sum(), utils.psnr_per_image(reconstruction, images).sum(),
                             torch.tensor(float(len(images)), device=device)])
        ssims.append(ssim)
        code_counts += count_codes(indices, model.config.num_embeddings)
    utils.all_reduce_sum(sums)
    utils.all_reduce_sum(code_counts)
    loss, ssim_sum, psnr, count = sums.tolist()
    return {"loss": loss / count, "ssim": ssim_sum / count, "psnr": psnr / count,
            "ssim_per_image": torch.cat(ssims).cpu(), "perplexity": utils.perplexity(code_counts),
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
                         f"the first {len(latents)} batches give {len(vectors)}")
    model.quantizer.kmeans_init(vectors, batches=len(latents))


def save_reconstructions(path: Path, model: VQVAE, images: torch.Tensor, title: str) -> None:
    model.eval()
    with torch.no_grad():
        reconstruction, indices, _ = model(images)
    utils.save_image_rows(path, {"input": images, "codes": indices, "reconstruction": reconstruction},
                          title=title, code_columns=("codes",), num_codes=model.config.num_embeddings)


def save_curves(path: Path, rows: list[dict]) -> None:
    utils.save_training_curves(path, rows, {
        "loss": ("train_recon_loss", "train_vq_loss", "val_loss"),
        "validation SSIM": ("val_ssim",),
        "codebook perplexity": ("train_perplexity", "val_perplexity"),
        "codebook usage": ("train_codebook_usage", "val_codebook_usage"),
    })


def format_epoch(epoch: int, row: dict) -> str:
    return (f"epoch {epoch:3d} | train recon {row['train_recon_loss']:.5f} vq {row['train_vq_loss']:.5f} | "
            f"val loss {row['val_loss']:.5f} ssim {row['val_ssim']:.4f} psnr {row['val_psnr']:.2f} | "
            f"perplexity {row['val_perplexity']:.1f} usage {row['val_codebook_usage']:.3f} | {row['seconds']:.0f}s")


def load_vqvae(path: str | Path, device: torch.device, checkpoint: dict | None = None) -> tuple[VQVAE, dict]:
    """Rebuild a VQ-VAE from its checkpoint alone (pass `checkpoint` when it is already loaded)."""
    if checkpoint is None or checkpoint.get("kind") != "vqvae":
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
                      clock: TrainingClock, conditional: bool, precision: str = "fp32") -> float:
    prior.train()
    loader.set_epoch(epoch)
    total, steps = torch.zeros((), device=loader.device), 0
    progress = progress_bar(loader, desc=f"prior epoch {epoch}", unit="batch")
    for codes, labels in progress:
        for group in optimizer.param_groups:
            group["lr"] = clock.learning_rate()
        with utils.autocast(loader.device, precision):
            logits = prior(codes, labels if conditional else None)
        loss = bits_per_code(logits, codes).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clock.step += 1
        steps += 1
        total += loss.detach()
        if progress.disable is False and steps % 25 == 0:  # reading the loss syncs: only for a visible bar
            progress.set_postfix(bits=f"{(total / steps).item():.3f}")
        if clock.should_stop():
            break
    progress.close()
    return (total / max(1, steps)).item()


@torch.no_grad()
def evaluate_prior(prior: GatedPixelCNN, loader: BatchLoader, conditional: bool, precision: str = "fp32") -> float:
    """Mean negative log-likelihood of a split's code maps, in bits per code."""
    prior.eval()
    values = []
    for codes, labels in progress_bar(loader, desc="prior NLL", unit="batch"):
        with utils.autocast(loader.device, precision):
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
    precision = utils.resolve_precision(args.precision, device)
    optimizer = torch.optim.Adam(prior.parameters(), lr=args.lr)
    train_loader = code_loader(codes["train"], splits["train"].labels, args.batch_size, True, device, args.seed)
    val_loader = code_loader(codes["validate"], splits["validate"].labels, args.batch_size * 2, False, device)
    run_name = args.run_name or f"{Path(args.model).stem}-prior"
    checkpoint_path = Path(args.checkpoint_dir) / f"{run_name}.pth"
    figures_dir = Path(args.resources_dir) / run_name
    rows: list[dict] = []
    uniform = math.log2(config.num_embeddings)
    print(f"prior: {sum(p.numel() for p in prior.parameters()) / 1e6:.2f}M parameters over "
          f"{tuple(codes['train'].shape[1:])} code maps, "
          f"{'conditioned on ' + str(len(source.class_names)) + ' classes' if conditional else 'unconditional'}, "
          f"{device} ({precision}); "
          f"uniform guessing costs {uniform:.2f} bits per code")
    clock = TrainingClock(args, total_steps=args.epochs * len(train_loader))
    best = {"val_bits_per_code": math.inf}
    for epoch in range(1, args.epochs + 1):
        train_bits = train_prior_epoch(epoch, train_loader, prior, optimizer, clock, conditional, precision)
        row = {"epoch": epoch, "train_bits_per_code": train_bits,
               "val_bits_per_code": evaluate_prior(prior, val_loader, conditional, precision),
               "seconds": clock.elapsed}
        rows.append(row)
        utils.write_csv_rows(figures_dir / "metrics.csv", rows)
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
        if clock.should_stop():
            print(f"stopping during epoch {epoch}: time or step limit reached")
            break
    utils.save_training_curves(figures_dir / "curves.png", rows,
                               {"prior NLL (bits per code)": ("train_bits_per_code", "val_bits_per_code")})
    print(f"best validation NLL {best['val_bits_per_code']:.3f} bits per code (epoch {best['epoch']}); "
          f"checkpoint {checkpoint_path}")
    print(f"next: python predict.py -m {checkpoint_path} --sample 16")
    return {"checkpoint": str(checkpoint_path), "best": best, "figures": str(figures_dir)}


RESUME_OVERRIDES = ("epochs", "time_limit", "max_steps", "device", "checkpoint_every", "compile", "precision")


def explicit_options(argv: list[str] | None) -> set[str]:
    """The options given on the command line (not left at their defaults)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def resume_settings(args: argparse.Namespace, argv: list[str] | None) -> tuple[argparse.Namespace, dict]:
    """The resumed run's own settings, with the few options that may change taken from this command line."""
    checkpoint = utils.load_checkpoint(args.resume, expected_kind="vqvae")
    if "training" not in checkpoint:
        raise UsageError(f"{args.resume}: holds no training state to resume from")
    settings = argparse.Namespace(**{**vars(args), **checkpoint["args"]})
    for name in explicit_options(argv) & set(RESUME_OVERRIDES):
        setattr(settings, name, getattr(args, name))
    settings.resume, settings.run_name = args.resume, checkpoint["run_name"]
    settings.image_size = list(checkpoint["preprocessing"]["image_size"])
    return settings, checkpoint


def setup_distributed(device_name: str) -> tuple[int, torch.device]:
    """(rank, device). Under torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, utils.pick_device(device_name)
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return torch.distributed.get_rank(), device


@contextmanager
def main_process_first(rank: int):
    """Rank 0 builds the caches while the others wait, then they read them."""
    if utils.is_distributed() and rank != 0:
        torch.distributed.barrier()
    yield
    if utils.is_distributed() and rank == 0:
        torch.distributed.barrier()


def silent(*_args, **_kwargs) -> None:
    pass


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    resumed = None
    if args.resume:
        args, resumed = resume_settings(args, argv)
    utils.seed_everything(args.seed)
    if args.prior:
        return main_prior(args)
    rank, device = setup_distributed(args.device)
    try:
        return train_vqvae(args, rank, device, resumed)
    finally:
        if utils.is_distributed():
            torch.distributed.destroy_process_group()


def train_vqvae(args: argparse.Namespace, rank: int, device: torch.device, resumed: dict | None) -> dict:
    is_main = rank == 0
    say = print if is_main else silent
    torch.backends.cudnn.benchmark = True
    config = VQVAEConfig.from_dict(resumed["config"]) if resumed else build_config(args)
    with main_process_first(rank):
        source, prep, train_set, val_set = prepare_data(args, config.scale, say)
    run_name = args.run_name or (f"{'demo' if args.data is None else Path(source.root).name}-"
                                 f"{prep.image_size[0]}x{prep.image_size[1]}-{time.strftime('%Y%m%d-%H%M%S')}")
    best_path = Path(args.checkpoint_dir) / f"{run_name}.pth"
    last_path = Path(args.checkpoint_dir) / f"{run_name}-last.pth"
    figures_dir = Path(args.resources_dir) / run_name

    model = VQVAE(config).to(device, memory_format=torch.channels_last)  # faster convolutions, CPU and GPU
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    shards = {"rank": rank, "world_size": world_size()}
    train_loader = BatchLoader(train_set.images, train_set.labels, args.batch_size, shuffle=True, device=device,
                               seed=args.seed, drop_last=len(train_set) > args.batch_size * shards["world_size"],
                               **shards)
    val_loader = BatchLoader(val_set.images, val_set.labels, args.batch_size * 2, shuffle=False, device=device,
                             **shards)
    training = resumed["training"] if resumed else {"epoch": 1, "step": 0, "elapsed": 0.0, "best_val_ssim": -1.0}
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        utils.set_rng_state(training["rng"])
        say(f"resuming {run_name} at epoch {training['epoch']}, step {training['step']}")
    elif args.kmeans_init:
        kmeans_initialise(model, train_loader)
    precision = utils.resolve_precision(args.precision, device)
    step_model = model
    if utils.is_distributed():  # its construction also copies rank 0's weights and codebook to every rank
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    if args.compile:
        step_model = torch.compile(step_model)
    say(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, codes "
        f"{prep.image_size[0] // config.scale}x{prep.image_size[1] // config.scale} from K={config.num_embeddings}"
        f", device {device} x {shards['world_size']} ({precision}); run {run_name}")

    clock = TrainingClock(args, args.epochs * len(train_loader), training["step"], training["elapsed"], device)
    rows = [row for row in read_rows(figures_dir / "metrics.csv") if int(row["step"]) <= clock.step] if resumed else []
    best_ssim = training["best_val_ssim"]
    examples = val_set.as_float(slice(0, RECONSTRUCTION_EXAMPLES)).to(device)

    def checkpoint(epoch: int, totals: EpochTotals, row: dict) -> dict:
        return {"kind": "vqvae", "config": config.to_dict(), "preprocessing": prep.to_dict(), "run_name": run_name,
                "data": {"root": str(source.root), "class_names": source.class_names, "demo": args.data is None},
                "args": {**vars(args), "resume": None}, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "epoch": epoch, "metrics": row, "best_val_ssim": best_ssim,
                "training": {"epoch": epoch, "step": clock.step, "elapsed": clock.elapsed, "best_val_ssim": best_ssim,
                             "epoch_totals": totals.to_dict(), "rng": utils.rng_state()}}

    epoch = training["epoch"]
    totals = EpochTotals.from_dict(training["epoch_totals"], device) if resumed else \
        EpochTotals.zeros(config.num_embeddings, device)
    if totals.batches >= len(train_loader):
        epoch, totals = epoch + 1, EpochTotals.zeros(config.num_embeddings, device)
    while epoch <= args.epochs and not clock.out_of_steps:
        save_midway = (lambda t, e=epoch: utils.save_checkpoint(last_path, checkpoint(e, t, {}))) if is_main else None
        totals = train(epoch, train_loader, step_model, optimizer, clock, args, totals, precision, save_midway)
        val = evaluate(model, val_loader, ssim_weight=args.ssim_weight, precision=precision)
        row = {"epoch": epoch, "step": clock.step, **totals.metrics(),
               **{f"val_{k}": val[k] for k in ("loss", "ssim", "psnr", "perplexity", "codebook_usage")},
               "lr": clock.learning_rate(), "seconds": clock.elapsed}
        if is_main:
            rows.append(row)
            utils.write_csv_rows(figures_dir / "metrics.csv", rows)
            tqdm.write(format_epoch(epoch, row))
            if row["val_ssim"] > best_ssim:
                best_ssim = row["val_ssim"]
                utils.save_checkpoint(best_path, checkpoint(epoch, totals, row))
            utils.save_checkpoint(last_path, checkpoint(epoch, totals, row))
            save_reconstructions(figures_dir / f"reconstructions_epoch_{epoch:03d}.png", model, examples,
                                 f"{run_name}, epoch {epoch}: validation SSIM {row['val_ssim']:.3f}")
        if clock.should_stop():
            say(f"stopping during epoch {epoch}: " + (f"time limit of {args.time_limit:g}s reached"
                                                      if clock.out_of_time else f"{clock.step} steps done"))
            break
        epoch, totals = epoch + 1, EpochTotals.zeros(config.num_embeddings, device)
    best = max(rows, key=lambda r: float(r["val_ssim"])) if rows else {}
    if is_main and rows:
        save_curves(figures_dir / "curves.png", rows)
        say(f"best validation SSIM {float(best['val_ssim']):.4f} (epoch {best['epoch']}); checkpoint {best_path}; "
            f"figures in {figures_dir}/\nnext: python predict.py -m {best_path}")
    return {"checkpoint": str(best_path), "last_checkpoint": str(last_path), "best": best,
            "figures": str(figures_dir)}


def read_rows(path: Path) -> list[dict]:
    return utils.read_csv_rows(path) if path.exists() else []


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
