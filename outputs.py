"""Per-file outputs under one folder, named as their inputs and at each input's own size and format: maps (.npy
float32, and NIfTI with the input's affine for NIfTI inputs) and images (reconstructions, healed slices: NIfTI in the
input's own intensities with its affine, pictures in the picture's own format). The fitting the loader applied is
undone (readers.unfit_from_shape), so every output overlays its input."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from dataset import logical_path
from readers import NIFTI_SUFFIXES, PICTURE_SUFFIXES, BadFile, Preprocessing, SliceOrigin, slice_origins, \
    unfit_from_shape
from utils import UsageError, atomic_write

_SLICE_OF_FILE = re.compile(r"^(.*):(\d+)$")  # how dataset.py names the slices of a file that holds several


def source_file(source: str) -> tuple[Path, int | None]:
    """A slice's source (SliceSet.sources) as its file and, for a file of several slices, the slice's position."""
    match = _SLICE_OF_FILE.match(source)
    if match and not Path(source).exists():
        return Path(match.group(1)), int(match.group(2))
    return Path(source), None


def empty_folder(folder: str | os.PathLike, option: str) -> Path:
    """A folder to write outputs into: new, or empty (outputs of two runs would mix)."""
    folder = Path(folder)
    if folder.is_file() or (folder.exists() and any(folder.iterdir())):
        raise UsageError(f"{option} {folder}: {'is a file' if folder.is_file() else 'the folder is not empty'}; "
                         "name a new folder (outputs of two runs would mix)")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _strip_image_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in sorted(NIFTI_SUFFIXES + PICTURE_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


class FileOutputs:
    """Writes outputs for the slices of one data folder under `folder`, each named after its input's path relative
    to the --data folder given (`data`; else the data set's own folder, `source_root`); a file of several slices
    gets one output per slice, `.slice<i>` added to its name."""

    def __init__(self, folder: Path, data: str | None, source_root: Path, prep: Preprocessing):
        given = Path(data).expanduser().resolve() if data else None
        self.folder, self.prep = Path(folder), prep
        self.data_root = given if given is not None and given.is_dir() else Path(source_root)
        self._origins: tuple[Path, list[SliceOrigin]] | None = None

    def relative(self, source: str) -> Path:
        """The input's path relative to the data folder (its name alone when it lies elsewhere)."""
        path, _ = source_file(source)
        try:
            return logical_path(path.resolve().relative_to(self.data_root.resolve()))
        except ValueError:
            return Path(path.name)

    def origin(self, source: str) -> tuple[SliceOrigin, bool]:
        """The slice's origin, and whether it is its file's only slice (the file read once for all its slices)."""
        path, index = source_file(source)
        if self._origins is None or self._origins[0] != path:
            try:
                self._origins = (path, slice_origins(path, self.prep))
            except BadFile as problem:  # read a moment ago: it changed on disk since
                raise UsageError(f"{path}: {problem}") from None
        origins = self._origins[1]
        return origins[index or 0], len(origins) == 1

    def _target(self, kind: str, source: str, suffix: str | None = None) -> Path:
        """Where an output of `kind` goes: the input's relative path, with `suffix` in place of the image suffix
        (None: the input's own name)."""
        relative = self.relative(source)
        _, index = source_file(source)
        base = _strip_image_suffix(relative.name)
        own_suffix = relative.name[len(base):]
        if index is not None:
            base += f".slice{index}"
        return self.folder / kind / relative.parent / (base + (own_suffix if suffix is None else suffix))

    def write_map(self, kind: str, source: str, values: torch.Tensor) -> Path:
        """A map [H, W] at the network's size as float32 at the input's size: kind/<name>.npy, and for a NIfTI
        input of one slice kind/<name>.nii.gz with its affine."""
        origin, whole_file = self.origin(source)
        restored = unfit_from_shape(values[None].float().cpu(), origin.shape, self.prep.resize)[0].numpy()
        target = self._target(kind, source, ".npy")
        atomic_write(target, lambda tmp: _save_npy(tmp, restored.astype(np.float32)))
        if origin.affine is not None and whole_file:
            _save_nifti(target.with_suffix(".nii.gz"), restored.reshape(origin.stored_shape).astype(np.float32),
                        origin.affine)
        return target

    def write_image(self, kind: str, source: str, image: torch.Tensor) -> Path:
        """An image [C, H, W] in [0, 1] at the network's size, as a file like its input: NIfTI in the input's own
        intensities (uint8 for 8-bit inputs) with its affine, or a picture in the input's format (8-bit)."""
        origin, whole_file = self.origin(source)
        restored = unfit_from_shape(image.float().cpu(), origin.shape, self.prep.resize).clamp(0, 1).numpy()
        target = self._target(kind, source)
        if target.name.lower().endswith(NIFTI_SUFFIXES):
            values = restored.mean(axis=0)
            if origin.intensity_range is None:
                values = np.round(values * 255).astype(np.uint8)
            else:
                low, high = origin.intensity_range
                values = (low + values * (high - low)).astype(np.float32)
            affine = origin.affine if whole_file else np.eye(4)
            _save_nifti(target, values.reshape(origin.stored_shape) if whole_file else values, affine)
        else:
            _save_picture(target, restored)
        return target


def _save_npy(tmp: str, array: np.ndarray) -> None:
    with open(tmp, "wb") as handle:
        np.save(handle, array)


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    # nibabel picks the compression from the name it writes: the temporary file is given the real suffix.
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
    atomic_write(path, lambda tmp: nib.save(image, tmp + suffix) or os.replace(tmp + suffix, tmp))


def _save_picture(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    array = np.round(image * 255).astype(np.uint8)
    picture = Image.fromarray(array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0)))
    file_format = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    atomic_write(path, lambda tmp: picture.save(tmp, format=file_format))
