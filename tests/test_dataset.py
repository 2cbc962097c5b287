from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints
import dataset
import demo
import metrics
import readers
from conftest import make_classes, make_hipmri, make_oasis, phantom_uint8, write_nifti, write_png
from dataset import BatchLoader, find_data, load_split
from readers import Preprocessing, fit_to_shape, read_slices
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

def test_the_folder_an_archive_was_unpacked_to_finds_its_one_data_set(tmp_path: Path):
    """The HipMRI archive unpacks to HipMRI_study_keras_slices_data/ (one level down), OASIS may sit two levels
    down; the Mac resource forks and dot-folders beside them are never read."""
    hipmri = tmp_path / "downloads" / "HipMRI_study" / "HipMRI_study_keras_slices_data"
    make_hipmri(tmp_path / "downloads" / "HipMRI_study").rename(hipmri)  # made as keras_slices_data/
    mac = tmp_path / "downloads" / "HipMRI_study" / "__MACOSX" / "HipMRI_study_keras_slices_data"
    (mac / "keras_slices_train").mkdir(parents=True)
    (mac / "keras_slices_train" / "._case_000_week_0_slice_0.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    write_png(hipmri / "keras_slices_train" / ".ipynb_checkpoints" / "stray.png", phantom_uint8(5))
    for folder in (tmp_path / "downloads" / "HipMRI_study", tmp_path / "downloads"):
        source = find_data(folder)
        assert source.root == hipmri.resolve()
        assert {split: len(files) for split, files in source.files.items()} == {"train": 12, "validate": 4, "test": 4}
        assert all(path.parent.name == "keras_slices_train" for path, _ in source.files["train"])
        assert any("data set found in" in note for note in source.notes)
    oasis = make_oasis(tmp_path / "o" / "archive")
    assert find_data(tmp_path / "o").root == oasis.resolve()


def test_a_folder_holding_several_data_sets_is_refused_naming_them(tmp_path: Path):
    make_hipmri(tmp_path / "data")
    make_oasis(tmp_path / "data")
    with pytest.raises(UsageError, match="holds 2 data sets .*keras_png_slices_data/, keras_slices_data/"):
        find_data(tmp_path / "data")


def test_split_folders_deeper_than_two_levels_are_never_merged_into_one_training_set(tmp_path: Path):
    make_hipmri(tmp_path / "a" / "b")  # .../a/b/keras_slices_data/keras_slices_{train,validate,test}: 3 down
    with pytest.raises(UsageError, match="more than two levels down"):
        find_data(tmp_path)


def test_a_case_unzipped_into_a_folder_of_its_name_is_that_file_not_a_class(tmp_path: Path):
    """Some unzip tools leave case_x.nii.gz as case_x.nii/case_x.nii: no class per slice, cases still grouped."""
    for case in range(5):
        for index in range(4):
            name = f"case_{case:03d}_week_0_slice_{index}.nii"
            write_nifti(tmp_path / "train" / name / name, demo.make_phantom(case, index / 4, (32, 16)))
    source = find_data(tmp_path, val_fraction=0.2)
    assert source.class_names == [] and {label for _, label in source.files["train"]} == {""}
    held_out = {path.name.split("_slice")[0] for path, _ in source.files["validate"]}
    trained = {path.name.split("_slice")[0] for path, _ in source.files["train"]}
    assert len(source.files["validate"]) == 4 and len(held_out) == 1 and not held_out & trained
    slices = load_split(source, "train", PREP, tmp_path / "cache", log=quiet)
    assert len(slices) == 16 and bool((slices.labels == -1).all())


def test_a_test_split_is_evaluated_without_a_train_split_to_carve(tmp_path: Path):
    write_nifti(tmp_path / "train" / "case_000.nii.gz", demo.make_phantom(0, 0.5, (32, 16)))
    for index in range(3):
        write_nifti(tmp_path / "test" / f"case_{index + 1:03d}.nii.gz", demo.make_phantom(index, 0.5, (32, 16)))
    source = find_data(tmp_path, require_train=False)
    assert len(source.split_files("test")) == 3 and "validate" not in source.files
    with pytest.raises(UsageError, match="only one training image and no validation split"):
        source.split_files("validate")
    only_test = tmp_path / "only_test"
    only_test.mkdir()
    (tmp_path / "test").rename(only_test / "test")
    assert len(find_data(only_test, require_train=False).split_files("test")) == 3
    with pytest.raises(UsageError, match="no training split"):
        find_data(only_test)


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
    return demo.make_phantom(seed, 0.5, (16, 16))


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
    assert readers.native_image_size(source.files["train"], 4) == (32, 16)


# ----------------------------------------------------------------------------- caching

def test_second_load_reads_the_cache_and_decodes_no_file(hipmri_dir: Path, tmp_path: Path, monkeypatch):
    source = find_data(hipmri_dir)
    first = load_split(source, "train", PREP, tmp_path / "cache", log=quiet)
    assert first.images.dtype == torch.uint8 and first.images.shape == (12, 1, 32, 16)
    assert not list((tmp_path / "cache").glob("*.tmp"))

    def no_decoding(*_args, **_kwargs):
        raise AssertionError("a file was decoded although the cache was valid")

    monkeypatch.setattr(readers, "read_slices", no_decoding)
    second = load_split(source, "train", PREP, tmp_path / "cache", log=quiet)
    assert torch.equal(first.images, second.images) and second.sources == first.sources


def test_cache_is_rebuilt_when_inputs_or_settings_change(hipmri_dir: Path, tmp_path: Path):
    source = find_data(hipmri_dir)
    cache = tmp_path / "cache"
    load_split(source, "train", PREP, cache, log=quiet)
    load_split(source, "train", Preprocessing(image_size=(16, 16)), cache, log=quiet)
    path = source.files["train"][0][0]
    write_nifti(path, demo.make_phantom(99, 0.1, (32, 16)))
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
    first = demo.make_demo_data(tmp_path / "a", counts=counts, shape=(32, 16), log=quiet)
    second = demo.make_demo_data(tmp_path / "b", counts=counts, shape=(32, 16), log=quiet)
    source = find_data(first)
    assert {split: len(files) for split, files in source.files.items()} == counts
    for path, _ in source.files["train"]:
        image = read_slices(path, PREP)[0]
        other = read_slices(second / path.relative_to(first), PREP)[0]
        np.testing.assert_array_equal(image, other)


# ----------------------------------------------------------------------------- full-scale behaviour

@pytest.mark.parametrize("name, case", [("case_004_week_0_slice_0.nii.gz", "case_004"),
                                        ("case_001_slice_0.nii.png", "case_001"), ("scan7_slice_12.png", "scan7"),
                                        ("Tr-glTr_0000.jpg", None)])
def test_case_ids_come_from_the_file_names(name: str, case: str | None):
    assert dataset.case_id(Path("glioma") / name) == (None if case is None else f"glioma/{case}")


def test_a_carved_validation_split_never_shares_a_case_with_training(tmp_path: Path):
    for case in range(20):
        for week in (0, 5):  # HipMRI: several scans of one patient
            for index in range(6):
                path = tmp_path / "train" / f"case_{case:03d}_week_{week}_slice_{index}.nii.gz"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
    source = find_data(tmp_path, val_fraction=0.1)

    def cases(split: str) -> set[str]:
        return {path.name[:8] for path, _ in source.files[split]}

    assert not cases("train") & cases("validate")
    assert len(cases("validate")) == 2 and len(source.files["validate"]) == 24
    assert any("2 of 20 cases, grouped by the case id" in note for note in source.notes)
    assert find_data(tmp_path, val_fraction=0.1).files == source.files


def test_the_carve_ranks_by_relative_path_not_by_bare_file_name(tmp_path: Path):
    for name in ("alpha", "beta"):
        for index in range(20):
            path = tmp_path / "train" / name / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    held_out = find_data(tmp_path, val_fraction=0.2).files["validate"]
    names = {label: {path.name for path, cls in held_out if cls == label} for label in ("alpha", "beta")}
    assert names["alpha"] != names["beta"]  # ranked by bare names, both classes would lose the same files


def identity(batch: torch.Tensor) -> torch.Tensor:
    return batch


def items(loader: BatchLoader, start: int = 0) -> list[int]:
    return [int(value) for batch, _ in loader.batches(start) for value in batch.flatten()]


def test_training_shards_give_every_process_the_same_number_of_steps():
    data, labels = torch.arange(10).view(10, 1, 1, 1), torch.zeros(10, dtype=torch.long)
    loaders = [BatchLoader(data, labels, 2, True, torch.device("cpu"), seed=3, rank=rank, world_size=3,
                           convert=identity) for rank in range(3)]
    assert {len(loader) for loader in loaders} == {2} and {len(list(loader)) for loader in loaders} == {2}
    seen = [value for loader in loaders for value in items(loader)]
    assert len(seen) == 12 and set(seen) == set(range(10))  # two items repeat to fill the last round


def test_an_epoch_resumed_with_another_number_of_processes_goes_on_where_it_stopped():
    data, labels = torch.arange(24).view(24, 1, 1, 1), torch.zeros(24, dtype=torch.long)
    one = BatchLoader(data, labels, 2, True, torch.device("cpu"), seed=5, convert=identity)
    two = [BatchLoader(data, labels, 2, True, torch.device("cpu"), seed=5, rank=rank, world_size=2,
                       convert=identity) for rank in range(2)]
    done = {value for loader in two for batch, _ in list(loader)[:3] for value in batch.flatten().tolist()}
    position = 3 * two[0].items_per_step  # three steps of two processes
    rest = items(one, position)
    assert len(done) == 12 and not done & set(rest) and done | set(rest) == set(range(24))
    assert items(one)[position:] == rest  # exactly the order a single process would have followed
    assert one.batches_left(position) == 6 and one.batches_left(24) == 0


def test_an_evaluation_shard_may_be_empty():
    data, labels = torch.zeros(1, 1, 8, 8, dtype=torch.uint8), torch.zeros(1, dtype=torch.long)
    empty = BatchLoader(data, labels, 4, False, torch.device("cpu"), rank=1, world_size=2)
    assert len(empty) == 0 and list(empty) == []
    from modules import VQVAE, VQVAEConfig

    model = VQVAE(VQVAEConfig(hidden_channels=16, residual_channels=8, num_embeddings=8, embedding_dim=4))
    result = metrics.evaluate_vqvae(model, empty)  # a process with nothing to evaluate adds zeros, and no error
    assert result["ssim"] == 0 and len(result["ssim_per_image"]) == 0


def load_in_another_process(data_root: str, cache: str, results, name: str) -> None:
    decode = dataset._decode_files

    def slow_decode(*args, **kwargs):  # long enough for the other process to arrive while this one decodes
        import time

        time.sleep(3)
        return decode(*args, **kwargs)

    dataset._decode_files = slow_decode
    messages: list[str] = []
    slices = load_split(find_data(data_root), "train", PREP, cache, log=messages.append)
    results[name] = (any(message.startswith("decoded") for message in messages), int(slices.images.sum()))


def test_processes_asking_for_one_cache_at_once_decode_it_once(hipmri_dir: Path, tmp_path: Path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    results = context.Manager().dict()
    workers = [context.Process(target=load_in_another_process, args=(str(hipmri_dir), str(tmp_path / "c"), results,
                                                                      name)) for name in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    decoded = sorted(result[0] for result in results.values())
    assert decoded == [False, True] and results["a"][1] == results["b"][1]


MEASURE_MAPPED_READ = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from dataset import BatchLoader, find_data, load_split
from readers import Preprocessing

def anonymous_mb():
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024

source, prep = find_data(sys.argv[2]), Preprocessing(image_size=(256, 256))
before = anonymous_mb()
slices = load_split(source, "train", prep, sys.argv[3], log=lambda _: None)
loader = BatchLoader(slices.images, slices.labels, 16, True, torch.device("cpu"), convert=lambda batch: batch)
assert all(int(batch.max()) > 0 for batch, _ in loader)  # every slice read
print(slices.images.numel() / 2**20, anonymous_mb() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc")
def test_cached_slices_are_memory_mapped_not_copied(tmp_path: Path):
    """Processes of one node share the decoded data through the file cache: reading a whole split adds no
    private copy of it (measured in a fresh process, away from the test runner's own allocations)."""
    import subprocess
    import sys

    image = phantom_uint8(0, (256, 256))
    for index in range(400):
        write_png(tmp_path / "data" / "train" / f"{index}.png", np.roll(image, index, axis=1))
    load_split(find_data(tmp_path / "data"), "train", Preprocessing(image_size=(256, 256)), tmp_path / "cache",
               log=quiet)
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", MEASURE_MAPPED_READ, str(root), str(tmp_path / "data"),
                             str(tmp_path / "cache")], capture_output=True, text=True, timeout=120, check=True)
    size_mb, added_mb = map(float, result.stdout.split())
    assert size_mb > 20 and added_mb < 0.25 * size_mb


def test_a_cache_build_killed_midway_is_rebuilt_and_its_leftovers_removed(hipmri_dir: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    source = find_data(hipmri_dir)
    load_split(source, "train", PREP, cache, log=quiet)
    (index,) = cache.glob("train-*.json")
    (images,) = cache.glob("train-*.npy")
    index.unlink()  # killed after writing the slices, before the index that vouches for them
    leftover = cache / f".{images.name}.x1y2z3.tmp"
    leftover.write_bytes(b"half of a cache")
    messages: list[str] = []
    slices = load_split(source, "train", PREP, cache, log=messages.append)
    assert any(message.startswith("decoded 12 train files") for message in messages)
    assert len(slices) == 12 and not leftover.exists()


def test_without_file_locks_the_cache_is_still_built(hipmri_dir: Path, tmp_path: Path, monkeypatch):
    """Some cluster file systems (Lustre, NFS without lock support) refuse flock: warn and go on."""
    import errno
    import fcntl

    def refuse(*_args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    messages: list[str] = []
    slices = load_split(find_data(hipmri_dir), "train", PREP, tmp_path / "cache", log=messages.append)
    assert len(slices) == 12 and any("No locks available" in message for message in messages)


def test_later_jobs_carve_the_validation_split_as_training_did(tmp_path: Path):
    make_classes(tmp_path, per_class=10)
    trained = find_data(tmp_path, val_fraction=0.3)
    checkpoint = {"data": {"root": str(tmp_path), "val_fraction": 0.3}}
    assert checkpoints.checkpoint_data(checkpoint, log=quiet).files == trained.files
    messages: list[str] = []
    checkpoints.checkpoint_data({"data": {"root": str(tmp_path)}}, log=messages.append)  # an older checkpoint
    assert any("may hold files the model trained on" in message for message in messages)
