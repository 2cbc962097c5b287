"""Tiny generated datasets in the layouts users have."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo import make_phantom, make_phantom_volume  # noqa: E402


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return path


def write_png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def phantom_uint8(seed: int, shape=(32, 32)) -> np.ndarray:
    image = make_phantom(seed, 0.5, shape)
    return np.round(255 * image / image.max()).astype(np.uint8)


def make_hipmri(root: Path, counts=(12, 4, 4), shape=(32, 16)) -> Path:
    """keras_slices_data/keras_slices_{train,validate,test}/case_XXX_week_0_slice_Y.nii.gz, float, odd range."""
    data = root / "keras_slices_data"
    for split, count in zip(("train", "validate", "test"), counts):
        for index in range(count):
            image = make_phantom(1000 * len(split) + index, index / max(1, count), shape)
            write_nifti(data / f"keras_slices_{split}" / f"case_{index:03d}_week_0_slice_{index}.nii.gz", image)
    return data


def make_oasis(root: Path, counts=(12, 4, 4), shape=(32, 32)) -> Path:
    """keras_png_slices_data with image splits and *_seg_* mask splits that must never be read."""
    data = root / "keras_png_slices_data"
    for split, count in zip(("train", "validate", "test"), counts):
        for index in range(count):
            name = f"case_{index:03d}_slice_0.nii.png"
            write_png(data / f"keras_png_slices_{split}" / name, phantom_uint8(7 * index + len(split), shape))
            write_png(data / f"keras_png_slices_seg_{split}" / name, np.zeros(shape, np.uint8))
    return data


def make_volumes(root: Path, counts=(8, 2, 2), shape=(16, 16, 16)) -> Path:
    """volumes_{train,validate,test}/case_XXX.nii.gz: 3D phantom volumes in RAS order, 2 mm voxels."""
    for split, count in zip(("train", "validate", "test"), counts):
        for index in range(count):
            volume = make_phantom_volume(1000 * len(split) + index, shape)
            write_nifti(root / f"volumes_{split}" / f"case_{index:03d}.nii.gz", volume, np.diag([2.0, 2, 2, 1]))
    return root


def make_classes(root: Path, classes=("alpha", "beta"), per_class=6, shape=(32, 32)) -> Path:
    for class_index, name in enumerate(classes):
        for index in range(per_class):
            write_png(root / "train" / name / f"{index}.png", phantom_uint8(100 * class_index + index, shape))
    return root


@pytest.fixture
def hipmri_dir(tmp_path: Path) -> Path:
    return make_hipmri(tmp_path)


@pytest.fixture
def oasis_dir(tmp_path: Path) -> Path:
    return make_oasis(tmp_path)
