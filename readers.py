"""One file to arrays: reading NIfTI slices and volumes and PNG/JPG/TIF pictures, scaling their intensities, and
fitting them to the network's shape without distortion. A file that cannot be used raises BadFile."""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from utils import UsageError, atomic_write, shape_text

NIFTI_SUFFIXES = (".nii", ".nii.gz")

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


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


# ----------------------------------------------------------------------------- slices and pictures

def unreadable(error: Exception) -> BadFile:
    """The skip message of a file its decoder failed on (the decoders raise many types for damaged files)."""
    return BadFile(f"cannot be read ({type(error).__name__}: {str(error).strip()[:120]})")


def robust_range(array: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """The intensities that become 0 and 1: the given percentiles, or the full range when most pixels share one
    value. Python floats: they keep float32 data float32."""
    low, high = (float(value) for value in np.percentile(array, percentiles))
    if high <= low:
        low, high = float(array.min()), float(array.max())
    return low, high


def _scale_robust(array: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    low, high = robust_range(array, percentiles)
    return np.clip((array - low) / (high - low), 0, 1)


class RawSlice(NamedTuple):
    """A 2D slice as read: its values, whether they are 8-bit data, and its index along the slice axis when it was
    cut from a 3D volume (None for a 2D file)."""

    array: np.ndarray
    eight_bit: bool
    index: int | None = None


def _usable(array: np.ndarray) -> bool:
    return bool(np.isfinite(array).all() and array.max() > array.min())


def _read_nifti(path: Path, prep: Preprocessing) -> list[RawSlice]:
    import nibabel as nib

    image = nib.load(str(path))
    eight_bit = image.get_data_dtype() == np.uint8
    volume = np.asarray(image.get_fdata(dtype=np.float32))
    while volume.ndim > 2 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    if volume.ndim == 2:
        return [RawSlice(volume, eight_bit)]
    if volume.ndim != 3:
        raise BadFile(f"has {volume.ndim} dimensions {volume.shape}; expected a 2D slice or a 3D volume")
    if not -3 <= prep.slice_axis < 3:
        raise UsageError(f"--slice-axis {prep.slice_axis} is out of range for 3D volume {path}")
    slices = np.moveaxis(volume, prep.slice_axis, 0)
    kept = [RawSlice(array, eight_bit, index) for index, array in enumerate(slices) if _usable(array)]
    if not kept:
        raise BadFile("is a 3D volume whose slices are all empty or constant")
    return kept


def _read_picture(path: Path, prep: Preprocessing) -> list[RawSlice]:
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            array = np.asarray(image, dtype=np.float32)
            return [RawSlice(np.repeat(array[..., None], 3, axis=-1) if prep.channels == 3 else array, False)]
        converted = image.convert("RGB" if prep.channels == 3 else "L")
        return [RawSlice(np.asarray(converted, dtype=np.float32), True)]


def _raw_slices(path: Path, prep: Preprocessing) -> list[RawSlice]:
    """A file's 2D slices as read. Raises BadFile."""
    reader = _read_nifti if path.name.lower().endswith(NIFTI_SUFFIXES) else _read_picture
    try:
        return reader(path, prep)
    except (BadFile, UsageError):
        raise
    except Exception as error:
        raise unreadable(error) from None


def read_slices(path: Path, prep: Preprocessing) -> list[np.ndarray]:
    """The 2D slices of one file as float32 [C, H, W] arrays in [0, 1], before resizing. Raises BadFile."""
    raw_slices = _raw_slices(path, prep)
    slices = []
    for array, eight_bit, _ in raw_slices:
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


def _fitted_size(original: Sequence[int], shape: Sequence[int], mode: str) -> tuple[tuple[int, int], float]:
    """The size [h, w] a 2D image of `original` size is scaled to before it is padded or cropped to `shape`, and
    the scale: fit inside (mode "fit") or cover (mode "crop"), without distorting the aspect ratio."""
    (height, width), (target_h, target_w) = original, shape
    ratios = (target_h / height, target_w / width)
    scale = min(ratios) if mode == "fit" else max(ratios)
    if scale == 1:
        return (height, width), scale
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    if mode == "fit":
        return (min(size[0], target_h), min(size[1], target_w)), scale
    return (max(size[0], target_h), max(size[1], target_w)), scale


def fit_to_shape(image: np.ndarray, shape: tuple[int, int], mode: str = "fit") -> np.ndarray:
    """Resize [C, H, W] to shape without distorting the aspect ratio: fit inside and pad, or cover and crop."""
    size, scale = _fitted_size(image.shape[-2:], shape, mode)
    tensor = torch.from_numpy(np.ascontiguousarray(image))[None]
    if scale != 1:
        tensor = F.interpolate(tensor, size=size, mode="bilinear", antialias=scale < 1, align_corners=False)
    return _centre(tensor, shape)[0].clamp_(0, 1).numpy()


def unfit_from_shape(image: torch.Tensor, original: Sequence[int], mode: str = "fit") -> torch.Tensor:
    """fit_to_shape undone: an image (or anomaly map) [C, h, w] at the network's size back at the `original` [H, W]
    of the file it came from, the padding dropped (mode "fit") or the cropped-off border filled with zeros ("crop").
    Values are interpolated, not clamped."""
    size, scale = _fitted_size(original, image.shape[-2:], mode)
    pads: list[int] = []  # _centre's padding (or crop) taken off again: the same offsets, the other sign
    for fitted, target in zip(reversed(size), reversed(image.shape[-2:])):
        missing = target - fitted
        pads += [-(missing // 2), -(missing - missing // 2)]
    restored = F.pad(image[None].float(), pads)
    if scale != 1:
        restored = F.interpolate(restored, size=tuple(original), mode="bilinear", antialias=scale > 1,
                                 align_corners=False)
    return restored[0]


@dataclass
class SliceOrigin:
    """What it takes to give an array at the network's size back in a file's own terms: the slice's shape as read
    (a NIfTI's array axes, a picture's rows and columns), the intensities that became 0 and 1 (None: 8-bit data,
    divided by 255), and for NIfTI files the stored shape, affine and header, and for a slice of a volume its index
    along the slice axis."""

    shape: tuple[int, int]
    intensity_range: tuple[float, float] | None
    affine: np.ndarray | None = None
    stored_shape: tuple[int, ...] | None = None
    header: object | None = None  # nibabel's header of the file: its units and orientation codes
    slice_index: int | None = None
    slice_axis: int = 2

    def placed(self, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A 2D array [shape] laid out as the file stores its slice, with the affine that puts it where the slice is:
        the file's own shape and affine, or for a slice of a volume one slice thick along the slice axis, its affine
        moved to that slice."""
        if self.slice_index is None:
            return array.reshape(self.stored_shape), self.affine
        shift = np.eye(4)
        shift[self.slice_axis, 3] = self.slice_index
        return np.expand_dims(array, self.slice_axis), self.affine @ shift


def slice_origins(path: Path, prep: Preprocessing) -> list[SliceOrigin]:
    """The origin of each slice preprocess_file gives for a 2D run, in the same order. Raises BadFile."""
    nifti = {}
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        image = nib.load(str(path))
        nifti = {"affine": np.asarray(image.affine, dtype=np.float64), "stored_shape": tuple(image.shape),
                 "header": image.header, "slice_axis": prep.slice_axis % 3}
    return [SliceOrigin(tuple(raw.array.shape[:2]),
                        None if raw.eight_bit else robust_range(raw.array, prep.percentiles),
                        slice_index=raw.index, **nifti) for raw in _raw_slices(path, prep)]


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray, header=None) -> None:
    """An array as a NIfTI file (.nii or .nii.gz, by its name), written whole; with a source file's header (its
    units and orientation codes) when given, its data type and scaling set for this array."""
    import nibabel as nib

    if header is not None:
        header = header.copy()
        header.set_data_dtype(array.dtype)
        header.set_slope_inter(None, None)
    image = nib.Nifti1Image(array, affine, header)
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"

    def write(tmp: str) -> None:  # nibabel compresses by the name it writes: the temporary file gets the real suffix
        named = tmp + suffix
        try:
            nib.save(image, named)
            os.replace(named, tmp)
        finally:
            if os.path.exists(named):
                os.remove(named)

    atomic_write(path, write)


def save_picture(path: Path, array: np.ndarray) -> None:
    """An array [H, W] or [H, W, 3] (uint8, or uint16 for 16-bit pictures) as a picture in the format its suffix
    names (PNG when the suffix names none), written whole."""
    from PIL import Image

    picture = Image.fromarray(array)
    file_format = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    atomic_write(path, lambda tmp: picture.save(tmp, format=file_format))


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


# ----------------------------------------------------------------------------- volumes (3D runs)

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


def preprocess_file(path: Path, prep: Preprocessing, min_side: int) -> list[np.ndarray]:
    """A file's slices (or its volume) preprocessed to uint8 arrays at the configured shape. Raises BadFile."""
    if prep.spatial_dims == 3:
        return [_preprocess_volume(path, prep, min_side)]
    slices = read_slices(path, prep)
    height, width = slices[0].shape[-2:]
    if min(height, width) < min_side:
        raise BadFile(f"is {height}x{width}, smaller than the {min_side}x{min_side} the network needs")
    return [np.round(fit_to_shape(s, prep.image_size, prep.resize) * 255).astype(np.uint8) for s in slices]


def write_image(path: Path, image: torch.Tensor) -> None:
    """One image [C, H, W] in [0, 1] as an 8-bit file, written whole: a PNG, or a uint8 2D NIfTI (.nii.gz) that
    read_slices gives back as it was (8-bit data is divided by 255)."""
    array = np.round(image.detach().float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        if array.shape[0] != 1:
            raise ValueError(f"a NIfTI slice has one channel, this image has {array.shape[0]}")
        save_nifti(path, array[0], np.eye(4))
        return
    save_picture(path, array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0)))
