"""A trained VQ-VAE's code maps of a split, computed once and cached, and the batches priors train and are
evaluated on."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dataset import BatchLoader, SliceSet
from modules import weights_fingerprint
from utils import atomic_write, build_once, progress_bar

Log = Callable[[str], None]


def to_codes(stored: torch.Tensor) -> torch.Tensor:
    return stored.long()


def code_loader(codes: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool, device: torch.device,
                seed: int = 0, rank: int = 0, world_size: int = 1) -> BatchLoader:
    """Batches of code maps (stored compactly, as int16) as long tensors."""
    return BatchLoader(codes, labels, batch_size, shuffle, device, seed, convert=to_codes, rank=rank,
                       world_size=world_size, drop_last=shuffle and len(codes) > batch_size * world_size)


@torch.no_grad()
def encode_split(model: torch.nn.Module, slices: SliceSet, device: torch.device, cache_dir: str | Path,
                 batch_size: int = 128, log: Log = print) -> list[torch.Tensor]:
    """Code maps of a split, one tensor [N, h, w] per level of the model (int16, or int32 for codebooks over
    32767), computed once per (data, model) and cached on disk, built once like the slices. `model` has
    code_maps(images), levels and config.num_embeddings."""
    path = Path(cache_dir) / f"codes-{slices.name}-{slices.cache_key}-{weights_fingerprint(model)}.npz"
    dtype = torch.int16 if model.config.num_embeddings <= 32767 else torch.int32

    def encode() -> None:
        model.eval()
        loader = BatchLoader(slices.images, slices.labels, batch_size, shuffle=False, device=device)
        levels: list[list[torch.Tensor]] = [[] for _ in model.levels]
        for images, _ in progress_bar(loader, desc=f"encoding {slices.name}", unit="batch"):
            for stored, codes in zip(levels, model.code_maps(images)):
                stored.append(codes.to("cpu", dtype))
        arrays = {f"level{index}": torch.cat(level).numpy() for index, level in enumerate(levels)}

        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)

        atomic_write(path, write)

    build_once(path.exists, encode, [path], log)
    with np.load(path) as stored:
        return [torch.from_numpy(stored[f"level{index}"]) for index in range(len(model.levels))]


def prior_evaluation_loaders(codes: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device,
                             conditional: bool, rank: int = 0, world_size: int = 1,
                             ) -> tuple[BatchLoader, BatchLoader | None]:
    """Evaluation batches of code maps for a prior: all of them; for a class-conditional prior, those with a class
    label, and apart those without one (None when every map has one), which are scored under the class mixture."""
    shards = {"rank": rank, "world_size": world_size}
    if not conditional:
        return code_loader(codes, labels, batch_size, False, device, **shards), None
    has_label = labels >= 0
    unlabelled = None
    if not bool(has_label.all()):
        unlabelled = code_loader(codes[~has_label], labels[~has_label], batch_size, False, device, **shards)
    return code_loader(codes[has_label], labels[has_label], batch_size, False, device, **shards), unlabelled


