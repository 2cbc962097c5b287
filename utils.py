"""Metrics, figures, checkpoints, seeding and the one error type users see."""
from __future__ import annotations

import csv
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F


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


def rng_state() -> dict:
    """Every random generator's state, in types that load with weights_only=True."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all processes (in place); a no-op in a single process."""
    if is_distributed():
        torch.distributed.all_reduce(tensor)
    return tensor


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


# ----------------------------------------------------------------------------- metrics

SSIM_WINDOW = 7  # skimage.metrics.structural_similarity defaults: 7x7 uniform window, sample covariance
SSIM_K1, SSIM_K2 = 0.01, 0.03


def ssim_per_image(images: torch.Tensor, references: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM of each image in a [B, C, H, W] batch, as skimage computes it (channels averaged).

    A valid (unpadded) 7x7 box filter equals skimage's reflect-padded filter followed by its border crop,
    so the mean over the valid region is exactly skimage's mean SSIM.
    """
    x, y = images.float(), references.float()
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(x.shape[-2:])}")
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    count = SSIM_WINDOW * SSIM_WINDOW
    covariance_norm = count / (count - 1)

    def box(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, SSIM_WINDOW, stride=1)

    mean_x, mean_y = box(x), box(y)
    var_x = covariance_norm * (box(x * x) - mean_x * mean_x)
    var_y = covariance_norm * (box(y * y) - mean_y * mean_y)
    cov_xy = covariance_norm * (box(x * y) - mean_x * mean_y)
    numerator = (2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)
    denominator = (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
    return (numerator / denominator).mean(dim=(1, 2, 3))


def psnr_per_image(images: torch.Tensor, references: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    mse = (images.float() - references.float()).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return 10 * torch.log10(data_range**2 / mse)


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


# ----------------------------------------------------------------------------- files

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
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def write_json(path: str | os.PathLike, values: dict) -> None:
    import json

    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(values, indent=2)))


def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> None:
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a run killed while writing this file
        stale.unlink(missing_ok=True)
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
    """Show a [C, H, W] image in [0, 1] (grayscale for one channel)."""
    array = image.detach().float().clamp(0, 1).cpu().numpy()
    if array.shape[0] == 1:
        axis.imshow(array[0], cmap="gray", vmin=0, vmax=1)
    else:
        axis.imshow(np.transpose(array, (1, 2, 0)))
    axis.set_xticks([])
    axis.set_yticks([])


def save_image_rows(path: str | os.PathLike, columns: dict[str, Sequence[torch.Tensor]], title: str = "",
                    code_columns: Sequence[str] = (), num_codes: int = 0) -> None:
    """One row per example, one column per named image list; code maps are shown with a categorical colour map."""
    plt = pyplot()
    names = list(columns)
    rows = len(columns[names[0]])
    fig, axes = plt.subplots(rows, len(names), figsize=(2.2 * len(names), 2.2 * rows), squeeze=False)
    for column, name in enumerate(names):
        for row in range(rows):
            axis = axes[row][column]
            item = columns[name][row]
            if name in code_columns:
                axis.imshow(item.cpu().numpy(), cmap="nipy_spectral", vmin=0, vmax=max(num_codes - 1, 1),
                            interpolation="nearest")
                axis.set_xticks([])
                axis.set_yticks([])
            else:
                _show_image(axis, item)
            if row == 0:
                axis.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def save_image_grid(path: str | os.PathLike, images: torch.Tensor, columns: int = 8, title: str = "") -> None:
    plt = pyplot()
    rows = (len(images) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.6 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        if index < len(images):
            _show_image(axis, images[index])
        else:
            axis.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def save_histogram(path: str | os.PathLike, values: np.ndarray, title: str, xlabel: str, bins: int = 40) -> None:
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(5, 3.2))
    axis.hist(values, bins=bins, color="#3b6ea8")
    axis.set_title(title, fontsize=10)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("count")
    save_figure(fig, path)


def save_code_usage_figure(path: str | os.PathLike, code_counts: torch.Tensor, title: str) -> None:
    plt = pyplot()
    counts = np.sort(code_counts.cpu().numpy())[::-1]
    fig, axis = plt.subplots(figsize=(6, 3.2))
    axis.bar(np.arange(len(counts)), counts, width=1.0, color="#3b6ea8")
    axis.set_yscale("symlog")
    axis.set_title(title, fontsize=10)
    axis.set_xlabel("code (sorted by use)")
    axis.set_ylabel("times used")
    save_figure(fig, path)


def save_training_curves(path: str | os.PathLike, rows: list[dict], panels: dict[str, Sequence[str]]) -> None:
    """One panel per entry of `panels` (title -> metric columns), each metric plotted against epoch."""
    plt = pyplot()
    epochs = [float(row["epoch"]) for row in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for axis, (title, metrics) in zip(axes[0], panels.items()):
        for metric in metrics:
            values = [float(row[metric]) for row in rows if row.get(metric) not in (None, "")]
            if values:
                axis.plot(epochs[: len(values)], values, marker="o", markersize=3, label=metric)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("epoch")
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    save_figure(fig, path)
