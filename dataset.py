"""Folders on disk to tensors: finding the splits of a data folder (HipMRI, OASIS and generic layouts), decoding
every file once into a memory-mapped uint8 cache, and batching it onto the training device."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from readers import NIFTI_SUFFIXES, PICTURE_SUFFIXES, BadFile, Preprocessing, preprocess_file
from utils import UsageError, atomic_write, build_once, progress_bar

SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validate": ("val", "valid", "validate", "validation"),
    "test": ("test", "testing"),
}

CACHE_VERSION = 1
Log = Callable[[str], None]


@dataclass
class SliceSet:
    """The preprocessed slices of one split: uint8 images [N, C, H, W] (volumes: [N, C, D, H, W]) and their labels
    (-1 = no class folder)."""

    images: torch.Tensor
    labels: torch.Tensor
    sources: list[str]  # the file each slice came from (with ":slice" for volumes)
    class_names: list[str]
    name: str = ""
    cache_key: str = ""  # identifies the files and preprocessing, for caches derived from these slices

    def __len__(self) -> int:
        return len(self.images)

    def as_float(self, index: slice | torch.Tensor) -> torch.Tensor:
        return self.images[index].float().div_(255)


@dataclass
class DataSource:
    """Where each split's files are, found from one --data folder."""

    root: Path
    files: dict[str, list[tuple[Path, str]]]  # split -> [(file, class name or "")]
    notes: list[str] = field(default_factory=list)
    carved: bool = False  # the validation split was held out of the training folder

    @property
    def class_names(self) -> list[str]:
        return sorted({label for files in self.files.values() for _, label in files if label})

    def only_classes(self, names: Sequence[str]) -> "DataSource":
        """The same splits holding only the files of these class folders (a prior of normal anatomy: the normal
        class of a labelled set)."""
        if not self.class_names:
            raise UsageError(f"{self.root}: --classes {' '.join(names)}: the data has no class folders")
        unknown = [name for name in names if name not in self.class_names]
        if unknown:
            raise UsageError(f"{self.root}: --classes {' '.join(unknown)}: no such class folder (the classes are "
                             f"{', '.join(self.class_names)})")
        files = {split: [item for item in listed if item[1] in names] for split, listed in self.files.items()}
        kept = ", ".join(f"{split} {len(listed)}" for split, listed in files.items())
        return DataSource(self.root, {split: listed for split, listed in files.items() if listed},
                          [*self.notes, f"keeping the classes {', '.join(names)} only ({kept} files)"], self.carved)

    def evaluated_split(self, wanted: str, log: Log = print) -> str:
        """The split a job evaluates when `wanted` is asked for: test falls back to validate when there is none."""
        if wanted in self.files:
            return wanted
        if wanted == "test":
            log("no test split: evaluating on the validation split instead")
            return "validate"
        raise UsageError(f"the data has no {wanted} split")

    def split_files(self, split: str) -> list[tuple[Path, str]]:
        """The files of one split; a split that is not there is a UsageError saying why."""
        if split in self.files:
            return self.files[split]
        if split == "validate" and len(self.files.get("train", [])) == 1:
            raise UsageError(f"{self.root}: only one training image and no validation split; need at least two images")
        raise UsageError(f"{self.root}: has no {split} split")


# ----------------------------------------------------------------------------- finding files

def _is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(NIFTI_SUFFIXES + PICTURE_SUFFIXES) and not name.startswith(".")


def _visible(name: str) -> bool:
    """Not a dot-folder, nor the resource forks an archive made on a Mac carries (__MACOSX/)."""
    return not name.startswith(".") and name != "__MACOSX"


def _named_like_a_file(folder_name: str) -> bool:
    """Some unzip tools leave each case_x.nii.gz as a folder case_x.nii/ holding case_x.nii: that folder is the
    file, never a class."""
    return folder_name.lower().endswith(NIFTI_SUFFIXES + PICTURE_SUFFIXES)


def _split_of(folder_name: str) -> str | None:
    name = folder_name.lower()
    if "seg" in name:  # segmentation masks, never training images
        return None
    for split, aliases in SPLIT_ALIASES.items():
        if any(name == alias or name.endswith(("_" + alias, "-" + alias)) for alias in aliases):
            return split
    return None


def _subfolders(folder: Path) -> list[Path]:
    return sorted(child for child in folder.iterdir() if child.is_dir() and _visible(child.name)
                  and not _named_like_a_file(child.name))


def list_images(folder: Path) -> list[tuple[Path, str]]:
    """Image files under a split folder, with the class subfolder (first level) as label; skips 'seg' folders,
    dot-folders and __MACOSX/, and takes a folder named like an image file for that file."""
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        folders = relative.parts[:-1]
        if not path.is_file() or not _is_image_file(path) or any(
                "seg" in part.lower() or not _visible(part) for part in folders):
            continue
        classes = [part for part in folders if not _named_like_a_file(part)]
        found.append((path, classes[0] if classes else ""))
    return found


def logical_path(relative: Path) -> Path:
    """A file's path as its user named it: case_x.nii/case_x.nii (an unzipped case_x.nii.gz) is case_x.nii."""
    return relative.parent if _named_like_a_file(relative.parent.name) else relative


def split_folders(root: Path) -> dict[str, Path]:
    """The split folders directly inside root, by split."""
    folders: dict[str, Path] = {}
    for child in _subfolders(root):
        split = _split_of(child.name)
        if split is None:
            continue
        if split in folders:
            raise UsageError(f"{root}: both '{folders[split].name}' and '{child.name}' look like the {split} split; "
                             "point --data at a folder with one of each")
        folders[split] = child
    return folders


def dataset_folders(root: Path) -> list[Path]:
    """The folders, root itself or at most two levels below it, that hold split folders: the data sets under root
    (HipMRI_study_keras_slices_data/ in the folder its archive was unpacked to, for example)."""
    if split_folders(root):
        return [root]
    found = []
    for child in _subfolders(root):
        found += [child] if split_folders(child) else [folder for folder in _subfolders(child) if split_folders(folder)]
    return found


def _deeper_split_folders(root: Path) -> list[Path]:
    """Split-named folders anywhere below root (visible ones only)."""
    found = []
    for folder, children, _ in os.walk(root):
        children[:] = sorted(child for child in children if _visible(child) and not _named_like_a_file(child))
        found += [Path(folder) / child for child in children if _split_of(child)]
    return found


# A subject's id at the start of a file name (case_004_week_0_slice_0.nii.gz -> case_004), else what comes before
# "_slice" (scan7_slice_12.png -> scan7).

CASE_ID = re.compile(r"^((?:case|subject|sub|patient|pat)[-_]?\d+)", re.IGNORECASE)


def case_id(relative_path: Path) -> str | None:
    """The case (subject) a slice file belongs to, from its name, with its class folder; None when the name
    carries none."""
    name = relative_path.name
    match = CASE_ID.match(name)
    if match:
        case = match.group(1)
    else:
        position = name.lower().find("_slice")
        if position <= 0:
            return None
        case = name[:position]
    return str(relative_path.parent / case)


def _hash_rank(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()


def _carve_validation(files: list[tuple[Path, str]], fraction: float, root: Path) -> tuple[list, list, str]:
    """Hold out about `fraction` of the files as validation, whole cases at a time: slices of one case never land
    on both sides. Deterministic: cases (or files, when the names carry no case id) are ranked by a hash of their
    path relative to the data folder, so the carve-out never depends on order or seed."""
    groups: dict[str, list[Path]] = {}
    for path, _ in files:
        relative = logical_path(path.relative_to(root))
        groups.setdefault(case_id(relative) or str(relative), []).append(path)
    if len(groups) < 2:  # one case only: nothing to keep apart, so hold out single files
        groups = {str(path.relative_to(root)): [path] for path, _ in files}
    target = min(max(1, round(fraction * len(files))), len(files) - 1)
    held_out: set[Path] = set()
    held_groups = 0
    for key in sorted(groups, key=_hash_rank):
        if len(held_out) >= target or held_groups == len(groups) - 1:
            break
        held_out.update(groups[key])
        held_groups += 1
    how = (f"{held_groups} of {len(groups)} cases, grouped by the case id in the file names "
           f"(e.g. {next(iter(groups))})" if len(groups) < len(files) else "single files")
    note = (f"no validation split: holding out {len(held_out)} of {len(files)} training files "
            f"({len(held_out) / len(files):.0%}: {how}), chosen by a hash of their path, the same every run")
    return [f for f in files if f[0] not in held_out], [f for f in files if f[0] in held_out], note


def _one_data_set(root: Path, notes: list[str]) -> Path:
    """The data set under root: root itself, or the one folder at most two levels down that holds split folders."""
    candidates = dataset_folders(root)
    if len(candidates) > 1:
        names = ", ".join(f"{folder.relative_to(root)}/" for folder in candidates)
        raise UsageError(f"{root}: holds {len(candidates)} data sets ({names}); point --data at one of them")
    if candidates and candidates[0] != root:
        notes.append(f"data set found in {candidates[0]}")
        return candidates[0]
    return root


def find_data(data_dir: str | Path, val_fraction: float = 0.1, require_train: bool = True) -> DataSource:
    """Find the train / validate / test files under data_dir: a folder of split folders (HipMRI, OASIS or generic
    names), a folder with one such data set at most two levels down, or a folder of images (all for training).
    Without a validation split one is carved from train (see _carve_validation) when train has two files or more;
    require_train=False also takes a data set without a train split (to evaluate another split)."""
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise UsageError(f"{root}: data folder not found")
    if not root.is_dir():
        raise UsageError(f"{root}: --data must be a folder, this is a file")
    notes: list[str] = []
    root = _one_data_set(root.resolve(), notes)  # resolved: checkpoints record it, later jobs run from elsewhere
    folders = split_folders(root)
    if folders:
        if "train" not in folders and require_train:
            raise UsageError(f"{root}: found {', '.join(f.name for f in folders.values())} but no training split")
        files = {split: list_images(folder) for split, folder in folders.items()}
        notes.append("splits: " + ", ".join(f"{split}={folder.name}/ ({len(files[split])} files)"
                                            for split, folder in folders.items()))
    else:
        nested = _deeper_split_folders(root)
        if nested:  # train, validate and test must never be merged into one training set
            names = ", ".join(str(folder.relative_to(root)) for folder in nested[:4])
            raise UsageError(f"{root}: its split folders ({names}) are more than two levels down; point --data at "
                             "the folder that holds them")
        files = {"train": list_images(root)}
        notes.append(f"no split folders in {root}: using all its images for training")
    for split, listed in files.items():
        if not listed and (split == "train" or not require_train):
            raise UsageError(f"{folders.get(split, root)}: no images found "
                             f"(looked for {', '.join(NIFTI_SUFFIXES + PICTURE_SUFFIXES)})")
    if not files.get("validate") and len(files.get("train", [])) >= 2:
        files["train"], files["validate"], note = _carve_validation(files["train"], val_fraction, root)
        notes.append(note)
    if not files.get("test"):
        files.pop("test", None)
        notes.append("no test split found: predict.py will evaluate on the validation split")
    return DataSource(root, {split: listed for split, listed in files.items() if listed}, notes,
                      carved="validate" not in folders)


# ----------------------------------------------------------------------------- decoding and caching

def _cache_key(files: Sequence[tuple[Path, str]], prep: Preprocessing, min_side: int) -> str:
    settings = prep.to_dict()
    if settings["spatial_dims"] == 2:  # as before volumes existed: caches of slices made then stay valid
        del settings["spatial_dims"]
    digest = hashlib.sha1(json.dumps([CACHE_VERSION, settings, min_side]).encode())
    for path, label in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _decode_files(files: Sequence[tuple[Path, str]], prep: Preprocessing, min_side: int, description: str,
                  keep: Callable[[np.ndarray], None]) -> tuple[list[str], list[str], list[str]]:
    """Decode every file, handing each preprocessed slice (or volume) to `keep` in order; returns the source and
    label of each, and the skipped files with their problems."""
    sources, labels, skipped = [], [], []
    workers = min(8 if prep.spatial_dims == 2 else 2, os.cpu_count() or 1)  # a decoded volume can take a GB
    with ThreadPoolExecutor(max_workers=workers) as pool:  # decompression and decoding release the GIL
        results = pool.map(lambda item: _try_preprocess(item[0], prep, min_side), files)
        for (path, label), (result, problem) in progress_bar(zip(files, results), total=len(files), desc=description,
                                                             unit="file"):
            if problem is not None:
                skipped.append(f"{path}: {problem}")
                continue
            for array in result:
                keep(array)
            suffix = len(result) > 1
            sources.extend(f"{path}:{i}" if suffix else str(path) for i in range(len(result)))
            labels.extend([label] * len(result))
    return sources, labels, skipped


def _try_preprocess(path: Path, prep: Preprocessing, min_side: int):
    try:
        return preprocess_file(path, prep, min_side), None
    except BadFile as problem:
        return None, str(problem)


def _report_skipped(split: str, skipped: list[str], total: int, log: Log) -> None:
    if not skipped:
        return
    log(f"skipped {len(skipped)} of {total} files in the {split} split:")
    for line in skipped[:10]:
        log(f"  {line}")
    if len(skipped) > 10:
        log(f"  ... and {len(skipped) - 10} more")


def save_npy(path: str | Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)

    atomic_write(path, write)


def _save_stacked(path: Path, slices: Sequence[np.ndarray]) -> None:
    """Write equal-shaped arrays as one .npy, one at a time: no second copy of the data set in memory."""
    def write(tmp: str) -> None:
        stacked = np.lib.format.open_memmap(tmp, mode="w+", dtype=slices[0].dtype, shape=(len(slices),
                                                                                           *slices[0].shape))
        for index, image in enumerate(slices):
            stacked[index] = image
        stacked.flush()
        del stacked

    atomic_write(path, write)


def open_cached(path: Path) -> torch.Tensor:
    """A cached array as a tensor backed by the file (copy-on-write memory map): processes on one node share the
    pages of the operating system's file cache instead of holding a copy each."""
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def load_split(source: DataSource, split: str, prep: Preprocessing, cache_dir: str | Path, min_side: int = 1,
               log: Log = print) -> SliceSet:
    """Preprocessed slices of one split, decoded once into an on-disk uint8 cache and then memory-mapped.

    Of several processes asking at once (torchrun's ranks), one decodes while the others wait on a file lock."""
    files = source.split_files(split)
    cache_dir = Path(cache_dir)
    key = _cache_key(files, prep, min_side)
    images_path, index_path = cache_dir / f"{split}-{key}.npy", cache_dir / f"{split}-{key}.json"
    built = build_once(index_path.exists,  # the index is written last: it vouches for the images
                       lambda: _build_cache(source, split, files, prep, min_side, images_path, index_path, log),
                       [images_path, index_path], log)
    index = json.loads(index_path.read_text())
    if not built:
        _report_skipped(split, index["skipped"], len(files), log)
    class_names = source.class_names
    label_ids = [class_names.index(label) if label in class_names else -1 for label in index["labels"]]
    return SliceSet(open_cached(images_path), torch.tensor(label_ids, dtype=torch.long), index["sources"],
                    class_names, split, key)


def _build_cache(source: DataSource, split: str, files: Sequence[tuple[Path, str]], prep: Preprocessing,
                 min_side: int, images_path: Path, index_path: Path, log: Log) -> None:
    start = time.perf_counter()
    images_path.parent.mkdir(parents=True, exist_ok=True)
    # Decoded items go straight to a scratch file (removed with the other leftovers if the build is killed), so
    # that a data set larger than memory (volumes) is never held in memory at once.
    with tempfile.NamedTemporaryFile(dir=images_path.parent, prefix=f".{images_path.name}.",
                                     suffix=".decoded.tmp") as scratch:
        shapes: list[tuple[int, ...]] = []

        def keep(array: np.ndarray) -> None:
            scratch.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())
            shapes.append(array.shape)

        sources, labels, skipped = _decode_files(files, prep, min_side, f"reading {split}", keep)
        seconds = time.perf_counter() - start
        log(f"decoded {len(files)} {split} files in {seconds:.1f}s ({len(files) / max(seconds, 1e-9):.0f} files/s)")
        _report_skipped(split, skipped, len(files), log)
        if not shapes:
            first = f" (first problem: {skipped[0]})" if skipped else ""
            raise UsageError(f"{source.root}: none of the {len(files)} files in the {split} split could be used"
                             f"{first}")
        scratch.flush()
        decoded = np.memmap(scratch, dtype=np.uint8, mode="r", shape=(len(shapes), *shapes[0]))
        _save_stacked(images_path, decoded)
        del decoded  # unmapped before the scratch file goes (Windows cannot delete a mapped file)
    index = {"sources": sources, "labels": labels, "skipped": skipped}
    atomic_write(index_path, lambda tmp: Path(tmp).write_text(json.dumps(index)))  # written last: vouches for both


# ----------------------------------------------------------------------------- labels

def balanced_subset(labels: torch.Tensor, percent: float, class_names: list[str], seed: int) -> torch.Tensor:
    """Indices of `percent`% of each class's examples, chosen with a fixed seed."""
    if not 0 < percent <= 100:
        raise UsageError(f"{percent:g}% of the labels: a percentage above 0 and at most 100")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for class_id, name in enumerate(class_names):
        members = torch.nonzero(labels == class_id).flatten()
        count = round(len(members) * percent / 100)
        if count < 1:
            raise UsageError(f"class '{name}' has {len(members)} training slices: {percent:g}% of them is less than "
                             "one; use a larger share of the labels or more data")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(chosen)


# ----------------------------------------------------------------------------- batches

def unit_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255)


class BatchLoader:
    """Batches (data, labels) from tensors held in memory (on the GPU when they fit there).

    Slicing one uint8 tensor is far faster than a DataLoader that collates per-item tensors. `convert` turns a
    stored batch into what the model takes (by default uint8 images to floats in [0, 1]).

    With world_size > 1 each process takes every world_size-th item of the same epoch order (a distributed
    sampler). With even_shards (the default when shuffling, for training) the order is wrapped around to a
    multiple of world_size, so every process makes the same number of steps: DistributedDataParallel waits for
    all. Data too big for the GPU (or on_device=False) stays in host memory and each batch is gathered into pinned
    memory, so its copy is asynchronous.
    """

    def __init__(self, data: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool,
                 device: torch.device, seed: int = 0, drop_last: bool = False,
                 convert: Callable[[torch.Tensor], torch.Tensor] = unit_float, rank: int = 0, world_size: int = 1,
                 even_shards: bool | None = None, on_device: bool | None = None):
        self.labels, self.batch_size, self.shuffle, self.convert = labels, batch_size, shuffle, convert
        self.device, self.seed, self.drop_last, self.epoch = device, seed, drop_last, 0
        self.rank, self.world_size = rank, world_size
        self.even_shards = shuffle if even_shards is None else even_shards
        self.data = data
        if on_device is None:
            on_device = device.type == "cuda" and \
                data.numel() * data.element_size() < 0.25 * torch.cuda.mem_get_info(device)[0]
        if on_device and device.type == "cuda":
            self.data, self.labels = data.to(device), labels.to(device)

    def _shard_size(self, start_item: int = 0) -> int:
        remaining = max(0, len(self.data) - start_item)
        if self.even_shards:
            return math.ceil(remaining / self.world_size)
        return max(0, math.ceil((remaining - self.rank) / self.world_size))

    def _batch_count(self, items: int) -> int:
        return items // self.batch_size if self.drop_last else math.ceil(items / self.batch_size)

    def __len__(self) -> int:
        """Batches of a whole epoch on this process."""
        return self._batch_count(self._shard_size())

    def batches_left(self, start_item: int) -> int:
        return self._batch_count(self._shard_size(start_item))

    @property
    def items_per_step(self) -> int:
        """Items of the epoch order that one step consumes over all processes."""
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        count = len(self.data)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            return torch.randperm(count, generator=generator)
        return torch.arange(count)

    def _shard(self, start_item: int) -> torch.Tensor:
        """This process's items of the epoch order from position start_item on (to resume part-way, also with
        another number of processes)."""
        order = self._order()
        remaining = order[start_item:]
        if self.even_shards and len(remaining) % self.world_size:
            missing = self.world_size - len(remaining) % self.world_size
            remaining = torch.cat([remaining, order.repeat(math.ceil(missing / len(order)))[:missing]])
        return remaining[self.rank::self.world_size]

    def batches(self, start_item: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's batches, from position start_item of the epoch order on."""
        shard = self._shard(start_item)
        if self.data.device.type == "cuda":  # one asynchronous copy per epoch: a blocking copy per batch would sync
            shard = shard.pin_memory().to(self.data.device, non_blocking=True)
        for batch in range(self._batch_count(len(shard))):
            index = shard[batch * self.batch_size:(batch + 1) * self.batch_size]
            yield self.convert(self._take(self.data, index)), self._take(self.labels, index)

    def _take(self, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """values[index] on the training device."""
        if values.device.type == self.device.type:
            return values[index]
        # Gathered straight into page-locked memory: only from there can the copy to the GPU run asynchronously.
        staged = torch.empty((len(index), *values.shape[1:]), dtype=values.dtype, pin_memory=True)
        return torch.index_select(values, 0, index, out=staged).to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches()
