"""Per-file outputs under one folder, named as their inputs and at each input's own size and format: maps (.npy
float32, and NIfTI with the input's affine for NIfTI inputs) and images (reconstructions, healed slices: NIfTI in the
input's own intensities with its affine and header, pictures as pictures of the input's type). The fitting the
loader applied is undone (readers.unfit_from_shape), so every output overlays its input."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from dataset import logical_path, save_npy
from readers import NIFTI_SUFFIXES, PICTURE_SUFFIXES, BadFile, Preprocessing, SliceOrigin, save_nifti, save_picture, \
    slice_origins, unfit_from_shape
from utils import UsageError

_SLICE_OF_FILE = re.compile(r"^(.*):(\d+)$")  # how dataset.py names the slices of a file that holds several


def source_file(source: str) -> tuple[Path, int | None]:
    """A slice's source (SliceSet.sources) as its file and, for a file of several slices, the slice's position
    among them."""
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


def _image_suffix(name: str) -> str:
    lower = name.lower()
    return next((name[len(name) - len(suffix):] for suffix in sorted(NIFTI_SUFFIXES + PICTURE_SUFFIXES, key=len,
                                                                       reverse=True) if lower.endswith(suffix)), "")


class FileOutputs:
    """Writes outputs for the slices of one data folder under `folder`, each named after its input's path relative
    to the --data folder given (`data`; else the data set's own folder, `source_root`): `kind/<file>.npy` for maps,
    `kind/<file>` for outputs in the input's own format. A slice of a 3D volume adds `.slice<i>`, i its index along
    the slice axis."""

    def __init__(self, folder: Path, data: str | None, source_root: Path, prep: Preprocessing):
        given = Path(data).expanduser().absolute() if data else None
        self.folder, self.prep = Path(folder), prep
        self.data_root = given if given is not None and given.is_dir() else Path(source_root)
        self._origins: tuple[Path, list[SliceOrigin]] | None = None
        self._written: set[Path] = set()

    def relative(self, source: str) -> Path:
        """The input's path relative to the data folder (its name alone when it lies elsewhere)."""
        path = source_file(source)[0].absolute()
        for root in (self.data_root.absolute(), self.data_root.resolve()):  # find_data resolves the folder it lists
            if path.is_relative_to(root):
                return logical_path(path.relative_to(root))
        return Path(path.name)

    def origin(self, source: str) -> SliceOrigin:
        """Where the slice came from (its file read once for all its slices)."""
        path, position = source_file(source)
        if self._origins is None or self._origins[0] != path:
            try:
                self._origins = (path, slice_origins(path, self.prep))
            except BadFile as problem:  # read a moment ago: it changed on disk since
                raise UsageError(f"{path}: {problem}") from None
        return self._origins[1][position or 0]

    def _target(self, kind: str, source: str, origin: SliceOrigin, npy: bool) -> Path:
        """Where an output goes: kind/<file>.npy (npy), or kind/<file> in the input's own format."""
        relative = self.relative(source)
        name, part = relative.name, "" if origin.slice_index is None else f".slice{origin.slice_index}"
        if npy:
            name += part + ".npy"
        else:
            suffix = _image_suffix(name)
            name = name[: len(name) - len(suffix)] + part + suffix
        target = self.folder / kind / relative.parent / name
        if target in self._written:
            raise UsageError(f"{source}: another input already wrote {target}; give the inputs distinct names")
        self._written.add(target)
        return target

    def write_map(self, kind: str, source: str, values: torch.Tensor) -> Path:
        """A map [H, W] at the network's size as float32 at the input's size: kind/<file>.npy, and for a NIfTI input
        kind/<file> too, laid out and placed as the input (its affine and header)."""
        origin = self.origin(source)
        restored = unfit_from_shape(values[None].float().cpu(), origin.shape, self.prep.resize)[0].numpy()
        restored = restored.astype(np.float32)
        target = self._target(kind, source, origin, npy=True)
        save_npy(target, restored)
        if origin.affine is not None:
            save_nifti(self._target(kind, source, origin, npy=False), *origin.placed(restored), origin.header)
        return target

    def write_image(self, kind: str, source: str, image: torch.Tensor) -> Path:
        """An image [C, H, W] in [0, 1] at the network's size, as a file like its input: NIfTI in the input's own
        intensities (uint8 for 8-bit inputs) with its affine and header, or a picture of the input's format, 16-bit
        where the input was (a one-channel model gives colour inputs back in grey)."""
        origin = self.origin(source)
        restored = unfit_from_shape(image.float().cpu(), origin.shape, self.prep.resize).clamp(0, 1).numpy()
        target = self._target(kind, source, origin, npy=False)
        if origin.affine is not None:
            save_nifti(target, *origin.placed(_in_own_units(restored.mean(axis=0), origin)), origin.header)
        else:
            values = _in_own_units(restored, origin)
            save_picture(target, values[0] if len(values) == 1 else np.transpose(values, (1, 2, 0)))
        return target


def _in_own_units(values: np.ndarray, origin: SliceOrigin) -> np.ndarray:
    """Values in [0, 1] back in the file's intensities: uint8 for 8-bit files; NIfTI float32 in the range the robust
    scaling mapped to [0, 1]; 16-bit pictures as uint16 in theirs."""
    if origin.intensity_range is None:
        return np.round(values * 255).astype(np.uint8)
    low, high = origin.intensity_range
    values = low + values * (high - low)
    if origin.affine is not None:
        return values.astype(np.float32)
    return np.round(values).clip(0, 65535).astype(np.uint16)
