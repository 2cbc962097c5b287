"""Every figure the jobs draw: reconstructions and code maps, samples, volumes' mid-planes, histograms, code use,
what each level carries, training curves, GIFs. Written atomically, drawn off-screen (Agg)."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from modules import VQVAE, VQVAE2, as_levels
from utils import atomic_write


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


def save_histogram(path: str | os.PathLike, values: np.ndarray | dict[str, np.ndarray], title: str, xlabel: str,
                   bins: int = 40) -> None:
    """A histogram of values, or of several named groups of them on shared bins (one colour each, a legend)."""
    plt = pyplot()
    groups = values if isinstance(values, dict) else {"": values}
    edges = np.histogram_bin_edges(np.concatenate([np.asarray(group) for group in groups.values()]), bins=bins)
    fig, axis = plt.subplots(figsize=(5, 3.2), layout="constrained")
    for name, group in groups.items():
        axis.hist(group, bins=edges, alpha=0.55 if len(groups) > 1 else 1.0, label=name or None,
                  color=None if len(groups) > 1 else "#3b6ea8")
    if len(groups) > 1:
        axis.legend(fontsize=8)
    axis.set_title(title, fontsize=10)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("count")
    save_figure(fig, path)


def save_anomaly_examples(path: str | os.PathLike, images: torch.Tensor, healed: torch.Tensor, maps: torch.Tensor,
                          row_labels: Sequence[str], title: str = "") -> None:
    """input | healed | anomaly map over the input, one row per image (images, healed [B, C, H, W]; maps [B, H, W],
    all drawn on one colour scale, its lowest 30% left transparent)."""
    fig, axes = _figure_for(len(images), 3, images[0], 1.8, title)
    top = float(maps.max()) or 1.0
    for row, (image, healed_image, values) in enumerate(zip(images, healed, maps)):
        _show_image(axes[row][0], image)
        _show_image(axes[row][1], healed_image)
        _show_image(axes[row][2], image)
        shown = np.ma.masked_less(values.float().cpu().numpy(), 0.3 * top)
        axes[row][2].imshow(shown, cmap="inferno", vmin=0, vmax=top, alpha=0.75, interpolation="bilinear")
        axes[row][0].set_ylabel(row_labels[row], fontsize=7)
    for column, name in enumerate(("input", "healed", "anomaly map")):
        axes[0][column].set_title(name, fontsize=9)
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


def save_rate_distortion(path: str | os.PathLike, points: list[dict]) -> None:
    """SSIM against bits per pixel, one curve per codec (points: dicts with codec, bpp and ssim)."""
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(6, 4), layout="constrained")
    for codec in dict.fromkeys(point["codec"] for point in points):
        mine = sorted((point["bpp"], point["ssim"]) for point in points if point["codec"] == codec)
        axis.plot(*zip(*mine), marker="o", markersize=4, label=codec)
    axis.set_xscale("log")
    low, high = axis.get_xlim()
    ticks = [tick for tick in (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8) if low <= tick <= high]
    axis.set_xticks(ticks, [f"{tick:g}" for tick in ticks])
    axis.set_xticks([], minor=True)  # the default minor labels of a log axis overlap at these rates
    axis.set_xlabel("bits per pixel")
    axis.set_ylabel("mean SSIM")
    axis.set_title("rate against quality (JPEG: entropy-coded data only)", fontsize=10)
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    save_figure(fig, path)


def save_probe_figure(path: str | os.PathLike, fractions: Sequence[float],
                      curves: dict[str, tuple[Sequence[float], Sequence[float], bool]],
                      classes: dict[str, torch.Tensor], split: str, projected_set: str,
                      title: str = "linear probe: mean and standard deviation over label draws") -> None:
    """Accuracy against the share of labels used (curves: name -> (means, standard deviations, is a baseline)),
    beside the features of each class projected to 2D (classes: name -> points [N, 2]; none: no second panel)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if classes else 1, figsize=(11 if classes else 6, 4.2), layout="constrained",
                             squeeze=False)
    accuracy_axis = axes[0, 0]
    for name, (means, stds, baseline) in curves.items():
        accuracy_axis.errorbar(fractions, means, yerr=stds, marker="o", markersize=3, capsize=3,
                               linestyle="--" if baseline else "-", label=name)
    accuracy_axis.set_xscale("log")
    accuracy_axis.set_xlabel("% of training labels used")
    accuracy_axis.set_ylabel(f"accuracy on the {split} split")
    accuracy_axis.set_title(title, fontsize=10)
    accuracy_axis.legend(fontsize=7)
    accuracy_axis.grid(alpha=0.3)
    if classes:
        pca_axis = axes[0, 1]
        for name, points in classes.items():
            points = points.numpy()
            pca_axis.scatter(points[:, 0], points[:, 1], s=6, alpha=0.6, label=name)
        pca_axis.set_title(f"PCA of the {projected_set} features ({split} split)", fontsize=10)
        pca_axis.legend(fontsize=8, markerscale=2)
    save_figure(fig, path)
