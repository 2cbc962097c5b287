"""Train a VQ-VAE on 2D MRI slices, or on whole 3D volumes.

    python train.py                                        # built-in demo phantoms, CPU-friendly
    python train.py --spatial-dims 3                       # built-in demo phantom volumes, 3D convolutions
    python train.py --data /path/to/HipMRI_study_keras_slices_data   # or the folder it was unpacked into
    torchrun --nproc_per_node=4 train.py --data DIR        # one process per GPU
    python train.py --resume checkpoints/<run>-last.pth    # continue a killed run exactly

Then: python predict.py -m checkpoints/<run>.pth, and python train_prior.py -m checkpoints/<run>.pth
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoints
import figures
import metrics
import training
import utils
from dataset import BatchLoader, DataSource, SliceSet, find_data, load_split
from demo import make_demo_data
from modules import VQVAE, VQVAE2, VQVAEConfig, build_vqvae
from readers import Preprocessing, native_image_size
from utils import UsageError, progress_bar

DEFAULT_DEMO_DIR = "data/demo"
RECONSTRUCTION_EXAMPLES = {2: 6, 3: 2}  # slices, or volumes (each shown in three planes)
# The demo's own size: the CPU recipe's widths and 10 epochs, so that `python train.py` takes minutes on a laptop
DEMO_SIZE = {"hidden_channels": 64, "residual_channels": 32, "epochs": 10}
# A ViT demo: the best ViT of 3 CPU minutes on brain MRI (docs/RESULTS.md), not the GPU-sized default
DEMO_VIT_SIZE = {"vit_width": 128, "vit_depth": 2, "vit_heads": 4, "lr": 3e-3, "epochs": 10}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="data folder (HipMRI, OASIS or train/val/test layout); none = built-in demo")
    data.add_argument("--demo-dir", default=DEFAULT_DEMO_DIR, help="where the demo data is generated")
    data.add_argument("--image-size", type=int, nargs="+", metavar="N",
                      help="H W (volumes: X Y Z, along the right, anterior and superior axes), or one N for all "
                      "sides; default: the most common shape in the training split (volumes: in voxels of their "
                      "finest spacing)")
    data.add_argument("--resize", choices=("fit", "crop"), default="fit",
                      help="keep the aspect ratio: fit inside and pad, or cover and centre-crop")
    data.add_argument("--slice-axis", type=int, default=2, help="axis along which 3D NIfTI volumes are sliced")
    data.add_argument("--val-fraction", type=float, default=0.1,
                      help="held out of train when there is no val split (whole cases when file names tell them)")
    data.add_argument("--cache-dir", default=".cache/slices", help="where decoded slices are cached")
    model = parser.add_argument_group("model")
    utils.add_config_arguments(model, VQVAEConfig)
    model.add_argument("--kmeans-init", action="store_true", help="initialise the codebook by k-means on encoder "
                       "outputs of the first batches (default: a random draw of them)")
    run = training.add_run_arguments(parser, epochs=20, batch_size=16, lr=1e-3)
    run.add_argument("--ssim-weight", type=float, default=0.2, help="weight of (1 - SSIM) added to the MSE")
    return parser


def build_config(args: argparse.Namespace) -> VQVAEConfig:
    return utils.config_from_args(VQVAEConfig, args)


def check_image_size(size: tuple[int, ...], multiple: int) -> None:
    if any(side % multiple or side < max(multiple, 8) for side in size):
        raise UsageError(f"--image-size {' '.join(map(str, size))}: each side must be a multiple of {multiple} "
                         f"(the coarsest code's size: 2**(downsamples + levels - 1)) and at least {max(multiple, 8)}")


def image_size_option(size: list[int], spatial_dims: int) -> tuple[int, ...]:
    """--image-size as one side per spatial dimension."""
    if len(size) == 1:
        return tuple(size * spatial_dims)
    if len(size) != spatial_dims:
        sides = "two (H W)" if spatial_dims == 2 else "three (X Y Z)"
        raise UsageError(f"--image-size takes one number (all sides alike) or {sides}")
    return tuple(size)


@dataclass
class TrainingData:
    source: DataSource
    prep: Preprocessing
    train: SliceSet
    validate: SliceSet


def prepare_data(args: argparse.Namespace, multiple: int, log: Callable[[str], None] = print) -> TrainingData:
    """Find, decode and cache both splits. Under torchrun every process calls this before the process group
    starts: one process per cache decodes while the others wait on its file lock, so no collective times out."""
    dims = args.spatial_dims
    if dims == 3 and args.channels != 1:
        raise UsageError("--spatial-dims 3 reads one-channel volumes: leave --channels at 1")
    if args.data is None:
        data_dir = make_demo_data(args.demo_dir, log=log, volumes=dims == 3)
        log(f"no --data given: training on the built-in DEMO data (synthetic phantoms, not real MRI) in {data_dir}."
            "\n  For real scans: python train.py --data /path/to/keras_slices_data (HipMRI) "
            "or /path/to/keras_png_slices_data (OASIS)")
    else:
        data_dir = args.data
    source = find_data(data_dir, args.val_fraction)
    for note in source.notes:
        log(note)
    if args.image_size is None:
        image_size = native_image_size(source.files["train"], multiple, args.slice_axis, dims)
        log(f"image size {utils.shape_text(image_size)} (the most common "
            f"{'volume shape in voxels of its finest spacing' if dims == 3 else 'slice shape'}, padded to a "
            f"multiple of {multiple}); set --image-size to change it")
    else:
        image_size = image_size_option(args.image_size, dims)
    check_image_size(image_size, multiple)
    prep = Preprocessing(image_size=image_size, channels=args.channels, resize=args.resize,
                         slice_axis=args.slice_axis, spatial_dims=dims)
    splits = [load_split(source, split, prep, args.cache_dir, min_side=multiple, log=log)
              for split in ("train", "validate")]
    items = utils.items_name(dims)
    log(f"train: {len(splits[0])} {items}, validation: {len(splits[1])} {items}, {utils.shape_text(image_size)}")
    processes = utils.launched_world_size()
    if len(splits[0]) < processes:
        raise UsageError(f"the training split has {len(splits[0])} {items}, fewer than the {processes} processes "
                         "torchrun started: use fewer processes (--nproc_per_node) or more data")
    return TrainingData(source, prep, *splits)


@dataclass
class EpochTotals:
    """Running sums of one epoch, kept on the device (no host sync per step).

    Each process sums its own batches; synced() adds up those of all processes, which is what checkpoints store
    and what metrics() reads. `items` is the position reached in the epoch's order, over all processes."""

    losses: torch.Tensor  # summed per-batch reconstruction loss, summed per-batch vq loss
    code_counts: torch.Tensor  # [levels, K]
    batches: int = 0
    items: int = 0

    @classmethod
    def zeros(cls, levels: int, num_codes: int, device: torch.device, items: int = 0) -> "EpochTotals":
        return cls(torch.zeros(2, device=device), torch.zeros(levels, num_codes, device=device), 0, items)

    def add(self, recon_loss: torch.Tensor, vq_loss: torch.Tensor, codes, items: int) -> None:
        self.losses += torch.stack([recon_loss.detach(), vq_loss.detach().float()])
        self.code_counts += metrics.level_code_counts(codes, self.code_counts.shape[1])
        self.batches += 1
        self.items += items

    def synced(self) -> "EpochTotals":
        """The sums over all processes (one all-reduce; every process must call it)."""
        packed = torch.cat([self.losses, self.losses.new_tensor([float(self.batches)]), self.code_counts.flatten()])
        packed = utils.all_reduce_sum(packed)
        return EpochTotals(packed[:2], packed[3:].view_as(self.code_counts), int(packed[2].item()), self.items)

    def metrics(self, levels: tuple[str, ...]) -> dict:
        recon, vq = (self.losses / max(1, self.batches)).tolist()
        use = metrics.code_use(self.code_counts, levels)
        return {"train_recon_loss": recon, "train_vq_loss": vq, **{f"train_{key}": value for key, value in use.items()}}

    def to_dict(self) -> dict:
        return {"losses": self.losses.cpu(), "code_counts": self.code_counts.cpu(), "batches": self.batches,
                "items": self.items}

    @classmethod
    def from_dict(cls, values: dict, device: torch.device, keep_sums: bool, batch_size: int) -> "EpochTotals":
        """Saved (summed) totals: one process takes the sums, the others start from zero, so that the sum over
        processes is again the saved one. Older checkpoints, of one process, counted its batches, not items."""
        items = values.get("items", values["batches"] * batch_size)
        code_counts = values["code_counts"].view(-1, values["code_counts"].shape[-1])  # older ones: one level, [K]
        if not keep_sums:
            return cls.zeros(*code_counts.shape, device, items)
        return cls(values["losses"].to(device), code_counts.to(device), values["batches"], items)


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor, ssim_weight: float) -> torch.Tensor:
    loss = F.mse_loss(reconstruction.float(), images)
    if ssim_weight > 0:
        loss = loss + ssim_weight * (1 - metrics.ssim_per_image(reconstruction, images).mean())
    return loss


def train(epoch: int, loader: BatchLoader, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          clock: training.TrainingClock, args: argparse.Namespace, totals: EpochTotals, precision: str = "fp32",
          on_checkpoint: Callable[[EpochTotals], None] | None = None) -> EpochTotals:
    """Train one epoch from position `totals.items` on; stops early after the step that runs out of time or
    steps. Every process calls on_checkpoint at the same steps (it makes a collective call)."""
    model.train()
    loader.set_epoch(epoch)
    device = loader.device
    progress = progress_bar(loader.batches(start_item=totals.items), desc=f"epoch {epoch}", unit="batch",
                            initial=len(loader) - loader.batches_left(totals.items), total=len(loader))
    for images, _ in progress:
        for group in optimizer.param_groups:
            group["lr"] = clock.learning_rate()
        with utils.autocast(device, precision):
            reconstruction, codes, vq_loss = model(images)
        recon_loss = reconstruction_loss(reconstruction, images, args.ssim_weight)
        optimizer.zero_grad(set_to_none=True)
        (recon_loss + vq_loss).backward()
        optimizer.step()
        clock.step += 1
        totals.add(recon_loss, vq_loss, codes, loader.items_per_step)
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
def initialise_codebook(model: VQVAE | VQVAE2, loader: BatchLoader, kmeans: bool, kmeans_batches: int = 8,
                        processes: int = 1) -> None:
    """Seed the codebooks from encoder outputs before the first step: a random draw from the first batch, or
    k-means over the first kmeans_batches batches (of this process's share, 1/processes of each step)."""
    model.eval()
    batches = []
    for images, _ in loader:
        batches.append(images)
        if len(batches) == (kmeans_batches if kmeans else 1):
            break
    model.initialise_codebooks(batches, kmeans_iterations=10 if kmeans else 0, steps=len(batches) / processes)


def save_curves(path: Path, rows: list[dict], levels: tuple[str, ...]) -> None:
    suffixes = metrics.level_suffixes(levels)
    figures.save_training_curves(path, rows, {
        "loss": ("train_recon_loss", "train_vq_loss", "val_loss"),
        "validation SSIM": ("val_ssim",),
        "validation MAE": ("val_mae",),
        "codebook perplexity": [f"{split}_perplexity{suffix}" for suffix in suffixes for split in ("train", "val")],
        "codebook usage": [f"{split}_codebook_usage{suffix}" for suffix in suffixes for split in ("train", "val")],
    })


def format_epoch(epoch: int, row: dict, levels: tuple[str, ...]) -> str:
    use = " ".join(f"{label}perplexity {row[f'val_perplexity{suffix}']:.1f} usage "
                   f"{row[f'val_codebook_usage{suffix}']:.3f}" for suffix, label in metrics.level_names(levels))
    return (f"epoch {epoch:3d} | train recon {row['train_recon_loss']:.5f} vq {row['train_vq_loss']:.5f} | "
            f"val loss {row['val_loss']:.5f} ssim {row['val_ssim']:.4f} psnr {row['val_psnr']:.2f} "
            f"mae {row['val_mae']:.4f} | {use} | {row['seconds']:.0f}s")


def resume_settings(args: argparse.Namespace, argv: list[str]) -> tuple[argparse.Namespace, dict]:
    """The resumed run's own settings, with the few options that may change taken from this command line."""
    settings, checkpoint = training.resume_settings(build_parser(), args, argv, "vqvae")
    settings.image_size = list(checkpoint["preprocessing"]["image_size"])
    return settings, checkpoint


def silent(*_args, **_kwargs) -> None:
    pass


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if "--prior" in argv:
        raise UsageError("the prior has its own script now: python train_prior.py -m VQVAE_CHECKPOINT (it models the "
                         "codes of 2D checkpoints only, not of --spatial-dims 3 ones)")
    args = utils.absolute_paths(build_parser().parse_args(argv), ("data", "demo_dir", "cache_dir", "checkpoint_dir",
                                                                  "resources_dir"))
    say = print if utils.launched_rank() == 0 else silent
    resumed = None
    if args.resume:
        args, resumed = resume_settings(args, argv)
    elif args.data is None:
        training.demo_sized(args, argv, build_parser(), DEMO_VIT_SIZE if args.architecture == "vit" else DEMO_SIZE,
                            say)
    args.batch_size = training.per_process_batch(args, utils.launched_world_size())
    utils.seed_everything(args.seed)
    device = utils.training_device(args.device)
    config = VQVAEConfig.from_dict(resumed["config"]) if resumed else build_config(args)
    data = prepare_data(args, config.image_multiple, say)
    utils.init_distributed(device)
    try:
        return train_vqvae(args, config, data, device, resumed, say)
    finally:
        utils.close_distributed()


def train_vqvae(args: argparse.Namespace, config: VQVAEConfig, data: TrainingData, device: torch.device,
                resumed: dict | None, say: Callable[[str], None]) -> dict:
    rank, world = (torch.distributed.get_rank() if utils.is_distributed() else 0), utils.world_size()
    is_main = rank == 0
    torch.backends.cudnn.benchmark = True
    prep = data.prep
    run_name = args.run_name or (f"{'demo' if args.data is None else Path(data.source.root).name}-"
                                 f"{utils.shape_text(prep.image_size)}-{time.strftime('%Y%m%d-%H%M%S')}")
    best_path = Path(args.checkpoint_dir) / f"{run_name}.pth"
    last_path = Path(args.checkpoint_dir) / f"{run_name}-last.pth"
    figures_dir = Path(args.resources_dir) / run_name

    model = build_vqvae(config).to(device, memory_format=config.memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    shards = {"rank": rank, "world_size": world}
    train_loader = BatchLoader(data.train.images, data.train.labels, args.batch_size, shuffle=True, device=device,
                               seed=args.seed, drop_last=len(data.train) > args.batch_size * world, **shards)
    val_loader = BatchLoader(data.validate.images, data.validate.labels, args.batch_size * 2, shuffle=False,
                             device=device, **shards)
    state = resumed["training"] if resumed else {"epoch": 1, "step": 0, "elapsed": 0.0, "best_val_ssim": -1.0}
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        utils.set_rng_state(state["rng"], device)
        say(f"resuming {run_name} at epoch {state['epoch']}, step {state['step']}")
    else:
        initialise_codebook(model, train_loader, args.kmeans_init, processes=world)
    if is_main:  # this run owns its checkpoint names: what a killed run left half-written goes
        for path in (best_path, last_path):
            utils.remove_stale_temporaries(path)
    precision = utils.resolve_precision(args.precision, device)
    step_model = utils.wrap_distributed(model, device)  # every process starts from the first one's model
    if args.compile:
        step_model = torch.compile(step_model)
    code_sizes = " and ".join(utils.shape_text(side // size for side in prep.image_size)
                              for size in reversed([config.scale * 2**level for level in range(config.levels)]))
    say(f"{utils.describe_machine(device, precision, world)}; run {run_name}")
    batches = training.describe_batches(args.batch_size, world, len(train_loader), args.epochs)
    say(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, codes {code_sizes} from "
        f"K={config.num_embeddings}; {batches}")

    clock = training.TrainingClock(args, args.epochs * len(train_loader), state["step"], state["elapsed"], device)
    rows = training.resumed_rows(figures_dir / "metrics.csv", clock.step) if resumed else []
    best_ssim = state["best_val_ssim"]
    examples = data.validate.as_float(slice(0, RECONSTRUCTION_EXAMPLES[config.spatial_dims])).to(device)

    def save(path: Path, epoch: int, summed: EpochTotals, row: dict) -> None:
        """A checkpoint; `row` holds the metrics of an evaluation at this point, or is empty midway."""
        checkpoints.save_checkpoint(path, {
            "kind": "vqvae", "config": config.to_dict(), "preprocessing": prep.to_dict(), "run_name": run_name,
            "data": {"root": str(data.source.root), "class_names": data.source.class_names,
                     "demo": args.data is None, "val_fraction": args.val_fraction},
            "args": {**vars(args), "resume": None}, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "epoch": epoch, "metrics": row, "best_val_ssim": best_ssim,
            "training": {"epoch": epoch, "step": clock.step, "elapsed": clock.elapsed, "best_val_ssim": best_ssim,
                         "epoch_totals": summed.to_dict(), "world_size": world,
                         "epoch_done": bool(row) and train_loader.batches_left(summed.items) == 0,
                         "rng": utils.rng_state(device)}})

    def save_midway(totals: EpochTotals, epoch: int) -> None:
        summed = totals.synced()
        if is_main:
            save(last_path, epoch, summed, {})

    epoch = state["epoch"]
    sizes = (config.levels, config.num_embeddings)
    totals = EpochTotals.from_dict(state["epoch_totals"], device, is_main, args.batch_size) \
        if resumed else EpochTotals.zeros(*sizes, device)
    # An epoch whose last step was saved midway is still evaluated; one saved at its end is done.
    if state.get("epoch_done", train_loader.batches_left(totals.items) == 0):
        epoch, totals = epoch + 1, EpochTotals.zeros(*sizes, device)
    while epoch <= args.epochs and not clock.out_of_steps:
        totals = train(epoch, train_loader, step_model, optimizer, clock, args, totals, precision,
                       on_checkpoint=lambda t, e=epoch: save_midway(t, e))
        # In fp32 whatever the training precision: the number that picks the best checkpoint is predict.py's.
        val = metrics.evaluate_vqvae(model, val_loader, ssim_weight=args.ssim_weight)
        summed = totals.synced()
        row = {"epoch": epoch, "step": clock.step, **summed.metrics(model.levels),
               **{f"val_{key}": value for key, value in val.items() if key not in ("ssim_per_image", "code_counts")},
               "lr": clock.learning_rate(), "seconds": clock.elapsed}
        if is_main:
            rows.append(row)
            utils.write_csv_rows(figures_dir / "metrics.csv", rows)
            tqdm.write(format_epoch(epoch, row, model.levels))
            if row["val_ssim"] > best_ssim:
                best_ssim = row["val_ssim"]
                save(best_path, epoch, summed, row)
            save(last_path, epoch, summed, row)
            figures.save_reconstructions(figures_dir / f"reconstructions_epoch_{epoch:03d}.png", model, examples,
                                       f"{run_name}, epoch {epoch}: validation SSIM {row['val_ssim']:.3f}")
        if clock.should_stop():
            say(f"stopping during epoch {epoch}: {training.stop_reason(clock)}")
            break
        epoch, totals = epoch + 1, EpochTotals.zeros(*sizes, device)
    best = max(rows, key=lambda r: float(r["val_ssim"])) if rows else {}
    if is_main and rows:
        save_curves(figures_dir / "curves.png", rows, model.levels)
        frames = [figures_dir / f"reconstructions_epoch_{int(row['epoch']):03d}.png" for row in rows]
        figures.save_gif(figures_dir / "reconstructions.gif", [frame for frame in frames if frame.exists()])
        say(f"best validation SSIM {float(best['val_ssim']):.4f} (epoch {best['epoch']}); checkpoint {best_path}; "
            f"figures in {figures_dir}/\nnext: python predict.py -m {best_path}")
    return {"checkpoint": str(best_path), "last_checkpoint": str(last_path), "best": best,
            "figures": str(figures_dir)}


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
