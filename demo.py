"""The built-in demo data: synthetic pelvis-like MRI phantoms, written once (deterministically) as 2D NIfTI slices
in the HipMRI layout, or as 3D NIfTI volumes."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from utils import atomic_write, build_once, progress_bar

Log = Callable[[str], None]


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


