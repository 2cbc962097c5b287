"""Files on disk to tensors: finding splits, reading NIfTI/PNG/JPG, preprocessing, caching, the demo data."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from modules import weights_fingerprint
from utils import UsageError, atomic_write, file_lock, progress_bar, remove_stale_temporaries, shape_text

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validate": ("val", "valid", "validate", "validation"),
    "test": ("test", "testing"),
}
DATA_FOLDERS = ("keras_slices_data", "keras_png_slices_data")
CACHE_VERSION = 1
Log = Callable[[str], None]


@dataclass
class Preprocessing:
    """How every slice is brought to the network's input; saved in checkpoints so predict.py repeats it."""

    image_size: tuple[int, ...] | None = None  # (H, W), or (X, Y, Z) for volumes (RAS); None = the most common
    channels: int = 1
    resize: str = "fit"  # "fit": scale to fit inside, then pad; "crop": scale to cover, then centre-crop
    slice_axis: int = 2  # for 3D NIfTI volumes cut into 2D slices
    percentiles: tuple[float, float] = (0.5, 99.5)  # robust intensity range for non-8-bit images
    spatial_dims: int = 2  # 3: whole volumes, in canonical RAS orientation and physical proportions

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocessing":
        values = dict(values)
        for key in ("image_size", "percentiles"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)


class BadFile(Exception):
    """One file that cannot be used; it is skipped, counted and reported."""


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


# ----------------------------------------------------------------------------- finding files

def _is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(NIFTI_SUFFIXES + PICTURE_SUFFIXES) and not name.startswith(".")


def _split_of(folder_name: str) -> str | None:
    name = folder_name.lower()
    if "seg" in name:  # segmentation masks, never training images
        return None
    for split, aliases in SPLIT_ALIASES.items():
        if any(name == alias or name.endswith(("_" + alias, "-" + alias)) for alias in aliases):
            return split
    return None


def list_images(folder: Path) -> list[tuple[Path, str]]:
    """Image files under a split folder, with the class subfolder (first level) as label; skips 'seg' folders."""
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any("seg" in part.lower() for part in relative.parts[:-1]) or not path.is_file():
            continue
        if _is_image_file(path):
            found.append((path, relative.parts[0] if len(relative.parts) > 1 else ""))
    return found


def _split_folders(root: Path) -> dict[str, Path]:
    folders: dict[str, Path] = {}
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        split = _split_of(child.name)
        if split is None:
            continue
        if split in folders:
            raise UsageError(f"{root}: both '{folders[split].name}' and '{child.name}' look like the {split} split; "
                             "point --data at a folder with one of each")
        folders[split] = child
    return folders


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
        relative = path.relative_to(root)
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


def find_data(data_dir: str | Path, val_fraction: float = 0.1) -> DataSource:
    """Find the train / validate / test files under data_dir (HipMRI, OASIS or generic layouts)."""
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise UsageError(f"{root}: data folder not found")
    if not root.is_dir():
        raise UsageError(f"{root}: --data must be a folder, this is a file")
    root = root.resolve()  # recorded in checkpoints: later jobs may run from another directory
    notes: list[str] = []
    folders = _split_folders(root)
    if not folders:
        nested = [root / name for name in DATA_FOLDERS if (root / name).is_dir()]
        if len(nested) > 1:
            raise UsageError(f"{root}: holds both {nested[0].name}/ and {nested[1].name}/; point --data at one of them")
        if nested:
            root = nested[0]
            folders = _split_folders(root)
    if "train" in folders:
        files = {split: list_images(folder) for split, folder in folders.items()}
        notes.append("splits: " + ", ".join(f"{split}={folder.name}/ ({len(files[split])} files)"
                                            for split, folder in folders.items()))
    else:
        files = {"train": list_images(root)}
        if folders:
            raise UsageError(f"{root}: found {', '.join(f.name for f in folders.values())} but no training split")
        notes.append(f"no split folders in {root}: using all its images for training")
    if not files["train"]:
        raise UsageError(f"{folders.get('train', root)}: no images found "
                         f"(looked for {', '.join(NIFTI_SUFFIXES + PICTURE_SUFFIXES)})")
    if not files.get("validate"):
        if len(files["train"]) < 2:
            raise UsageError(f"{root}: only one training image and no validation split; need at least two images")
        files["train"], files["validate"], note = _carve_validation(files["train"], val_fraction, root)
        notes.append(note)
    if not files.get("test"):
        files.pop("test", None)
        notes.append("no test split found: predict.py will evaluate on the validation split")
    return DataSource(root, files, notes, carved="validate" not in folders)


# ----------------------------------------------------------------------------- reading one file

def unreadable(error: Exception) -> BadFile:
    """The skip message of a file its decoder failed on (the decoders raise many types for damaged files)."""
    return BadFile(f"cannot be read ({type(error).__name__}: {str(error).strip()[:120]})")


def _scale_robust(array: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    low, high = (float(value) for value in np.percentile(array, percentiles))  # Python floats keep float32 data
    if high <= low:  # most pixels share one value: fall back to the full range
        low, high = float(array.min()), float(array.max())
    return np.clip((array - low) / (high - low), 0, 1)


def _read_nifti(path: Path, prep: Preprocessing) -> list[tuple[np.ndarray, bool]]:
    import nibabel as nib

    image = nib.load(str(path))
    eight_bit = image.get_data_dtype() == np.uint8
    volume = np.asarray(image.get_fdata(dtype=np.float32))
    while volume.ndim > 2 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    if volume.ndim == 2:
        return [(volume, eight_bit)]
    if volume.ndim != 3:
        raise BadFile(f"has {volume.ndim} dimensions {volume.shape}; expected a 2D slice or a 3D volume")
    if not -3 <= prep.slice_axis < 3:
        raise UsageError(f"--slice-axis {prep.slice_axis} is out of range for 3D volume {path}")
    slices = np.moveaxis(volume, prep.slice_axis, 0)
    kept = [(s, eight_bit) for s in slices if np.isfinite(s).all() and s.max() > s.min()]
    if not kept:
        raise BadFile("is a 3D volume whose slices are all empty or constant")
    return kept


def _read_picture(path: Path, prep: Preprocessing) -> list[tuple[np.ndarray, bool]]:
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            array = np.asarray(image, dtype=np.float32)
            return [(np.repeat(array[..., None], 3, axis=-1) if prep.channels == 3 else array, False)]
        converted = image.convert("RGB" if prep.channels == 3 else "L")
        return [(np.asarray(converted, dtype=np.float32), True)]


def read_slices(path: Path, prep: Preprocessing) -> list[np.ndarray]:
    """The 2D slices of one file as float32 [C, H, W] arrays in [0, 1], before resizing. Raises BadFile."""
    reader = _read_nifti if path.name.lower().endswith(NIFTI_SUFFIXES) else _read_picture
    try:
        raw_slices = reader(path, prep)
    except (BadFile, UsageError):
        raise
    except Exception as error:
        raise unreadable(error) from None
    slices = []
    for array, eight_bit in raw_slices:
        if not np.isfinite(array).all():
            raise BadFile("contains NaN or infinite pixel values")
        if array.max() == array.min():
            raise BadFile(f"is constant (every pixel is {array.flat[0]:g}): nothing to learn from")
        scaled = array / 255.0 if eight_bit else _scale_robust(array, prep.percentiles)
        if scaled.ndim == 2:
            scaled = scaled[None]
            if prep.channels == 3:
                scaled = np.repeat(scaled, 3, axis=0)
        else:
            scaled = np.transpose(scaled, (2, 0, 1))
        slices.append(scaled.astype(np.float32))
    return slices


def _centre(tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """[1, C, *S] zero-padded or cropped about its centre to [1, C, *shape] (negative padding crops)."""
    pads: list[int] = []
    for size, target in zip(reversed(tensor.shape[2:]), reversed(shape)):
        missing = target - size
        pads += [missing // 2, missing - missing // 2]
    return F.pad(tensor, pads)


def fit_to_shape(image: np.ndarray, shape: tuple[int, int], mode: str = "fit") -> np.ndarray:
    """Resize [C, H, W] to shape without distorting the aspect ratio: fit inside and pad, or cover and crop."""
    height, width = image.shape[-2:]
    target_h, target_w = shape
    ratios = (target_h / height, target_w / width)
    scale = min(ratios) if mode == "fit" else max(ratios)
    tensor = torch.from_numpy(np.ascontiguousarray(image))[None]
    if scale != 1:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        if mode == "fit":
            size = (min(size[0], target_h), min(size[1], target_w))
        else:
            size = (max(size[0], target_h), max(size[1], target_w))
        tensor = F.interpolate(tensor, size=size, mode="bilinear", antialias=scale < 1, align_corners=False)
    return _centre(tensor, shape)[0].clamp_(0, 1).numpy()


def slice_shape(path: Path, slice_axis: int) -> tuple[int, int] | None:
    """The 2D shape of a file's slices from its header alone (None when unreadable)."""
    try:
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            shape = [s for s in nib.load(str(path)).shape]
            while len(shape) > 2 and shape[-1] == 1:
                shape.pop()
            if len(shape) == 3:
                shape.pop(slice_axis)
            return (shape[0], shape[1]) if len(shape) == 2 else None
        from PIL import Image

        with Image.open(path) as image:
            return image.height, image.width
    except Exception:
        return None


def native_image_size(files: Sequence[tuple[Path, str]], multiple: int, slice_axis: int = 2,
                      spatial_dims: int = 2) -> tuple[int, ...]:
    """The most common slice shape among files (volumes: their shape in voxels of their finest spacing), rounded up
    to a multiple of the network's code cell."""
    sample = files[:: max(1, len(files) // 500)]  # headers of a few hundred files are enough to find the mode
    shape_of = volume_shape if spatial_dims == 3 else lambda path: slice_shape(path, slice_axis)
    shapes = Counter(shape for path, _ in sample if (shape := shape_of(path)) is not None)
    if not shapes:
        kind = "3D NIfTI volumes" if spatial_dims == 3 else "readable images"
        raise UsageError(f"none of the files in {files[0][0].parent} are {kind}")
    return tuple(math.ceil(side / multiple) * multiple for side in shapes.most_common(1)[0][0])


# ----------------------------------------------------------------------------- reading one volume (3D runs)

def _volume_header(path: Path):
    """The NIfTI image of a file meant as one 3D volume (data not read yet). Raises BadFile."""
    import nibabel as nib

    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise BadFile("is a 2D picture; a 3D run (--spatial-dims 3) reads NIfTI volumes")
    try:
        image = nib.load(str(path))
    except Exception as error:
        raise unreadable(error) from None
    shape = list(image.shape)
    while len(shape) > 3 and shape[-1] == 1:  # a volume stored with trailing singleton axes
        shape.pop()
    if len(shape) < 3 or min(shape) == 1:
        raise BadFile(f"is a 2D slice ({shape_text(image.shape)}); a 3D run needs volumes "
                      "(train on slices without --spatial-dims 3)")
    if len(shape) > 3:
        raise BadFile(f"is {len(shape)}D ({shape_text(image.shape)}); a 3D run takes one volume per file "
                      "(split time series or channels into files)")
    _canonical_axes(image.affine)  # a degenerate affine is refused before any data is read
    return image


def _canonical_axes(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each stored axis, the canonical (RAS) axis it becomes, and the voxel spacing along each stored axis."""
    import nibabel as nib

    orientation = nib.orientations.io_orientation(affine)
    if np.isnan(orientation).any():
        raise BadFile("has a degenerate affine (an axis with no direction in space): its orientation is unknown")
    spacing = nib.affines.voxel_sizes(affine)
    spacing = np.where(np.isfinite(spacing) & (spacing > 0), spacing, 1.0)
    return orientation[:, 0].astype(int), spacing


def volume_shape(path: Path) -> tuple[int, int, int] | None:
    """A volume's shape in voxels of its finest spacing, in canonical orientation, from its header alone (None when
    it is not a readable 3D volume): the shape it has in the network without distortion."""
    try:
        image = _volume_header(path)
    except BadFile:
        return None
    axes, spacing = _canonical_axes(image.affine)
    extent = np.zeros(3)
    extent[axes] = np.array(image.shape[:3]) * spacing
    return tuple(int(round(length)) for length in extent / spacing.min())


def read_volume(path: Path, prep: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """One volume as float32 [1, X, Y, Z] in [0, 1], turned to nibabel's closest canonical orientation (RAS+: the
    axes run to the patient's right, anterior, superior), and its voxel spacing along those axes. Raises BadFile."""
    import nibabel as nib

    image = _volume_header(path)
    try:
        canonical = nib.as_closest_canonical(image)
        volume = np.asarray(canonical.get_fdata(dtype=np.float32)).reshape(canonical.shape[:3])
    except Exception as error:
        raise unreadable(error) from None
    if not np.isfinite(volume).all():
        raise BadFile("contains NaN or infinite voxel values")
    if volume.max() == volume.min():
        raise BadFile(f"is constant (every voxel is {volume.flat[0]:g}): nothing to learn from")
    scaled = volume / 255.0 if image.get_data_dtype() == np.uint8 else _scale_robust(volume, prep.percentiles)
    return scaled[None].astype(np.float32), _canonical_axes(canonical.affine)[1]


def fit_volume(volume: np.ndarray, spacing: Sequence[float], shape: Sequence[int], mode: str = "fit") -> np.ndarray:
    """Resample [C, X, Y, Z] to `shape` voxels, all of one size, so that nothing is stretched in physical space:
    the voxel size is the one at which the whole volume fits inside the shape ("fit", then zero-padded) or covers
    it ("crop", then centre-cropped). Axes that grow are interpolated (trilinear), axes that shrink averaged."""
    extent = np.array(volume.shape[1:]) * np.asarray(spacing, dtype=np.float64)
    ratios = extent / np.array(shape)
    voxel = ratios.max() if mode == "fit" else ratios.min()
    size = [max(1, round(length / voxel)) for length in extent]
    size = [min(side, target) if mode == "fit" else max(side, target) for side, target in zip(size, shape)]
    tensor = torch.from_numpy(np.ascontiguousarray(volume))[None]
    grown = [max(side, current) for side, current in zip(size, tensor.shape[2:])]
    if grown != list(tensor.shape[2:]):
        tensor = F.interpolate(tensor, size=grown, mode="trilinear", align_corners=False)
    if size != grown:  # box-averaging: no aliasing where a volume shrinks
        tensor = F.interpolate(tensor, size=size, mode="area")
    return _centre(tensor, shape)[0].clamp_(0, 1).numpy()


def _preprocess_volume(path: Path, prep: Preprocessing, min_side: int) -> np.ndarray:
    volume, spacing = read_volume(path, prep)
    if min(volume.shape[1:]) < min_side:
        raise BadFile(f"is {shape_text(volume.shape[1:])} voxels, smaller than one code cell "
                      f"({min_side}x{min_side}x{min_side})")
    return np.round(fit_volume(volume, spacing, prep.image_size, prep.resize) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- loading and caching

def _preprocess_file(path: Path, prep: Preprocessing, min_side: int) -> list[np.ndarray]:
    if prep.spatial_dims == 3:
        return [_preprocess_volume(path, prep, min_side)]
    slices = read_slices(path, prep)
    height, width = slices[0].shape[-2:]
    if min(height, width) < min_side:
        raise BadFile(f"is {height}x{width}, smaller than the {min_side}x{min_side} the network needs")
    return [np.round(fit_to_shape(s, prep.image_size, prep.resize) * 255).astype(np.uint8) for s in slices]


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
        return _preprocess_file(path, prep, min_side), None
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


def build_once(ready: Callable[[], bool], build: Callable[[], None], outputs: Sequence[Path], log: Log) -> bool:
    """Build a cache unless it is complete already, one process at a time: the others wait on a file lock and then
    find it complete. Leftovers of a build that was killed are removed first. True when this process built it."""
    if ready():
        return False
    with file_lock(outputs[0].with_name(f".{outputs[0].name}.lock"), log):
        if ready():
            return False
        for output in outputs:
            remove_stale_temporaries(output)
        build()
    return True


def load_split(source: DataSource, split: str, prep: Preprocessing, cache_dir: str | Path, min_side: int = 1,
               log: Log = print) -> SliceSet:
    """Preprocessed slices of one split, decoded once into an on-disk uint8 cache and then memory-mapped.

    Of several processes asking at once (torchrun's ranks), one decodes while the others wait on a file lock."""
    files = source.files[split]
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


def checkpoint_data(checkpoint: dict, override: str | None = None, log: Log = print) -> DataSource:
    """The splits a VQ-VAE checkpoint was trained with: its data folder (or `override`), with the validation split
    carved from the training folder as it was then."""
    recorded = checkpoint.get("data", {})
    source = find_data(data_dir_of(checkpoint, override, log), recorded.get("val_fraction", 0.1))
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
    if path is not None and path.is_dir() and path.name != own_root.name and not _split_folders(path) \
            and not any((path / name).is_dir() for name in DATA_FOLDERS):
        files = list_images(path)
        if not files:
            raise UsageError(f"{path}: no images found (looked for {', '.join(NIFTI_SUFFIXES + PICTURE_SUFFIXES)})")
        return DataSource(path, {"test": files}, [f"no split folders in {path}: evaluating all its {len(files)} files"])
    return checkpoint_data(checkpoint, override, log)


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


# ----------------------------------------------------------------------------- demo data

DEMO_SHAPE = (128, 64)
DEMO_COUNTS = {"train": 2000, "validate": 200, "test": 200}
DEMO_SLICES_PER_CASE = 40
DEMO_VOLUME_SHAPE = (32, 32, 32)  # X, Y, Z voxels (right, anterior, superior)
DEMO_VOXEL_MM = 4.0  # a 128 mm field of view
DEMO_VOLUME_COUNTS = {"train": 640, "validate": 40, "test": 40}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cutoff: float) -> np.ndarray:
    """Gaussian-filtered white noise via the FFT (cutoff in cycles per pixel), unit variance."""
    frequency_y = np.fft.fftfreq(shape[0])[:, None]
    frequency_x = np.fft.fftfreq(shape[1])[None, :]
    spectrum = np.fft.fft2(rng.standard_normal(shape)) * np.exp(-(frequency_y**2 + frequency_x**2) / (2 * cutoff**2))
    field = np.real(np.fft.ifft2(spectrum))
    return field / (field.std() + 1e-8)


def _ellipse(y: np.ndarray, x: np.ndarray, centre, radii, angle: float = 0.0) -> np.ndarray:
    cos, sin = math.cos(angle), math.sin(angle)
    dy, dx = y - centre[0], x - centre[1]
    u, v = (dx * cos + dy * sin) / radii[1], (-dx * sin + dy * cos) / radii[0]
    return u**2 + v**2


def make_phantom(case_rng_seed: int, position: float, shape: tuple[int, int] = DEMO_SHAPE) -> np.ndarray:
    """One pelvis-like MRI slice: body outline with a fat rim, organs, bones, texture, bias field, Rician noise.

    position in [0, 1] moves through the case's volume, so neighbouring slices of a case look alike.
    """
    case = np.random.default_rng(case_rng_seed)
    noise_rng = np.random.default_rng([case_rng_seed, int(position * 1000)])
    height, width = shape
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    y, x = y / height, x / width  # unit coordinates
    bulge = math.sin(math.pi * position)  # anatomy grows towards the middle of the volume
    body_radii = (0.36 + 0.06 * bulge + 0.03 * case.random(), 0.40 + 0.05 * bulge + 0.04 * case.random())
    body = _ellipse(y, x, (0.5, 0.5), body_radii)
    image = np.where(body < 1, 0.45, 0.0)
    image += np.where((body < 1) & (body > 0.78 - 0.05 * case.random()), 0.45, 0.0)  # subcutaneous fat
    organs = [  # (centre, radii, intensity): bladder (fluid, bright), prostate, rectum (dark), muscles
        ((0.38, 0.5), (0.09 + 0.05 * bulge, 0.13 + 0.05 * bulge), 0.95),
        ((0.55, 0.5), (0.06 + 0.03 * bulge, 0.09 + 0.03 * bulge), 0.6),
        ((0.70, 0.5), (0.05, 0.07), 0.15),
        ((0.52, 0.22), (0.16, 0.08), 0.35),
        ((0.52, 0.78), (0.16, 0.08), 0.35),
    ]
    for centre, radii, intensity in organs:
        jitter = (centre[0] + 0.03 * case.standard_normal(), centre[1] + 0.02 * case.standard_normal())
        inside = _ellipse(y, x, jitter, radii, angle=0.2 * case.standard_normal()) < 1
        image = np.where(inside & (body < 0.8), intensity + 0.05 * case.standard_normal(), image)
    for side in (0.25, 0.75):  # femoral heads: bright marrow inside a dark cortical ring
        head = _ellipse(y, x, (0.55 + 0.02 * case.standard_normal(), side), (0.07 * bulge + 0.02, 0.09 * bulge + 0.03))
        image = np.where(head < 1, 0.8, image)
        image = np.where((head >= 0.7) & (head < 1), 0.08, image)
    image *= 1 + 0.08 * _smooth_noise(noise_rng, shape, 0.08) * (image > 0)  # tissue texture
    bias = 1 + 0.25 * (y - 0.5) * case.standard_normal() + 0.25 * (x - 0.5) * case.standard_normal()
    image *= bias * (1 + 0.15 * _smooth_noise(case, shape, 0.01))  # smooth coil bias field
    sigma = 0.03
    real = image + sigma * noise_rng.standard_normal(shape)
    imaginary = sigma * noise_rng.standard_normal(shape)
    magnitude = np.sqrt(real**2 + imaginary**2)  # Rician noise, as in magnitude MRI
    return (magnitude * (800 + 400 * case.random())).astype(np.float32)  # arbitrary scanner units


def make_demo_data(root: str | Path, counts: dict[str, int] | None = None, shape: Sequence[int] | None = None,
                   seed: int = 0, log: Log = print, volumes: bool = False) -> Path:
    """Write the synthetic phantom set once, deterministically: 2D NIfTI slices in the HipMRI layout, or with
    volumes=True whole 3D NIfTI volumes (one per case: the phantom's consecutive positions) in volumes_<split>/."""
    counts = counts or (DEMO_VOLUME_COUNTS if volumes else DEMO_COUNTS)
    shape = tuple(shape or (DEMO_VOLUME_SHAPE if volumes else DEMO_SHAPE))
    data_dir = Path(root).resolve() / ("demo_volumes" if volumes else "keras_slices_data")
    marker = data_dir / ".complete.json"
    settings = {"counts": counts, "shape": list(shape), "seed": seed, "version": 1}
    writer = _write_demo_volumes if volumes else _write_demo_data

    def write() -> None:
        writer(data_dir, counts, shape, seed, log)
        atomic_write(marker, lambda tmp: Path(tmp).write_text(json.dumps(settings)))  # written last: vouches for all

    build_once(lambda: marker.exists() and json.loads(marker.read_text()) == settings, write, [marker], log)
    return data_dir


DEMO_CASE_OFFSETS = {"train": 0, "validate": 10_000, "test": 20_000}  # no case in two splits


def _write_demo_data(data_dir: Path, counts: dict[str, int], shape: tuple[int, int], seed: int, log: Log) -> None:
    import nibabel as nib

    log(f"generating the built-in demo data (synthetic pelvis-like MRI phantoms) in {data_dir} ...")
    for split, count in counts.items():
        folder = data_dir / f"keras_slices_{split}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in progress_bar(range(count), desc=f"demo {split}", unit="slice"):
            case, slice_index = divmod(index, DEMO_SLICES_PER_CASE)
            image = make_phantom(seed * 1_000_003 + DEMO_CASE_OFFSETS[split] + case,
                                 slice_index / DEMO_SLICES_PER_CASE, shape)
            path = folder / f"case_{case:03d}_week_0_slice_{slice_index}.nii.gz"
            nib.save(nib.Nifti1Image(image, np.eye(4)), str(path))


def make_phantom_volume(case_rng_seed: int, shape: Sequence[int] = DEMO_VOLUME_SHAPE) -> np.ndarray:
    """One case's phantom as a volume [X, Y, Z] in RAS order: its axial slices (make_phantom at consecutive
    positions) stacked from inferior to superior, each turned so that its rows run posterior to anterior."""
    columns, rows, depth = shape
    slices = [make_phantom(case_rng_seed, z / depth, (rows, columns)) for z in range(depth)]
    return np.stack([np.flipud(image).T for image in slices], axis=-1)  # image row 0 is anterior (display top)


def _write_demo_volumes(data_dir: Path, counts: dict[str, int], shape: tuple[int, int, int], seed: int,
                        log: Log) -> None:
    import nibabel as nib

    log(f"generating the built-in 3D demo data (synthetic pelvis-like MRI phantom volumes) in {data_dir} ...")
    for split, count in counts.items():
        folder = data_dir / f"volumes_{split}"
        folder.mkdir(parents=True, exist_ok=True)
        for case in progress_bar(range(count), desc=f"demo {split}", unit="volume"):
            volume = make_phantom_volume(seed * 1_000_003 + DEMO_CASE_OFFSETS[split] + case, shape)
            nib.save(nib.Nifti1Image(volume, np.diag([DEMO_VOXEL_MM] * 3 + [1.0])),
                     str(folder / f"case_{case:03d}_week_0.nii.gz"))
