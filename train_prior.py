"""Train a PixelCNN prior over the code maps of a trained VQ-VAE (for a two-level VQ-VAE-2: a prior over the top
codes and one over the bottom codes conditioned on the top ones).

    python train_prior.py -m checkpoints/<vqvae>.pth
    torchrun --nproc_per_node=4 train_prior.py -m checkpoints/<vqvae>.pth     # one process per GPU

Then: python predict.py -m checkpoints/<vqvae>-prior.pth --sample 16
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import checkpoints
import figures
import metrics
import utils
from checkpoints import checkpoint_data
from codes import code_loader, encode_split, prior_evaluation_loaders
from dataset import DataSource, SliceSet, load_split
from modules import weights_fingerprint
from pixelcnn import PixelCNNConfig
from priors import build_prior, prior_config_dict
from readers import Preprocessing
from sampling import PriorObjective, stack_levels, unstack_levels
from utils import UsageError, progress_bar


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("-m", "--model", required=True, help="the VQ-VAE checkpoint whose codes the prior learns")
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="data folder; default: the one the VQ-VAE was trained on")
    data.add_argument("--cache-dir", default=".cache/slices", help="where decoded slices and code maps are cached")
    prior = parser.add_argument_group("prior")
    utils.add_config_arguments(prior, PixelCNNConfig)
    prior.add_argument("--unconditional", action="store_true",
                       help="ignore class folders (by default the prior is conditioned on the class when there is one)")
    utils.add_run_arguments(parser, epochs=10, batch_size=16, lr=1e-3)
    return parser


@dataclass
class CodeData:
    """The code maps of both splits (levels stacked: stack_levels), with what the prior's checkpoint records."""

    source: DataSource
    splits: dict[str, SliceSet]
    codes: dict[str, torch.Tensor]
    code_shapes: list[list[int]]  # per level, coarsest first
    num_embeddings: int
    vqvae_fingerprint: str
    conditional: bool

    @property
    def class_counts(self) -> list[int]:
        labels = self.splits["train"].labels
        return [int((labels == index).sum()) for index in range(len(self.source.class_names))]


def prepare_codes(args: argparse.Namespace, device: torch.device, log: Callable[[str], None]) -> CodeData:
    """Decode both splits and encode them with the VQ-VAE, once (cached). Under torchrun every process calls this
    before the process group starts: one process per cache builds it while the others wait on its file lock."""
    vqvae, checkpoint = checkpoints.load_vqvae(args.model, device)
    if vqvae.config.spatial_dims != 2:
        raise UsageError(f"{args.model}: is a 3D VQ-VAE (--spatial-dims 3); the PixelCNN prior models 2D code maps "
                         "only: train the prior on a 2D checkpoint")
    prep = Preprocessing.from_dict(checkpoint["preprocessing"])
    source = checkpoint_data(checkpoint, args.data, log)  # the VQ-VAE's own splits
    splits = {split: load_split(source, split, prep, args.cache_dir, min_side=vqvae.config.image_multiple, log=log)
              for split in ("train", "validate")}
    levels = {split: encode_split(vqvae, slices, device, args.cache_dir, log=log) for split, slices in splits.items()}
    codes = {split: stack_levels(maps) for split, maps in levels.items()}
    processes = utils.launched_world_size()
    if len(codes["train"]) < processes:
        raise UsageError(f"the training split has {len(codes['train'])} slices, fewer than the {processes} processes "
                         "torchrun started: use fewer processes (--nproc_per_node) or more data")
    labelled = bool((splits["train"].labels >= 0).all())
    conditional = not args.unconditional and bool(source.class_names) and labelled
    if source.class_names and not labelled and not args.unconditional:
        log("some training slices are not in a class folder: training an unconditional prior")
    shapes = [list(level.shape[1:]) for level in levels["train"]]
    return CodeData(source, splits, codes, shapes, vqvae.config.num_embeddings, weights_fingerprint(vqvae), conditional)


def train_epoch(epoch: int, loader, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                clock: utils.TrainingClock, conditional: bool, levels: int, precision: str = "fp32") -> float:
    """One epoch (or until the clock stops it); the mean training NLL in bits per code over all processes."""
    model.train()
    loader.set_epoch(epoch)
    total, steps = torch.zeros((), device=loader.device), 0
    progress = progress_bar(loader, desc=f"prior epoch {epoch}", unit="batch")
    for stacked, labels in progress:
        for group in optimizer.param_groups:
            group["lr"] = clock.learning_rate()
        with utils.autocast(loader.device, precision):
            loss = model(unstack_levels(stacked, levels), labels if conditional else None)
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
    summed, count = utils.all_reduce_sum(torch.stack([total, total.new_tensor(float(steps))])).tolist()
    return summed / max(count, 1.0)


def silent(*_args, **_kwargs) -> None:
    pass


def main(argv: list[str] | None = None) -> dict:
    args = utils.absolute_paths(build_parser().parse_args(argv),
                                ("model", "data", "cache_dir", "checkpoint_dir", "resources_dir"))
    args.batch_size = utils.per_process_batch(args, utils.launched_world_size())
    utils.seed_everything(args.seed)
    device = utils.training_device(args.device)
    say = print if utils.launched_rank() == 0 else silent
    data = prepare_codes(args, device, say)
    utils.init_distributed(device)
    try:
        return train_prior(args, data, device, say)
    finally:
        utils.close_distributed()


def train_prior(args: argparse.Namespace, data: CodeData, device: torch.device, say: Callable[[str], None]) -> dict:
    rank, world = (torch.distributed.get_rank() if utils.is_distributed() else 0), utils.world_size()
    config = utils.config_from_args(PixelCNNConfig, args, num_embeddings=data.num_embeddings,
                                    num_classes=len(data.source.class_names) if data.conditional else 0)
    # One prior per level: the top one as a one-level prior, the bottom one also conditioned on the top codes.
    configs = [config] + [replace(config, condition_embeddings=data.num_embeddings)] * (len(data.code_shapes) - 1)
    prior = build_prior(configs).to(device)
    optimizer = torch.optim.Adam(prior.parameters(), lr=args.lr)
    # Every process starts from the first one's weights; DDP and compile wrap the loss as a forward pass.
    step_prior = utils.wrap_distributed(PriorObjective(prior), device)
    if args.compile:
        step_prior = torch.compile(step_prior)
    precision = utils.resolve_precision(args.precision, device)
    shards = {"rank": rank, "world_size": world}
    train_loader = code_loader(data.codes["train"], data.splits["train"].labels, args.batch_size, True, device,
                               args.seed, **shards)
    val_loader, unlabelled = prior_evaluation_loaders(data.codes["validate"], data.splits["validate"].labels,
                                                      args.batch_size * 2, device, data.conditional, **shards)
    if unlabelled is not None:
        say(f"{len(unlabelled.data)} validation code maps have no class folder: their NLL is the class-mixture "
            "likelihood")
    log_prior = metrics.class_log_prior(data.class_counts) if data.conditional else None
    run_name = args.run_name or f"{Path(args.model).stem}-prior"
    checkpoint_path = Path(args.checkpoint_dir) / f"{run_name}.pth"
    figures_dir = Path(args.resources_dir) / run_name
    uniform = math.log2(config.num_embeddings)
    shapes = " and ".join(f"{height}x{width}" for height, width in data.code_shapes)
    say(utils.describe_machine(device, precision, world))
    say(f"prior: {sum(p.numel() for p in prior.parameters()) / 1e6:.2f}M parameters over {shapes} code maps "
        f"({', '.join(prior.levels)}), "
        f"{'conditioned on ' + str(config.num_classes) + ' classes' if data.conditional else 'unconditional'}; "
        f"uniform guessing costs {uniform:.2f} bits per code; "
        f"{utils.describe_batches(args.batch_size, world, len(train_loader), args.epochs)}")
    clock = utils.TrainingClock(args, args.epochs * len(train_loader), device=device)
    rows: list[dict] = []
    best = {"val_bits_per_code": math.inf}
    for epoch in range(1, args.epochs + 1):
        train_bits = train_epoch(epoch, train_loader, step_prior, optimizer, clock, data.conditional,
                                 len(prior.levels), precision)
        validation = metrics.evaluate_prior(prior, val_loader, log_prior, unlabelled)  # fp32, as predict.py's
        val_bits = validation["bits_per_code"]
        row = {"epoch": epoch, "train_bits_per_code": train_bits,
               **{f"val_{key}": value for key, value in validation.items()}, "seconds": clock.elapsed}
        rows.append(row)
        if rank == 0:
            utils.write_csv_rows(figures_dir / "metrics.csv", rows)
            per_level = metrics.format_level_bits(validation, prior.levels)
            tqdm.write(f"prior epoch {epoch:3d} | train {train_bits:.3f} bits/code | validation {val_bits:.3f} "
                       f"bits/code ({val_bits / uniform:.0%} of uniform{per_level}), "
                       f"{validation['bits_per_image']:.0f} bits per image | {row['seconds']:.0f}s")
        if val_bits < best["val_bits_per_code"]:
            best = row
            if rank == 0:
                checkpoints.save_checkpoint(checkpoint_path, {
                    "kind": "prior", "model": prior.state_dict(), "optimizer": optimizer.state_dict(),
                    "config": prior_config_dict(configs),
                    "epoch": epoch, "metrics": row, "conditional": data.conditional,
                    "class_names": data.source.class_names, "class_counts": data.class_counts,
                    "code_shapes": data.code_shapes, "args": vars(args),
                    "vqvae": {"path": args.model, "fingerprint": data.vqvae_fingerprint}})
        if clock.should_stop():
            say(f"stopping during epoch {epoch}: time or step limit reached")
            break
    if rank == 0:
        levels = [f"val_bits_per_code_{level}" for level in prior.levels if f"val_bits_per_code_{level}" in rows[0]]
        figures.save_training_curves(figures_dir / "curves.png", rows, {
            "prior NLL (bits per code)": ("train_bits_per_code", "val_bits_per_code", *levels)})
    say(f"best validation NLL {best['val_bits_per_code']:.3f} bits per code (epoch {best['epoch']}); "
        f"checkpoint {checkpoint_path}\nnext: python predict.py -m {checkpoint_path} --sample 16")
    return {"checkpoint": str(checkpoint_path), "best": best, "figures": str(figures_dir)}


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
