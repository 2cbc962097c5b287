"""Train a prior over the code maps of a trained VQ-VAE: a transformer (the default), a masked-token transformer
(MaskGIT) or a gated PixelCNN. For a two-level VQ-VAE-2: a prior over the top codes and one over the bottom codes
conditioned on the top ones.

    python train_prior.py -m checkpoints/<vqvae>.pth                       # the transformer prior
    python train_prior.py -m checkpoints/<vqvae>.pth --prior masked        # or pixelcnn
    torchrun --nproc_per_node=4 train_prior.py -m checkpoints/<vqvae>.pth   # one process per GPU
    python train_prior.py --resume checkpoints/<vqvae>-prior-last.pth      # continue a killed run exactly

Then: python predict.py -m checkpoints/<vqvae>-prior.pth --sample 16
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import checkpoints
import figures
import metrics
import training
import utils
from checkpoints import checkpoint_data
from codes import code_loader, encode_split, prior_evaluation_loaders
from dataset import DataSource, SliceSet, load_split
from modules import weights_fingerprint
from pixelcnn import PixelCNNConfig
from priors import PRIOR_KINDS, build_prior, prior_config_dict, prior_configs
from readers import Preprocessing
from sampling import PriorObjective, stack_levels
from transformer import TransformerConfig
from utils import UsageError

DEFAULT_PRIOR = "transformer"
# The demo's own size: the CPU recipe's transformer, so that a prior of the demo model takes minutes on a laptop
DEMO_SIZE = {"width": 64, "depth": 4, "heads": 4, "dropout": 0.0, "lr": 3e-3}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("-m", "--model", help="the VQ-VAE checkpoint whose codes the prior learns (not needed with "
                        "--resume)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="data folder; default: the one the VQ-VAE was trained on")
    data.add_argument("--cache-dir", default=".cache/slices", help="where decoded slices and code maps are cached")
    data.add_argument("--classes", nargs="+", metavar="CLASS", help="train on these class folders only, e.g. "
                      "--classes notumor: a prior of normal anatomy for anomaly.py (one class: an unconditional prior)")
    prior = parser.add_argument_group("prior")
    prior.add_argument("--prior", choices=tuple(PRIOR_KINDS), default=DEFAULT_PRIOR,
                       help="transformer: decoder-only, raster order, sampled with a key-value cache; masked: "
                       "bidirectional, fills a map in --steps parallel steps (one-level VQ-VAEs); pixelcnn: the gated "
                       "PixelCNN of van den Oord et al. 2016")
    utils.add_config_arguments(prior, TransformerConfig)
    utils.add_config_arguments(prior, PixelCNNConfig)
    prior.add_argument("--unconditional", action="store_true",
                       help="ignore class folders (by default the prior is conditioned on the class when there is one)")
    training.add_run_arguments(parser, epochs=10, batch_size=16, lr=1e-3)
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


def prepare_codes(args: argparse.Namespace, device: torch.device, log: Callable[[str], None],
                  argv: list[str] | None = None) -> CodeData:
    """Decode both splits and encode them with the VQ-VAE, once (cached). Under torchrun every process calls this
    before the process group starts: one process per cache builds it while the others wait on its file lock."""
    vqvae, checkpoint = checkpoints.load_vqvae(args.model, device)
    if vqvae.config.spatial_dims != 2:
        raise UsageError(f"{args.model}: is a 3D VQ-VAE (--spatial-dims 3); the priors model 2D code maps only: "
                         "train the prior on a 2D checkpoint")
    if args.prior == "masked" and vqvae.config.levels > 1:
        raise UsageError(f"{args.model}: has two levels of codes; --prior masked models one level: use "
                         "--prior transformer (or pixelcnn) for a VQ-VAE-2")
    prep = Preprocessing.from_dict(checkpoint["preprocessing"])
    source = checkpoint_data(checkpoint, args.data, log)  # the VQ-VAE's own splits
    if args.classes:
        source = source.only_classes(args.classes)
        log(source.notes[-1])
    splits = {split: load_split(source, split, prep, args.cache_dir, min_side=vqvae.config.image_multiple, log=log)
              for split in ("train", "validate")}
    levels = {split: encode_split(vqvae, slices, device, args.cache_dir, log=log) for split, slices in splits.items()}
    codes = {split: stack_levels(maps) for split, maps in levels.items()}
    processes = utils.launched_world_size()
    if len(codes["train"]) < processes:
        raise UsageError(f"the training split has {len(codes['train'])} slices, fewer than the {processes} processes "
                         "torchrun started: use fewer processes (--nproc_per_node) or more data")
    if checkpoint.get("data", {}).get("demo") and not args.resume:
        training.demo_sized(args, sys.argv[1:] if argv is None else argv, build_parser(), DEMO_SIZE, log)
    labelled = bool((splits["train"].labels >= 0).all())
    conditional = not args.unconditional and len(source.class_names) > 1 and labelled  # one class: nothing to tell
    if source.class_names and not labelled and not args.unconditional:
        log("some training slices are not in a class folder: training an unconditional prior")
    shapes = [list(level.shape[1:]) for level in levels["train"]]
    return CodeData(source, splits, codes, shapes, vqvae.config.num_embeddings, weights_fingerprint(vqvae), conditional)


def silent(*_args, **_kwargs) -> None:
    pass


def level_configs(args: argparse.Namespace, data: CodeData) -> list:
    """One config per level, of the --prior kind: the top one as a one-level prior, the bottom one also conditioned on
    the top codes."""
    config_class = PRIOR_KINDS[args.prior][0]
    classes = len(data.source.class_names) if data.conditional else 0
    configs = []
    for level, (rows, columns) in enumerate(data.code_shapes):
        values = {"num_embeddings": data.num_embeddings, "num_classes": classes,
                  "condition_embeddings": data.num_embeddings if level else 0}
        if config_class is not PixelCNNConfig:
            values.update(rows=rows, columns=columns)
        configs.append(utils.config_from_args(config_class, args, **values))
    return configs


def resume_settings(args: argparse.Namespace, argv: list[str]) -> tuple[argparse.Namespace, dict]:
    return training.resume_settings(build_parser(), args, argv, "prior")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = utils.absolute_paths(build_parser().parse_args(argv),
                                ("model", "data", "cache_dir", "checkpoint_dir", "resources_dir"))
    resumed = None
    if args.resume:
        args, resumed = resume_settings(args, argv)
    elif args.model is None:
        raise UsageError("-m VQVAE_CHECKPOINT is needed (or --resume PRIOR_CHECKPOINT)")
    args.batch_size = training.per_process_batch(args, utils.launched_world_size())
    utils.seed_everything(args.seed)
    device = utils.training_device(args.device)
    say = print if utils.launched_rank() == 0 else silent
    data = prepare_codes(args, device, say, argv)
    utils.init_distributed(device)
    try:
        return train_prior(args, data, device, resumed, say)
    finally:
        utils.close_distributed()


def format_epoch(epoch: int, row: dict, levels: tuple[str, ...], score: str, uniform: float) -> str:
    if score == "masked_bits_per_code":
        validation = f"validation {row['val_masked_bits_per_code']:.3f} bits per masked code"
    else:
        bits = row["val_bits_per_code"]
        validation = (f"validation {bits:.3f} bits/code ({bits / uniform:.0%} of uniform"
                      f"{metrics.format_level_bits({k[4:]: v for k, v in row.items()}, levels)}), "
                      f"{row['val_bits_per_image']:.0f} bits per image")
    return f"prior epoch {epoch:3d} | train {row['train_bits_per_code']:.3f} bits/code | {validation} | " \
           f"{row['seconds']:.0f}s"


def train_prior(args: argparse.Namespace, data: CodeData, device: torch.device, resumed: dict | None,
                say: Callable[[str], None]) -> dict:
    rank, world = (torch.distributed.get_rank() if utils.is_distributed() else 0), utils.world_size()
    is_main = rank == 0
    configs = prior_configs(resumed["config"]) if resumed else level_configs(args, data)
    prior = build_prior(configs).to(device)
    optimizer = torch.optim.Adam(prior.parameters(), lr=args.lr)
    state = resumed["training"] if resumed else {"epoch": 1, "step": 0, "elapsed": 0.0, "best": math.inf}
    if resumed:
        prior.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        utils.set_rng_state(state["rng"], device)
    run_name = args.run_name or f"{Path(args.model).stem}-prior"
    best_path = Path(args.checkpoint_dir) / f"{run_name}.pth"
    last_path = Path(args.checkpoint_dir) / f"{run_name}-last.pth"
    figures_dir = Path(args.resources_dir) / run_name
    if is_main:  # this run owns its checkpoint names: what a killed run left half-written goes
        for path in (best_path, last_path):
            utils.remove_stale_temporaries(path)
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
    uniform = math.log2(data.num_embeddings)
    shapes = " and ".join(f"{height}x{width}" for height, width in data.code_shapes)
    say(utils.describe_machine(device, precision, world))
    if resumed:
        say(f"resuming {run_name} at epoch {state['epoch']}, step {state['step']}")
    say(f"prior: {configs[0].KIND}, {sum(p.numel() for p in prior.parameters()) / 1e6:.2f}M parameters over {shapes} "
        f"code maps ({', '.join(prior.levels)}), "
        f"{'conditioned on ' + str(configs[0].num_classes) + ' classes' if data.conditional else 'unconditional'}; "
        f"uniform guessing costs {uniform:.2f} bits per code; "
        f"{training.describe_batches(args.batch_size, world, len(train_loader), args.epochs)}")
    clock = training.TrainingClock(args, args.epochs * len(train_loader), state["step"], state["elapsed"], device)
    rows = training.resumed_rows(figures_dir / "metrics.csv", clock.step) if resumed else []
    score, best = prior.score, state["best"]

    def save(path: Path, epoch: int, summed: training.PriorTotals, row: dict) -> None:
        """A checkpoint; `row` holds the metrics of an evaluation at this point, or is empty midway."""
        checkpoints.save_checkpoint(path, {
            "kind": "prior", "model": prior.state_dict(), "optimizer": optimizer.state_dict(),
            "config": prior_config_dict(configs), "run_name": run_name, "epoch": epoch, "metrics": row,
            "conditional": data.conditional, "class_names": data.source.class_names,
            "class_counts": data.class_counts, "code_shapes": data.code_shapes, "args": {**vars(args), "resume": None},
            "vqvae": {"path": args.model, "fingerprint": data.vqvae_fingerprint},
            "training": {"epoch": epoch, "step": clock.step, "elapsed": clock.elapsed, "best": best,
                         "epoch_totals": summed.to_dict(), "world_size": world,
                         "epoch_done": bool(row) and train_loader.batches_left(summed.items) == 0,
                         "rng": utils.rng_state(device)}})

    def save_midway(totals: training.PriorTotals, epoch: int) -> None:
        summed = totals.synced()
        if is_main:
            save(last_path, epoch, summed, {})

    epoch = state["epoch"]
    totals = training.PriorTotals.from_dict(state["epoch_totals"], device, is_main) if resumed \
        else training.PriorTotals.zeros(device)
    if state.get("epoch_done", False):  # an epoch saved at its end is done; one saved midway is finished first
        epoch, totals = epoch + 1, training.PriorTotals.zeros(device)
    while epoch <= args.epochs and not clock.out_of_steps:
        totals = training.prior_epoch(epoch, train_loader, step_prior, optimizer, clock, len(prior.levels),
                                      data.conditional, totals, precision, args.checkpoint_every,
                                      lambda t, e=epoch: save_midway(t, e))
        validation = metrics.evaluate_prior(prior, val_loader, log_prior, unlabelled)  # fp32, as predict.py's
        summed = totals.synced()
        row = {"epoch": epoch, "step": clock.step, "train_bits_per_code": summed.mean(),
               **{f"val_{key}": value for key, value in validation.items()}, "seconds": clock.elapsed}
        if is_main:
            rows.append(row)
            utils.write_csv_rows(figures_dir / "metrics.csv", rows)
            tqdm.write(format_epoch(epoch, row, prior.levels, score, uniform))
        if validation[score] < best:
            best = validation[score]
            if is_main:
                save(best_path, epoch, summed, row)
        if is_main:
            save(last_path, epoch, summed, row)
        if clock.should_stop():
            say(f"stopping during epoch {epoch}: {training.stop_reason(clock)}")
            break
        epoch, totals = epoch + 1, training.PriorTotals.zeros(device)
    best_row = min(rows, key=lambda r: float(r[f"val_{score}"])) if rows else {}
    if is_main and rows:
        levels = [f"val_bits_per_code_{level}" for level in prior.levels if f"val_bits_per_code_{level}" in rows[0]]
        figures.save_training_curves(figures_dir / "curves.png", rows, {
            "prior loss (bits per code)": ("train_bits_per_code", f"val_{score}", *levels)})
        say(f"best validation {score.replace('_', ' ')} {float(best_row[f'val_{score}']):.3f} (epoch "
            f"{best_row['epoch']}); checkpoint {best_path}\nnext: python predict.py -m {best_path} --sample 16")
    return {"checkpoint": str(best_path), "last_checkpoint": str(last_path), "best": best_row,
            "figures": str(figures_dir)}


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
