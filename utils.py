"""Metrics, figures, checkpoints, seeding, distributed helpers, the training clock and the one error type users see."""
from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import random
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from modules import VQVAE, VQVAE2, GatedPixelCNN, HierarchicalPrior, PriorConfig, VQVAEConfig, as_levels, \
    build_prior, build_vqvae, count_codes, mixture_level_bits, unstack_levels, weights_fingerprint


class UsageError(Exception):
    """A problem with the user's input (data, flags, checkpoint): printed as one line, exit code 2."""


def run_cli(main: Callable[[], Any]) -> int:
    """Run a script's main(); a UsageError becomes one line on stderr and a non-zero exit, never a traceback."""
    sys.stdout.reconfigure(line_buffering=True)  # job logs show each line as it happens, even when redirected
    try:
        main()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def progress_bar(iterable, **options):
    """A tqdm bar on terminals; silent in logs and CI, where redrawn bars are only noise."""
    from tqdm import tqdm

    return tqdm(iterable, disable=None, leave=False, dynamic_ncols=True, **options)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    """Every random generator's state, in types that load with weights_only=True. Of the GPUs only the training
    device's generator is kept, so the state restores on a machine with fewer GPUs, or none."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore rng_state(); a GPU state is restored only when training goes on on a GPU."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    cuda_state = state.get("cuda")
    if isinstance(cuda_state, (list, tuple)):  # older checkpoints kept one state per visible GPU
        cuda_state = cuda_state[0] if cuda_state else None
    if cuda_state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state, device)


# ----------------------------------------------------------------------------- several processes (torchrun)

def launched_world_size() -> int:
    """How many processes torchrun started (1 without torchrun); known before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all processes (in place); a no-op in a single process."""
    if is_distributed():
        torch.distributed.all_reduce(tensor)
    return tensor


def training_device(name: str = "auto") -> torch.device:
    """This process's device. Under torchrun each process takes the GPU of its LOCAL_RANK (or the CPU)."""
    if launched_world_size() <= 1:
        return pick_device(name)
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise UsageError(f"--device {name}: under torchrun each process uses the GPU of its LOCAL_RANK; "
                         "use --device cuda (or auto), or --device cpu")
    pick_device("cuda")  # a clear error when there is no GPU
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise UsageError(f"torchrun started process {local_rank} on a node, but only {torch.cuda.device_count()} "
                         "GPUs are visible: lower --nproc_per_node")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def init_distributed(device: torch.device) -> None:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); nothing without torchrun. Call it after the
    data caches are built, so that no collective waits through a long decode."""
    if launched_world_size() > 1 and not is_distributed():
        cuda = device.type == "cuda"
        torch.distributed.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)


def close_distributed() -> None:
    if is_distributed():
        torch.distributed.destroy_process_group()


def broadcast_module_state(module: torch.nn.Module) -> None:
    """Copy the first process's parameters and buffers to every process."""
    if is_distributed():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            torch.distributed.broadcast(tensor.data, src=0)


def wrap_distributed(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel over torchrun's processes, or the model itself in one process.

    Every process first takes the first one's parameters and buffers: DDP itself copies buffers only with
    broadcast_buffers=True, and that would also overwrite them at every forward pass, where the codebook's
    statistics are already kept equal by the quantizer's own all-reduce."""
    if not is_distributed():
        return model
    broadcast_module_state(model)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for, but CUDA is not available on this machine")
    return torch.device(name)


PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is bf16 on GPUs with native bfloat16 (compute capability 8.0+: A100, H100, RTX 30xx and newer) and
    fp32 elsewhere: older GPUs (T4, V100) and CPUs only emulate bf16, which is slower than fp32."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return "bf16" if native else "fp32"


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Mixed precision for the convolutions under `precision` ('bf16' or 'fp32'). bf16 keeps float32's range, so
    no loss scaling is needed; the quantizer and the losses opt out to float32 themselves."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def add_run_arguments(parser: argparse.ArgumentParser, epochs: int, batch_size: int, lr: float) -> None:
    """The options every training job takes: how long, how fast, where, and where the results go."""
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=epochs, help="passes over the training split")
    training.add_argument("--batch-size", type=int, default=batch_size,
                          help="items per optimisation step (per process under torchrun)")
    training.add_argument("--lr", type=float, default=lr, help="peak Adam learning rate")
    training.add_argument("--lr-schedule", choices=("cosine", "constant"), default="constant",
                          help="cosine decays over the run (over --time-limit too, when that comes first)")
    training.add_argument("--warmup-steps", type=int, default=100, help="linear learning-rate warm-up")
    training.add_argument("--time-limit", type=float, metavar="SECONDS",
                          help="stop after the step that crosses this many seconds of training, keeping the best")
    training.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in all; 0 = no limit")
    training.add_argument("--compile", action="store_true", help="torch.compile the model (faster on GPUs after "
                          "a minute of compiling)")
    training.add_argument("--precision", choices=PRECISIONS, default="auto",
                          help="bf16 autocast (a VQ-VAE's quantizer stays float32) or fp32; auto = bf16 on GPUs "
                          "with native bfloat16 (compute capability 8.0+), fp32 on older GPUs and CPUs")
    training.add_argument("--seed", type=int, default=0,
                          help="seeds weights, shuffling (and a VQ-VAE's codebook restarts)")
    training.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (under torchrun: auto, cuda "
                          "or cpu; each process takes the GPU of its LOCAL_RANK)")
    output = parser.add_argument_group("output")
    output.add_argument("--run-name", help="names the checkpoint and figures")
    output.add_argument("--checkpoint-dir", default="checkpoints", help="where <run-name>.pth is written")
    output.add_argument("--resources-dir", default="resources", help="figures and metrics go to <dir>/<run-name>/")


def absolute_paths(args: argparse.Namespace, names: Sequence[str]) -> argparse.Namespace:
    """Make these path options absolute: checkpoints record them, and later jobs may run from another directory."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            setattr(args, name, str(Path(value).expanduser().absolute()))
    return args


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
        if not is_distributed():
            return self.out_of_time
        if self.step % STOP_CHECK_EVERY:
            return False
        flag = torch.tensor(float(self.out_of_time), device=self.device)  # NCCL reduces only GPU tensors
        return bool(all_reduce_sum(flag).item() > 0)


def shape_text(shape: Iterable[int]) -> str:
    """A shape as people write it: 256x128, 32x32x32."""
    return "x".join(str(side) for side in shape)


def items_name(spatial_dims: int) -> str:
    """What the items of a data set are called in messages and figures."""
    return "volumes" if spatial_dims == 3 else "slices"


# ----------------------------------------------------------------------------- metrics

SSIM_WINDOW = 7  # skimage.metrics.structural_similarity defaults: 7x7 uniform window, sample covariance
SSIM_K1, SSIM_K2 = 0.01, 0.03


def ssim_per_image(images: torch.Tensor, references: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM of each image in a [B, C, H, W] batch (or volume in a [B, C, D, H, W] one), as skimage computes it
    (channels averaged; volumes with a 7x7x7 window, as skimage on 3D arrays).

    A valid (unpadded) 7x7 box filter equals skimage's reflect-padded filter followed by its border crop,
    so the mean over the valid region is exactly skimage's mean SSIM.
    """
    x, y = images.float(), references.float()
    spatial = x.shape[2:]
    if min(spatial) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs sides of at least {SSIM_WINDOW}, got {tuple(spatial)}")
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    count = SSIM_WINDOW ** len(spatial)
    covariance_norm = count / (count - 1)
    pool = F.avg_pool3d if len(spatial) == 3 else F.avg_pool2d

    def box(t: torch.Tensor) -> torch.Tensor:
        return pool(t, SSIM_WINDOW, stride=1)

    mean_x, mean_y = box(x), box(y)
    var_x = covariance_norm * (box(x * x) - mean_x * mean_x)
    var_y = covariance_norm * (box(y * y) - mean_y * mean_y)
    cov_xy = covariance_norm * (box(x * y) - mean_x * mean_y)
    numerator = (2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)
    denominator = (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
    return (numerator / denominator).flatten(1).mean(dim=1)


def psnr_per_image(images: torch.Tensor, references: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    mse = (images.float() - references.float()).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)
    return 10 * torch.log10(data_range**2 / mse)


def mae_per_image(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of each image (or volume) in a batch (in the [0, 1] intensity scale)."""
    return (images.float() - references.float()).abs().flatten(1).mean(dim=1)


def codebook_usage(code_counts: torch.Tensor) -> float:
    """Fraction of the codebook used at least once in the counted codes."""
    return (code_counts > 0).float().mean().item()


def perplexity(code_counts: torch.Tensor) -> float:
    """exp(entropy) of the code distribution: the effective number of codes in use."""
    total = code_counts.sum()
    if total == 0:
        return 0.0
    probabilities = code_counts.double() / total
    entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-30))).sum()
    return entropy.exp().item()


@torch.no_grad()
def evaluate_vqvae(model: VQVAE | VQVAE2, loader, description: str = "validate", ssim_weight: float = 0.0,
                   precision: str = "fp32") -> dict:
    """Loss (the training objective), SSIM, PSNR, MAE and code use of each level over a whole split, summed over
    all processes (see code_use for the keys of code use).

    Nothing is read back to the host until the end (a process whose share of the split is empty adds zeros)."""
    model.eval()
    device = loader.device
    sums = torch.zeros(4, device=device)  # loss, ssim, psnr, mae
    count, ssims = 0, []
    code_counts = torch.zeros(len(model.levels), model.config.num_embeddings, device=device)
    for images, _ in progress_bar(loader, desc=description, unit="batch"):
        with autocast(device, precision):
            reconstruction, codes, vq_loss = model(images)
        reconstruction = reconstruction.float().clamp(0, 1)
        ssim = ssim_per_image(reconstruction, images)
        loss = F.mse_loss(reconstruction, images, reduction="none").flatten(1).mean(dim=1) + ssim_weight * (1 - ssim)
        sums += torch.stack([(loss + vq_loss).sum(), ssim.sum(), psnr_per_image(reconstruction, images).sum(),
                             mae_per_image(reconstruction, images).sum()])
        count += len(images)
        ssims.append(ssim)
        code_counts += level_code_counts(codes, model.config.num_embeddings)
    totals = all_reduce_sum(torch.cat([sums, torch.tensor([float(count)], device=device), code_counts.flatten()]))
    loss, ssim_sum, psnr, mae, total = totals[:5].tolist()
    code_counts = totals[5:].view_as(code_counts)
    total = max(total, 1.0)
    return {"loss": loss / total, "ssim": ssim_sum / total, "psnr": psnr / total, "mae": mae / total,
            "ssim_per_image": torch.cat(ssims).cpu() if ssims else torch.zeros(0),
            **code_use(code_counts, model.levels), "code_counts": code_counts.cpu()}


def level_code_counts(codes: torch.Tensor | Sequence[torch.Tensor], num_codes: int) -> torch.Tensor:
    """How often each code occurs, per level [L, K], from a model's codes (one map or one per level)."""
    return torch.stack([count_codes(level, num_codes) for level in as_levels(codes)])


def level_suffixes(levels: Sequence[str]) -> list[str]:
    """Metric-name suffixes per level: none for one level (names as they always were), _top and _bottom for two."""
    return [""] if len(levels) == 1 else [f"_{name}" for name in levels]


def level_names(levels: Sequence[str]) -> list[tuple[str, str]]:
    """(metric-name suffix, label for printing) per level: ("", "") for one level, ("_top", "top ") and so on."""
    return [(suffix, f"{suffix[1:]} " if suffix else "") for suffix in level_suffixes(levels)]


def format_level_bits(report: dict, levels: Sequence[str]) -> str:
    """"; top 3.292; bottom 5.542" from a prior_report of several levels, "" for one."""
    return "".join(f"; {level} {report[f'bits_per_code_{level}']:.3f}" for level in levels
                   if f"bits_per_code_{level}" in report)


def code_use(code_counts: torch.Tensor, levels: Sequence[str]) -> dict:
    """perplexity and codebook_usage of each level, from counts [L, K] (suffixed per level: level_suffixes)."""
    use = {}
    for suffix, counts in zip(level_suffixes(levels), code_counts):
        use[f"perplexity{suffix}"] = perplexity(counts)
        use[f"codebook_usage{suffix}"] = codebook_usage(counts)
    return use


def class_log_prior(class_counts: Sequence[int]) -> list[float]:
    """log p(class) from the classes' training counts."""
    total = sum(max(count, 1) for count in class_counts)
    return [math.log(max(count, 1) / total) for count in class_counts]


def level_positions(stacked: torch.Tensor, levels: int) -> list[int]:
    """Codes per map of each level, from a batch (possibly empty) of stacked code maps."""
    return [maps.shape[-2] * maps.shape[-1] for maps in unstack_levels(stacked, levels)]


def prior_report(bits_per_level: Sequence[float], positions: Sequence[int], maps: float,
                 names: Sequence[str]) -> dict:
    """NLL in bits per code (over all levels, and per level when there are several) and in bits per image."""
    report = {"bits_per_code": sum(bits_per_level) / max(maps * sum(positions), 1.0),
              "bits_per_image": sum(bits_per_level) / max(maps, 1.0)}
    if len(names) > 1:
        report.update({f"bits_per_code_{name}": bits / max(maps * count, 1.0)
                       for name, bits, count in zip(names, bits_per_level, positions)})
    return report


@torch.no_grad()
def evaluate_prior(prior: GatedPixelCNN | HierarchicalPrior, loader, log_prior: Sequence[float] | None = None,
                   unlabelled=None, precision: str = "fp32") -> dict:
    """A split's negative log-likelihood under a prior, over all processes (see prior_report for the keys).

    Batches hold stacked code maps (stack_levels). For a class-conditional prior (log_prior = log p(class) given)
    the maps of `loader` are scored under their label, and those of `unlabelled` (maps with no class folder) under
    the class mixture (mixture_level_bits)."""
    prior.eval()
    device, names = loader.device, prior.levels
    totals, count = torch.zeros(len(names), device=device), 0
    for source, mixture in ((loader, False), (unlabelled, True)):
        for stacked, labels in progress_bar(source or [], desc="prior NLL", unit="batch"):
            maps = unstack_levels(stacked, len(names))
            with autocast(device, precision):
                if mixture:
                    bits = mixture_level_bits([prior.level_bits(maps, torch.full_like(labels, label))
                                               for label in range(len(log_prior))], log_prior)
                else:
                    bits = prior.level_bits(maps, None if log_prior is None else labels)
            totals += torch.stack([level.sum() for level in bits])
            count += len(labels)
    summed = all_reduce_sum(torch.cat([totals, torch.tensor([float(count)], device=device)])).tolist()
    return prior_report(summed[:-1], level_positions(loader.data, len(names)), summed[-1], names)


# ----------------------------------------------------------------------------- files

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_DEFAULT_FILE_MODE = 0o666 & ~_umask()  # what open() would have given the file; read once, at import


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) and move the result onto path in one step: a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(tmp_path, _DEFAULT_FILE_MODE)  # mkstemp makes files private (0600); others may need to read them
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Delete what atomic_write left of `path` in a run that was killed while writing it. Only the process that
    owns the file (holding its lock, or the only one writing it) may call this."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


@contextmanager
def file_lock(path: str | os.PathLike, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` while the block runs. Of several processes that would build the same
    cache (torchrun's ranks, or two jobs), one builds it and the others wait, then read it; the operating system
    releases the lock if its holder dies. Where locks are not to be had (Windows, a read-only folder, a file
    system without flock) the block runs unlocked, after a warning."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except OSError as error:
        warn(log, f"cannot create the lock file {path} ({error.strerror}); going on without it")
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            warn(log, f"waiting for another process to build {path.with_name(path.name[1:-5])}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:  # e.g. Lustre or NFS mounted without lock support
            warn(log, f"cannot lock {path} ({error.strerror}); going on without the lock")
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def warn(log: Callable[[str], None] | None, message: str) -> None:
    if log is not None:
        log(message)


def write_json(path: str | os.PathLike, values: dict) -> None:
    import json

    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(values, indent=2)))


def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> None:
    remove_stale_temporaries(path)  # left by a run killed while writing this file
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(path: str | os.PathLike, expected_kind: str | None = None) -> dict:
    """Load a checkpoint without running pickled code; every failure is a UsageError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: checkpoint file not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt, truncated or unsafe files
        text = str(error)
        if "Weights only load failed" in text or "Unsupported global" in text:
            reason = "it holds pickled Python objects, not only weights, and is refused (loading it could run code)"
        elif "zip archive" in text or "central directory" in text or "EOF" in text or "truncated" in text:
            reason = "the file is truncated or corrupt"
        else:
            reason = "it is not a checkpoint written by this tool"
        raise UsageError(f"{path}: cannot load checkpoint: {reason}") from None
    if not isinstance(checkpoint, dict) or "kind" not in checkpoint or "config" not in checkpoint:
        raise UsageError(f"{path}: not a checkpoint written by this tool (no kind/config entries)")
    if expected_kind is not None and checkpoint["kind"] != expected_kind:
        raise UsageError(f"{path}: is a {checkpoint['kind']} checkpoint, but a {expected_kind} checkpoint is needed")
    return checkpoint


def _rebuild(path: str | os.PathLike, build: Callable[[], torch.nn.Module], state: dict) -> torch.nn.Module:
    try:
        model = build()
        model.load_state_dict(state)
    except (ValueError, TypeError, RuntimeError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0][:160]
        raise UsageError(f"{path}: checkpoint does not match this version's model ({first_line})") from None
    return model


def load_vqvae(path: str | os.PathLike, device: torch.device, checkpoint: dict | None = None,
               ) -> tuple[VQVAE | VQVAE2, dict]:
    """Rebuild a VQ-VAE (one level or two) from its checkpoint alone (pass `checkpoint` when it is loaded)."""
    if checkpoint is None or checkpoint.get("kind") != "vqvae":
        checkpoint = load_checkpoint(path, expected_kind="vqvae")
    model = _rebuild(path, lambda: build_vqvae(VQVAEConfig.from_dict(checkpoint["config"])), checkpoint["model"])
    return model.to(device).eval(), checkpoint


def prior_configs(config: dict) -> list[PriorConfig]:
    """A prior checkpoint's config: one PriorConfig, or one per level ({"levels": [...]}) for a hierarchical prior."""
    return [PriorConfig.from_dict(level) for level in config["levels"]] if "levels" in config \
        else [PriorConfig.from_dict(config)]


def load_prior(path: str | os.PathLike, device: torch.device, vqvae_path: str | None = None,
               checkpoint: dict | None = None) -> tuple[GatedPixelCNN | HierarchicalPrior, dict, VQVAE | VQVAE2, dict]:
    """The prior, its checkpoint, and its VQ-VAE with its checkpoint, refusing a VQ-VAE whose codes differ."""
    if checkpoint is None:
        checkpoint = load_checkpoint(path, expected_kind="prior")
    prior = _rebuild(path, lambda: build_prior(prior_configs(checkpoint["config"])), checkpoint["model"])
    vqvae_path = vqvae_path or checkpoint["vqvae"]["path"]
    vqvae, vqvae_checkpoint = load_vqvae(vqvae_path, device)
    if weights_fingerprint(vqvae) != checkpoint["vqvae"]["fingerprint"]:
        raise UsageError(f"{path}: this prior was trained on the codes of another VQ-VAE than {vqvae_path} "
                         "(its weights differ); pass the right one with --vqvae or retrain the prior")
    return prior.to(device).eval(), checkpoint, vqvae, vqvae_checkpoint


def write_csv_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write all rows of a metrics table at once, atomically (a killed run never leaves a torn line)."""
    fields = list(dict.fromkeys(key for row in rows for key in row))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def read_csv_rows(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ----------------------------------------------------------------------------- figures

def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> None:
    plt = pyplot()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)


def _show_image(axis, image: torch.Tensor) -> None:
    """Show a [C, H, W] image in [0, 1] (grayscale for one channel), or an [H, W, 3] colour picture."""
    array = image.detach().float().clamp(0, 1).cpu().numpy()
    if array.ndim == 3 and array.shape[-1] == 3:
        axis.imshow(array, interpolation="nearest")
    elif array.shape[0] == 1:
        axis.imshow(array[0], cmap="gray", vmin=0, vmax=1)
    else:
        axis.imshow(np.transpose(array, (1, 2, 0)))
    axis.set_xticks([])
    axis.set_yticks([])


def code_colours(code_vectors: torch.Tensor) -> torch.Tensor:
    """An RGB colour [K, 3] per code: the first three principal components of the code vectors [K, D] around
    mid-grey, all three scaled alike (so the main directions of variation dominate). Codes with similar vectors get
    similar colours, so a code map shows the structure the model learned."""
    vectors = code_vectors.detach().float().cpu()
    centred = vectors - vectors.mean(0)
    _, _, components = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ components[:3].t()
    if projected.shape[1] < 3:
        projected = F.pad(projected, (0, 3 - projected.shape[1]))
    spread = projected.abs().flatten().quantile(0.99).clamp_min(1e-8)
    return (0.5 + 0.5 * projected / spread).clamp(0, 1)


def _figure_for(rows: int, columns: int, example: torch.Tensor, width: float, title: str):
    """A figure whose panels have the images' aspect ratio, laid out to fill its canvas (no blank bands)."""
    plt = pyplot()
    height = width * example.shape[-2] / example.shape[-1]
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows + (0.35 if title else 0)),
                             squeeze=False, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.02, hspace=0.02)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, axes


PLANES = ("axial", "coronal", "sagittal")


def mid_planes(volume: torch.Tensor) -> list[torch.Tensor]:
    """The axial, coronal and sagittal mid-planes of a volume [..., X, Y, Z] in RAS order (an image [C, X, Y, Z]
    or a code map [x, y, z]), each turned for display: superior up (anterior up in the axial plane)."""
    return [volume.select(axis, volume.shape[axis] // 2).transpose(-1, -2).flip(-2) for axis in (-1, -2, -3)]


def save_examples(path: str | os.PathLike, columns: dict[str, torch.Tensor], spatial_dims: int, title: str = "",
                  code_colours: dict[str, torch.Tensor] | None = None) -> None:
    """save_image_rows of batches of images, or of volumes: then one row per (volume, mid-plane)."""
    if spatial_dims == 2:
        save_image_rows(path, columns, title, code_colours)
        return
    planes = {name: [plane for item in column for plane in mid_planes(item)] for name, column in columns.items()}
    count = len(next(iter(columns.values())))
    labels = [f"volume {index + 1}, {plane}" for index in range(count) for plane in PLANES]
    save_image_rows(path, planes, title, code_colours, row_labels=labels)


def save_image_rows(path: str | os.PathLike, columns: dict[str, Sequence[torch.Tensor]], title: str = "",
                    code_colours: dict[str, torch.Tensor] | None = None,
                    row_labels: Sequence[str] | None = None) -> None:
    """One row per example, one column per named image list. Columns named in code_colours hold code maps, drawn
    with those colours [K, 3], one per code (see code_colours)."""
    code_colours = code_colours or {}
    names = list(columns)
    first = columns[names[0]][0]
    fig, axes = _figure_for(len(columns[names[0]]), len(names), first, 1.8, title)
    for column, name in enumerate(names):
        for row, item in enumerate(columns[name]):
            axis = axes[row][column]
            if name in code_colours:
                _show_image(axis, code_colours[name][item.long().cpu()])
            else:
                _show_image(axis, item)
            if row == 0:
                axis.set_title(name, fontsize=9)
            if column == 0 and row_labels:
                axis.set_ylabel(row_labels[row], fontsize=8)
    save_figure(fig, path)


@torch.no_grad()
def save_reconstructions(path: str | os.PathLike, model: VQVAE | VQVAE2, images: torch.Tensor, title: str) -> None:
    """input | code map (one per level) | reconstruction, one row per image."""
    model.eval()
    reconstruction, codes, _ = model(images)
    maps = code_columns(model, as_levels(codes))
    save_examples(path, {"input": images, **maps, "reconstruction": reconstruction}, model.config.spatial_dims,
                  title, model_code_colours(model, list(maps)))


def code_columns(model: VQVAE | VQVAE2, codes: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Figure columns of code maps, one per level: "codes", or "top codes" and "bottom codes"."""
    names = ["codes"] if len(model.levels) == 1 else [f"{level} codes" for level in model.levels]
    return dict(zip(names, codes))


def model_code_colours(model: VQVAE | VQVAE2, columns: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per code-map column, code_colours of the vectors the decoder receives for that level's codes."""
    with torch.no_grad():
        return {column: code_colours(quantizer.output_vectors())
                for column, quantizer in zip(columns, model.quantizers)}


def save_image_grid(path: str | os.PathLike, images: torch.Tensor, columns: int = 8, title: str = "") -> None:
    rows = (len(images) + columns - 1) // columns
    fig, axes = _figure_for(rows, columns, images[0], 1.4, title)
    for index, axis in enumerate(axes.flat):
        if index < len(images):
            _show_image(axis, images[index])
        else:
            axis.axis("off")
    save_figure(fig, path)


def save_gif(path: str | os.PathLike, frames: Sequence[str | os.PathLike], seconds_per_frame: float = 0.6) -> None:
    """An animated GIF of PNG frames (padded to the largest), the last one held longer."""
    from PIL import Image

    if not frames:
        return
    images = []
    for frame in frames:
        with Image.open(frame) as image:
            images.append(image.convert("RGB"))
    width, height = max(image.width for image in images), max(image.height for image in images)
    padded = []
    for image in images:
        canvas = Image.new("RGB", (width, height), "white")
        canvas.paste(image, (0, 0))
        padded.append(canvas.quantize(colors=255))
    durations = [int(seconds_per_frame * 1000)] * (len(padded) - 1) + [int(seconds_per_frame * 4000)]
    atomic_write(path, lambda tmp: padded[0].save(tmp, format="GIF", save_all=True, append_images=padded[1:],
                                                  duration=durations, loop=0))


def save_histogram(path: str | os.PathLike, values: np.ndarray, title: str, xlabel: str, bins: int = 40) -> None:
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(5, 3.2), layout="constrained")
    axis.hist(values, bins=bins, color="#3b6ea8")
    axis.set_title(title, fontsize=10)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("count")
    save_figure(fig, path)


def save_code_usage_figure(path: str | os.PathLike, code_counts: torch.Tensor, levels: Sequence[str],
                           title: str) -> None:
    """How often each code was used, sorted, one panel per level (counts [L, K])."""
    plt = pyplot()
    counts = code_counts.view(-1, code_counts.shape[-1]).cpu().numpy()
    fig, axes = plt.subplots(1, len(counts), figsize=(6 * len(counts), 3.2), squeeze=False, layout="constrained")
    for axis, level, level_counts in zip(axes[0], levels, counts):
        ordered = np.sort(level_counts)[::-1]
        axis.bar(np.arange(len(ordered)), ordered, width=1.0, color="#3b6ea8")
        axis.set_yscale("symlog")
        usage = (level_counts > 0).mean()
        axis.set_title(f"{level}: {usage:.0%} of the codes used" if len(counts) > 1 else f"{usage:.0%} of the codes "
                       "used", fontsize=10)
        axis.set_xlabel("code (sorted by use)")
        axis.set_ylabel("times used")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


@torch.no_grad()
def save_level_contributions(path: str | os.PathLike, model: VQVAE2, images: torch.Tensor,
                             code_counts: torch.Tensor, title: str) -> None:
    """input | both levels | each level alone: decoded with the other levels' codes all set to their mean vector
    (weighted by how often each code was used), so a user sees what each level carries | the top's own image."""
    model.eval()
    quantized = [quantizer.lookup(codes) for quantizer, codes in zip(model.quantizers, model.code_maps(images))]
    means = []
    for quantizer, counts in zip(model.quantizers, code_counts.to(images.device)):
        vectors = quantizer.output_vectors()
        means.append((counts[:, None] * vectors).sum(0) / counts.sum().clamp_min(1))
    columns = {"input": images, "both levels": model.decode_levels(quantized)}
    for kept, level in enumerate(model.levels):
        levels = [vectors if index == kept else mean.view(1, -1, *[1] * (vectors.dim() - 2)).expand_as(vectors)
                  for index, (vectors, mean) in enumerate(zip(quantized, means))]
        columns[f"{level} only"] = model.decode_levels(levels)
    top_image = model.top_image(quantized[0])
    if top_image is not None:
        columns["top's own image"] = F.interpolate(top_image, size=images.shape[2:], mode="nearest")
    save_examples(path, {name: column.float().clamp(0, 1) for name, column in columns.items()},
                  model.config.spatial_dims, title)


def save_training_curves(path: str | os.PathLike, rows: list[dict], panels: dict[str, Sequence[str]]) -> None:
    """One panel per entry of `panels` (title -> metric columns), each metric plotted against epoch."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False,
                             layout="constrained")
    for axis, (title, metrics) in zip(axes[0], panels.items()):
        for metric in metrics:
            points = [(float(row["epoch"]), float(row[metric])) for row in rows if row.get(metric) not in (None, "")]
            if points:  # rows of an older version may lack a metric: each value stays at its own epoch
                axis.plot(*zip(*points), marker="o", markersize=3, label=metric)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("epoch")
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    save_figure(fig, path)
