"""What the training jobs share: their common options, the training clock (time budget and learning-rate schedule),
resuming a run from its checkpoint, and one epoch of a prior's optimisation steps."""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

import checkpoints
import utils
from sampling import unstack_levels

# The CPU recipe (README, "On a CPU only"): the VQ-VAE and transformer-prior sizes that win in CPU minutes on 64x64
# brain MRI, as the command-line flags the benchmarks train with.
CPU_VQVAE_FLAGS = ("--image-size", "64", "--time-limit", "180", "--epochs", "100", "--hidden-channels", "64",
                   "--residual-channels", "32")
# The transformer at 300 s: 64 wide and 4 deep without dropout led 96x4, 128x4, 128x6, 192x3 and 96x6
# (docs/RESULTS.md, "Sizing the transformer prior for a CPU budget").
CPU_TRANSFORMER = {"width": 64, "depth": 4, "heads": 4, "dropout": 0.0}
CPU_PRIOR_FLAGS = (*(item for name, value in CPU_TRANSFORMER.items() for item in (f"--{name}", str(value))),
                   "--lr", "3e-3", "--time-limit", "600", "--epochs", "100")


def run_job(script: str, arguments: list[str]) -> None:
    """Run one of this repository's jobs (train.py, ...) in a fresh Python; its failure is a UsageError (the job
    has printed why)."""
    if subprocess.run([sys.executable, str(Path(__file__).resolve().parent / script), *arguments],
                      check=False).returncode:
        raise utils.UsageError(f"{script} failed (its message is above)")


def train_recipe_if_missing(args: argparse.Namespace, vqvae_run: str, prior_flags: Sequence[str],
                            vqvae_flags: Sequence[str] = CPU_VQVAE_FLAGS, need_prior: bool = True) -> None:
    """For a benchmark: the CPU recipe's VQ-VAE on args.data and its transformer prior, each unless args.vqvae and
    args.prior name one, kept as <vqvae_run>.pth and <vqvae_run>-prior.pth in args.checkpoint_dir (and found there
    by the next run). prior_flags add to the recipe's (which classes, conditional or not); need_prior=False: no
    prior."""
    runs = {"checkpoint-dir": args.checkpoint_dir, "resources-dir": args.checkpoint_dir, "cache-dir": args.cache_dir}
    common = [item for name, value in runs.items() for item in (f"--{name}", value)]
    if args.vqvae is None:
        args.vqvae = str(Path(args.checkpoint_dir) / f"{vqvae_run}.pth")
        if not Path(args.vqvae).exists():
            run_job("train.py", ["--data", args.data, *vqvae_flags, "--run-name", vqvae_run, *common])
    if args.prior is None and need_prior:
        args.prior = str(Path(args.checkpoint_dir) / f"{vqvae_run}-prior.pth")
        if not Path(args.prior).exists():
            run_job("train_prior.py", ["-m", args.vqvae, *prior_flags, *CPU_PRIOR_FLAGS, "--run-name",
                                       f"{vqvae_run}-prior", *common])


def add_run_arguments(parser: argparse.ArgumentParser, epochs: int, batch_size: int,
                      lr: float) -> argparse._ArgumentGroup:
    """The options every training job takes: how long, how fast, where, and where the results go. Returns the
    "training" group, for a job's own training options."""
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=epochs, help="passes over the training split")
    training.add_argument("--batch-size", type=int, default=batch_size,
                          help="items per optimisation step of each process (under torchrun the step takes this many "
                          "from every process)")
    training.add_argument("--global-batch-size", type=int, metavar="N",
                          help="items per optimisation step over all processes, split evenly between them (instead of "
                          "--batch-size): the same training on 1 GPU or 8, and kept when a run resumes on another "
                          "number of them")
    training.add_argument("--lr", type=float, default=lr, help="peak Adam learning rate")
    training.add_argument("--lr-schedule", choices=("cosine", "constant"), default="constant",
                          help="cosine decays over the run (over --time-limit too, when that comes first)")
    training.add_argument("--warmup-steps", type=int, default=100, help="linear learning-rate warm-up")
    training.add_argument("--time-limit", type=float, metavar="SECONDS",
                          help="stop after the step that crosses this many seconds of training, keeping the best")
    training.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in all; 0 = no limit")
    training.add_argument("--compile", action="store_true", help="torch.compile the model (faster on GPUs after "
                          "a minute of compiling)")
    training.add_argument("--precision", choices=utils.PRECISIONS, default="auto",
                          help="bf16 autocast (a VQ-VAE's quantizer stays float32) or fp32; auto = bf16 on GPUs "
                          "with native bfloat16 (compute capability 8.0+), fp32 on older GPUs and CPUs")
    training.add_argument("--seed", type=int, default=0,
                          help="seeds weights, shuffling (and a VQ-VAE's codebook restarts)")
    training.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (under torchrun: auto, cuda "
                          "or cpu; each process takes the GPU of its LOCAL_RANK)")
    training.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                          help="also write the -last checkpoint every this many steps (always at each epoch's end)")
    training.add_argument("--resume", metavar="CHECKPOINT", help="continue a run exactly from its -last (or best) "
                          "checkpoint; --epochs, --time-limit, --max-steps, --checkpoint-every, --data and --cache-dir "
                          "may be changed, --device, --compile and --precision are this machine's")
    output = parser.add_argument_group("output")
    output.add_argument("--run-name", help="names the checkpoint and figures")
    output.add_argument("--checkpoint-dir", default="checkpoints", help="where <run-name>.pth is written")
    output.add_argument("--resources-dir", default="resources", help="figures and metrics go to <dir>/<run-name>/")
    return training

def per_process_batch(args: argparse.Namespace, processes: int) -> int:
    """The batch each process takes: --global-batch-size split over the processes, else --batch-size."""
    if not args.global_batch_size:
        return args.batch_size
    if args.global_batch_size % processes:
        raise utils.UsageError(f"--global-batch-size {args.global_batch_size} does not split evenly over {processes} "
                         f"processes: use a multiple of {processes}")
    return args.global_batch_size // processes

def describe_batches(batch_size: int, processes: int, steps_per_epoch: int, epochs: int) -> str:
    """The batch and step counts a run will make, as the log's start states them."""
    return (f"global batch {batch_size * processes} ({processes} process{'es' if processes > 1 else ''} x "
            f"{batch_size}), {steps_per_epoch} steps per epoch, {steps_per_epoch * epochs} in {epochs} epochs")

STOP_CHECK_EVERY = 10  # steps between the processes' agreements on the time limit

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


# ----------------------------------------------------------------------------- resuming a run

RESUME_OVERRIDES = ("epochs", "time_limit", "max_steps", "checkpoint_every", "data", "cache_dir")
MACHINE_OPTIONS = ("device", "compile", "precision")  # always this command line's: they belong to the machine


def explicit_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The options given on the command line (not left at their defaults)."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def resume_settings(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str],
                    kind: str) -> tuple[argparse.Namespace, dict]:
    """The resumed run's own settings (saved in its checkpoint, merged by option name), with the few options that
    may change taken from this command line. `parser` is spent: its defaults are suppressed to see what was given."""
    checkpoint = checkpoints.load_checkpoint(args.resume, expected_kind=kind)
    if "training" not in checkpoint:
        raise utils.UsageError(f"{args.resume}: holds no training state to resume from")
    settings = argparse.Namespace(**{**vars(args), **checkpoint["args"]})
    for name in (explicit_options(parser, argv) & set(RESUME_OVERRIDES)) | set(MACHINE_OPTIONS):
        setattr(settings, name, getattr(args, name))
    settings.resume, settings.run_name = args.resume, checkpoint["run_name"]
    settings.checkpoint_dir = str(Path(args.resume).resolve().parent)  # the run goes on where its checkpoint is
    return settings, checkpoint


def demo_sized(args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser, sizes: dict,
               log: Callable[[str], None]) -> None:
    """The built-in demo runs at its own size, minutes on a CPU: `sizes` replaces the defaults the command line left
    alone (never an option it gave), and the log says so. `parser` is spent (see explicit_options)."""
    given = explicit_options(parser, argv)
    changed = {name: value for name, value in sizes.items() if name not in given}
    for name, value in changed.items():
        setattr(args, name, value)
    if changed:
        flags = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in changed.items())
        log(f"the demo's own size, minutes on a CPU: {flags} (real data trains at the defaults; flags you give win)")


def resumed_rows(path: Path, step: int) -> list[dict]:
    """The metrics rows a resumed run had written up to the step it resumes from."""
    return [row for row in utils.read_csv_rows(path) if int(row["step"]) <= step] if path.exists() else []


def stop_reason(clock: TrainingClock) -> str:
    return f"time limit of {clock.args.time_limit:g}s reached" if clock.out_of_time else f"{clock.step} steps done"


# ----------------------------------------------------------------------------- a prior's epoch

@dataclass
class PriorTotals:
    """Running sums of one prior epoch on the device (no host sync per step): the summed per-step loss, the steps,
    and the position reached in the epoch's order over all processes."""

    loss: torch.Tensor
    steps: int = 0
    items: int = 0

    @classmethod
    def zeros(cls, device: torch.device, items: int = 0) -> "PriorTotals":
        return cls(torch.zeros((), device=device), 0, items)

    def synced(self) -> "PriorTotals":
        """The sums over all processes (one all-reduce; every process must call it)."""
        loss, steps = utils.all_reduce_sum(torch.stack([self.loss, self.loss.new_tensor(float(self.steps))])).tolist()
        return PriorTotals(self.loss.new_tensor(loss), int(steps), self.items)

    def mean(self) -> float:
        return self.loss.item() / max(1, self.steps)

    def to_dict(self) -> dict:
        return {"loss": self.loss.cpu(), "steps": self.steps, "items": self.items}

    @classmethod
    def from_dict(cls, values: dict, device: torch.device, keep_sums: bool) -> "PriorTotals":
        """Saved (summed) totals: one process takes the sums, the others start from zero."""
        if not keep_sums:
            return cls.zeros(device, values["items"])
        return cls(values["loss"].to(device), values["steps"], values["items"])


def prior_epoch(epoch: int, loader, objective: torch.nn.Module, optimizer: torch.optim.Optimizer,
                clock: TrainingClock, levels: int, conditional: bool, totals: PriorTotals, precision: str = "fp32",
                checkpoint_every: int = 0, on_checkpoint: Callable[[PriorTotals], None] | None = None) -> PriorTotals:
    """Train a prior for one epoch from position `totals.items` on (or until the clock stops it). `objective` maps
    (level maps, labels) to the mean bits per code (sampling.PriorObjective, maybe wrapped by DDP or compiled).
    Every process calls on_checkpoint at the same steps (it makes a collective call)."""
    objective.train()
    loader.set_epoch(epoch)
    progress = utils.progress_bar(loader.batches(start_item=totals.items), desc=f"prior epoch {epoch}",
                                  unit="batch", initial=len(loader) - loader.batches_left(totals.items),
                                  total=len(loader))
    for stacked, labels in progress:
        for group in optimizer.param_groups:
            group["lr"] = clock.learning_rate()
        with utils.autocast(loader.device, precision):
            loss = objective(unstack_levels(stacked, levels), labels if conditional else None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clock.step += 1
        totals.loss += loss.detach().float()
        totals.steps += 1
        totals.items += loader.items_per_step
        if progress.disable is False and totals.steps % 25 == 0:  # reading the loss syncs: only for a visible bar
            progress.set_postfix(bits=f"{(totals.loss / totals.steps).item():.3f}")
        if on_checkpoint is not None and checkpoint_every and clock.step % checkpoint_every == 0:
            on_checkpoint(totals)
        if clock.should_stop():
            break
    progress.close()
    return totals
