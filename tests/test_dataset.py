from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import dataset
from conftest import make_classes, make_hipmri, phantom_uint8, write_nifti, write_png
from dataset import BatchLoader, Preprocessing, find_data, fit_to_shape, load_split, read_slices
from utils import UsageError

PREP = Preprocessing(image_size=(32, 16))


def quiet(_: str) -> None:
    pass


# ----------------------------------------------------------------------------- finding splits

def test_hipmri_layout_found_from_the_data_folder_and_its_parent(hipmri_dir: Path):
    for folder in (hipmri_dir, hipmri_dir.parent):
        source = find_data(folder)
        assert source.root == hipmri_dir
        assert {split: len(files) for split, files in source.files.items()} == {"train": 12, "validate": 4, "test": 4}


def test_oasis_layout_never_reads_segmentation_masks(oasis_dir: Path):
    source = find_data(oasis_dir.parent)
    assert {split: len(files) for split, files in source.files.items()} == {"train": 12, "validate": 4, "test": 4}
    assert not any("seg" in str(path) for files in source.files.values() for path, _ in files)


def test_generic_layout_with_class_folders_keeps_labels(tmp_path: Path):
    make_classes(tmp_path)
    for name in ("valid", "test"):
        write_png(tmp_path / name / "alpha" / "x.png", phantom_uint8(1))
    source = find_data(tmp_path)
    assert set(source.files) == {"train", "validate", "test"}
    assert source.class_names == ["alpha", "beta"]
    assert {label for _, label in source.files["train"]} == {"alpha", "beta"}
    slices = load_split(source, "train", Preprocessing(image_size=(32, 32)), tmp_path / "cache", log=quiet)
    assert sorted(slices.labels.unique().tolist()) == [0, 1]


def test_missing_validation_is_carved_deterministically_and_said(tmp_path: Path):
    make_classes(tmp_path, per_class=10)
    first, second = find_data(tmp_path, val_fraction=0.2), find_data(tmp_path, val_fraction=0.2)
    assert len(first.files["validate"]) == 4 and len(first.files["train"]) == 16
    assert first.files["validate"] == second.files["validate"]
    assert not {p for p, _ in first.files["validate"]} & {p for p, _ in first.files["train"]}
    assert any("no validation split" in note for note in first.notes)
    assert any("no test split" in note for note in first.notes) and "test" not in first.files


def test_a_plain_folder_of_images_is_used_for_training(tmp_path: Path):
    for index in range(5):
        write_png(tmp_path / f"{index}.png", phantom_uint8(index))
    source = find_data(tmp_path)
    assert len(source.files["train"]) + len(source.files["validate"]) == 5


# ----------------------------------------------------------------------------- readers and preprocessing

def test_float_nifti_is_scaled_robustly_to_unit_range(tmp_path: Path):
    image = np.random.default_rng(0).normal(1000, 300, (40, 20)).astype(np.float32)
    image[0, 0] = 1e6  # one hot pixel must not squash the rest
    (result,) = read_slices(write_nifti(tmp_path / "a.nii.gz", image), PREP)
    assert result.shape == (1, 40, 20) and result.min() == 0 and result.max() == 1
    assert 0.3 < np.median(result) < 0.7


def test_eight_bit_png_is_divided_by_255_and_rgb_becomes_gray(tmp_path: Path):
    gray = phantom_uint8(3)
    (result,) = read_slices(write_png(tmp_path / "g.png", gray), PREP)
    np.testing.assert_allclose(result[0], gray / 255.0, atol=1e-6)
    rgb = np.stack([gray] * 3, axis=-1)
    (as_gray,) = read_slices(write_png(tmp_path / "rgb.jpg", rgb), PREP)
    assert as_gray.shape == (1, 32, 32)
    (as_rgb,) = read_slices(tmp_path / "rgb.jpg", Preprocessing(image_size=(32, 32), channels=3))
    assert as_rgb.shape == (3, 32, 32)


def test_3d_volume_is_cut_into_slices_and_empty_slices_are_skipped(tmp_path: Path):
    volume = np.zeros((16, 16, 6), np.float32)
    for index in (1, 2, 4):
        volume[:, :, index] = make_phantom_slice(index)
    slices = read_slices(write_nifti(tmp_path / "vol.nii.gz", volume), Preprocessing(slice_axis=2))
    assert len(slices) == 3 and all(s.shape == (1, 16, 16) for s in slices)
    along_first = read_slices(tmp_path / "vol.nii.gz", Preprocessing(slice_axis=0))
    assert all(s.shape == (1, 16, 6) for s in along_first)


def make_phantom_slice(seed: int) -> np.ndarray:
    return dataset.make_phantom(seed, 0.5, (16, 16))


def test_fit_pads_without_distorting_the_aspect_ratio():
    image = np.ones((1, 256, 128), np.float32)
    fitted = fit_to_shape(image, (128, 128), "fit")
    assert fitted.shape == (1, 128, 128)
    np.testing.assert_allclose(fitted[0, :, 32:96], 1.0, atol=1e-5)  # content 128x64, centred
    assert fitted[0, :, :32].max() == 0 and fitted[0, :, 96:].max() == 0
    cropped = fit_to_shape(image, (64, 64), "crop")
    assert cropped.shape == (1, 64, 64) and cropped.min() > 0.99
    native = fit_to_shape(image, (256, 128), "fit")
    np.testing.assert_array_equal(native, image)


def test_native_size_is_the_common_shape_rounded_to_the_code_cell(tmp_path: Path):
    data = make_hipmri(tmp_path, shape=(30, 16))
    source = find_data(data)
    assert dataset.native_image_size(source.files["train"], 4) == (32, 16)


# ----------------------------------------------------------------------------- caching

def test_second_load_reads_the_cache_and_decodes_no_file(hipmri_dir: Path, tmp_path: Path, monkeypatch):
    source = find_data(hipmri_dir)
    first = load_split(source, "train", PREP, tmp_path / "cache", log=quiet)
    assert first.images.dtype == torch.uint8 and first.images.shape == (12, 1, 32, 16)
    assert not list((tmp_path / "cache").glob("*.tmp"))

    def no_decoding(*_args, **_kwargs):
        raise AssertionError("a file was decoded although the cache was valid")

    monkeypatch.setattr(dataset, "read_slices", no_decoding)
    second = load_split(source, "train", PREP, tmp_path / "cache", log=quiet)
    assert torch.equal(first.images, second.images) and second.sources == first.sources


def test_cache_is_rebuilt_when_inputs_or_settings_change(hipmri_dir: Path, tmp_path: Path):
    source = find_data(hipmri_dir)
    cache = tmp_path / "cache"
    load_split(source, "train", PREP, cache, log=quiet)
    load_split(source, "train", Preprocessing(image_size=(16, 16)), cache, log=quiet)
    path = source.files["train"][0][0]
    write_nifti(path, dataset.make_phantom(99, 0.1, (32, 16)))
    changed = load_split(find_data(hipmri_dir), "train", PREP, cache, log=quiet)
    assert len(list(cache.glob("train-*.npy"))) == 3
    assert changed.images.shape == (12, 1, 32, 16)


def test_batch_loader_covers_every_slice_once_per_epoch(hipmri_dir: Path, tmp_path: Path):
    slices = load_split(find_data(hipmri_dir), "train", PREP, tmp_path / "cache", log=quiet)
    loader = BatchLoader(slices.images, slices.labels, batch_size=5, shuffle=True, device=torch.device("cpu"), seed=1)
    batches = list(loader)
    assert len(batches) == 3 and sum(len(images) for images, _ in batches) == 12
    assert all(images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1 for images, _ in batches)
    again = [images for images, _ in loader]
    assert all(torch.equal(a, b) for (a, _), b in zip(batches, again))  # same epoch, same order


# ----------------------------------------------------------------------------- bad input

def test_missing_and_empty_folders_are_clear_errors(tmp_path: Path):
    with pytest.raises(UsageError, match="not found"):
        find_data(tmp_path / "nope")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(UsageError, match="no images found"):
        find_data(tmp_path / "empty")


def test_bad_files_are_skipped_counted_and_named(hipmri_dir: Path, tmp_path: Path):
    train = hipmri_dir / "keras_slices_train"
    (train / "corrupt.nii.gz").write_bytes(b"not a nifti file at all")
    nan_image = np.ones((32, 16), np.float32)
    nan_image[3, 3] = np.nan
    write_nifti(train / "nan.nii.gz", nan_image)
    write_nifti(train / "constant.nii.gz", np.full((32, 16), 7.0, np.float32))
    write_nifti(train / "tiny.nii.gz", np.arange(4, dtype=np.float32).reshape(2, 2))
    messages: list[str] = []
    slices = load_split(find_data(hipmri_dir), "train", PREP, tmp_path / "cache", min_side=4, log=messages.append)
    assert len(slices) == 12
    text = "\n".join(messages)
    assert "skipped 4 of 16 files" in text
    assert "corrupt.nii.gz: cannot be read" in text
    assert "nan.nii.gz: contains NaN" in text
    assert "constant.nii.gz: is constant" in text
    assert "tiny.nii.gz: is 2x2, smaller than" in text


def test_a_split_of_only_bad_files_stops_with_one_clear_error(tmp_path: Path):
    for index in range(3):
        (tmp_path / "train").mkdir(exist_ok=True)
        (tmp_path / "train" / f"{index}.png").write_bytes(b"garbage")
    source = find_data(tmp_path)
    with pytest.raises(UsageError, match=r"none of the 2 files in the train split could be used \(first problem: "):
        load_split(source, "train", PREP, tmp_path / "cache", log=quiet)


# ----------------------------------------------------------------------------- demo data

def test_demo_data_is_deterministic_and_in_the_hipmri_layout(tmp_path: Path):
    counts = {"train": 3, "validate": 2, "test": 2}
    first = dataset.make_demo_data(tmp_path / "a", counts=counts, shape=(32, 16), log=quiet)
    second = dataset.make_demo_data(tmp_path / "b", counts=counts, shape=(32, 16), log=quiet)
    source = find_data(first)
    assert {split: len(files) for split, files in source.files.items()} == counts
    for path, _ in source.files["train"]:
        image = read_slices(path, PREP)[0]
        other = read_slices(second / path.relative_to(first), PREP)[0]
        np.testing.assert_array_equal(image, other)
