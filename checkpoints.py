"""Checkpoints: written whole, loaded without running pickled code, models rebuilt from them alone, and the data a
checkpoint was trained on found again."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from classifier import Classifier, ClassifierConfig
from dataset import DataSource, SliceSet, dataset_folders, find_data, list_images, load_split
from demo import make_demo_data
from modules import VQVAE, VQVAE2, VQVAEConfig, build_vqvae, weights_fingerprint
from priors import build_prior, prior_configs
from readers import NIFTI_SUFFIXES, PICTURE_SUFFIXES, Preprocessing
from utils import UsageError, atomic_write, remove_stale_temporaries

Log = Callable[[str], None]


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


def load_classifier(path: str | os.PathLike, device: torch.device) -> tuple[Classifier, dict]:
    """Rebuild a classifier (finetune.py) from its checkpoint alone."""
    checkpoint = load_checkpoint(path, expected_kind="classifier")
    model = _rebuild(path, lambda: Classifier(ClassifierConfig.from_dict(checkpoint["config"])), checkpoint["model"])
    return model.to(device).eval(), checkpoint


def load_prior(path: str | os.PathLike, device: torch.device, vqvae_path: str | None = None,
               checkpoint: dict | None = None) -> tuple[torch.nn.Module, dict, VQVAE | VQVAE2, dict]:
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


def checkpoint_data(checkpoint: dict, override: str | None = None, log: Log = print,
                    require_train: bool = True) -> DataSource:
    """The splits a VQ-VAE checkpoint was trained with: its data folder (or `override`), with the validation split
    carved from the training folder as it was then (require_train=False: a data set may lack a train split)."""
    recorded = checkpoint.get("data", {})
    source = find_data(data_dir_of(checkpoint, override, log), recorded.get("val_fraction", 0.1), require_train)
    if source.carved and "val_fraction" not in recorded:
        log("warning: this checkpoint was trained before validation splits were carved by case: the validation split"
            " is carved anew and may hold files the model trained on")
    return source


def evaluation_data(checkpoint: dict, override: str | None = None, log: Log = print) -> DataSource:
    """What to evaluate a VQ-VAE checkpoint on: its own splits (checkpoint_data), or another data folder's (with
    `override`). A single file, or a folder with no split folders other than the checkpoint's own, is evaluated
    whole, as its "test" split."""
    path = None if override is None else Path(override).expanduser().resolve()
    if path is not None and path.is_file():
        return DataSource(path.parent, {"test": [(path, "")]}, [f"evaluating the single file {path}"])
    own_root = Path(checkpoint.get("data", {}).get("root", "/"))
    # A folder named like the checkpoint's own is taken for that data, moved: its own carve-out is evaluated.
    if path is not None and path.is_dir() and path.name != own_root.name and not dataset_folders(path):
        files = list_images(path)
        if not files:
            raise UsageError(f"{path}: no images found (looked for {', '.join(NIFTI_SUFFIXES + PICTURE_SUFFIXES)})")
        return DataSource(path, {"test": files}, [f"no split folders in {path}: evaluating all its {len(files)} files"])
    return checkpoint_data(checkpoint, override, log, require_train=False)


def evaluation_slices(checkpoint: dict, data: str | None, split: str, cache_dir: str | os.PathLike, min_side: int,
                      log: Log = print) -> tuple[DataSource, SliceSet, Preprocessing]:
    """The slices a job evaluates with a VQ-VAE checkpoint: evaluation_data's `split` (test falls back to validate),
    decoded with the checkpoint's preprocessing; with the data source and the preprocessing."""
    prep = Preprocessing.from_dict(checkpoint["preprocessing"])
    source = evaluation_data(checkpoint, data, log)
    for note in source.notes[:1] if data else []:
        log(note)
    slices = load_split(source, source.evaluated_split(split, log), prep, cache_dir, min_side=min_side, log=log)
    return source, slices, prep


def labelled_splits(checkpoint: dict, data: str | None, splits: Sequence[str], cache_dir: str | os.PathLike,
                    log: Log = print) -> dict[str, SliceSet]:
    """The splits a classifier trains and is tested on, of the checkpoint's data (or `data`), decoded with its
    preprocessing; refusing a folder whose images are not all in class folders, or that lacks a split."""
    source = checkpoint_data(checkpoint, data, log)
    names = source.class_names
    prep = Preprocessing.from_dict(checkpoint["preprocessing"])
    min_side = VQVAEConfig.from_dict(checkpoint["config"]).image_multiple  # the cache the other jobs use
    loaded = {split: load_split(source, split, prep, cache_dir, min_side, log) for split in splits}
    if len(names) < 2 or any(bool((slices.labels < 0).any()) for slices in loaded.values()):
        raise UsageError(f"{source.root}: a classifier needs every image in a class folder, and two classes or more "
                         "(train/<class>/*.png)")
    return loaded


def data_dir_of(checkpoint: dict, override: str | None = None, log: Log = print) -> Path:
    """The data folder a checkpoint was trained on (or `override`), regenerating the demo data if it is gone."""
    if override is not None:
        return Path(override)
    recorded = checkpoint.get("data", {})
    if "root" not in recorded:
        raise UsageError("the checkpoint does not record its data folder: pass --data")
    if recorded.get("demo"):  # regenerated if deleted: it is deterministic
        volumes = checkpoint.get("preprocessing", {}).get("spatial_dims", 2) == 3
        return make_demo_data(Path(recorded["root"]).parent, log=log, volumes=volumes)
    return Path(recorded["root"])


