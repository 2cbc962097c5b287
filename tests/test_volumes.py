"""3D mode: volumes read in canonical orientation and physical proportion, cached, skipped when unusable, and
trained, evaluated and turned into features with the same networks as 2D slices."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

import checkpoints
import figures
import metrics
import extract_features
import predict
import train
import train_prior
import utils
from conftest import make_volumes, write_nifti, write_png
from dataset import find_data, load_split
from demo import DEMO_VOXEL_MM, make_demo_data, make_phantom
from readers import Preprocessing, fit_volume, read_volume, volume_shape
from modules import VQVAEConfig, build_vqvae
from test_end_to_end import train_args
from utils import UsageError

VOLUMES = Preprocessing(image_size=(16, 16, 16), spatial_dims=3)


def asymmetric_volume(shape=(12, 10, 8)) -> np.ndarray:
    """Every voxel different: any flip or transposition shows."""
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_a_volume_stored_lps_comes_out_as_its_ras_twin(tmp_path: Path):
    ras = asymmetric_volume()
    write_nifti(tmp_path / "ras.nii.gz", ras, np.eye(4))
    # The same anatomy stored with x running to the left and y to the posterior: the first two axes reversed.
    write_nifti(tmp_path / "lps.nii.gz", ras[::-1, ::-1].copy(), np.diag([-1.0, -1, 1, 1]))
    read_ras, spacing_ras = read_volume(tmp_path / "ras.nii.gz", VOLUMES)
    read_lps, spacing_lps = read_volume(tmp_path / "lps.nii.gz", VOLUMES)
    np.testing.assert_array_equal(read_lps, read_ras)
    np.testing.assert_array_equal(spacing_lps, spacing_ras)
    # Axes stored in another order (z, y, x) come back in RAS order too, with their spacing.
    write_nifti(tmp_path / "zyx.nii.gz", ras.transpose(2, 1, 0).copy(), np.array(
        [[0, 0, 3.0, 0], [0, 2.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]]))
    read_zyx, spacing_zyx = read_volume(tmp_path / "zyx.nii.gz", VOLUMES)
    np.testing.assert_array_equal(read_zyx, read_ras)
    np.testing.assert_allclose(spacing_zyx, [3.0, 2.0, 1.0])


def sphere(shape, spacing, radius_mm: float) -> np.ndarray:
    axes = [(np.arange(side) + 0.5 - side / 2) * step for side, step in zip(shape, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    return (x**2 + y**2 + z**2 < radius_mm**2).astype(np.float32)


def extent_per_axis(volume: np.ndarray) -> list[int]:
    inside = volume > 0.5
    return [int(inside.any(axis=tuple(a for a in range(3) if a != axis)).sum()) for axis in range(3)]


def test_anisotropic_spacing_is_kept_in_physical_proportion(tmp_path: Path):
    spacing = (1.0, 1.0, 4.0)  # 32 x 32 x 8 voxels: a 32 mm cube, slices four times thicker than the pixels
    ball = sphere((32, 32, 8), spacing, 12.0)
    path = write_nifti(tmp_path / "ball.nii.gz", ball, np.diag([*spacing, 1.0]))
    assert volume_shape(path) == (32, 32, 32)  # the default shape: in voxels of the finest spacing
    volume, read_spacing = read_volume(path, VOLUMES)
    fitted = fit_volume(volume, read_spacing, (16, 16, 16))[0]
    extents = extent_per_axis(fitted)
    assert max(extents) - min(extents) <= 1, extents  # still a ball, not a disc
    assert 11 <= extents[0] <= 13  # 24 mm of 32 mm in 16 voxels
    # A shape of another proportion is padded, never stretched: the ball keeps its size in voxels.
    wide = fit_volume(volume, read_spacing, (32, 16, 16))[0]
    assert extent_per_axis(wide) == extents
    assert wide[:8].max() == 0 and wide[-8:].max() == 0


def test_volume_cache_round_trip(tmp_path: Path):
    data = make_volumes(tmp_path / "data", counts=(3, 1, 0))
    source = find_data(data)
    first = load_split(source, "train", VOLUMES, tmp_path / "cache", min_side=4, log=lambda _: None)
    assert first.images.shape == (3, 1, 16, 16, 16) and first.images.dtype == torch.uint8
    assert not list((tmp_path / "cache").glob(".*.tmp"))  # the decoding scratch file is gone
    messages: list[str] = []
    again = load_split(source, "train", VOLUMES, tmp_path / "cache", min_side=4, log=messages.append)
    assert not any("decoded" in message for message in messages)  # read back from the cache, not decoded again
    assert torch.equal(first.images, again.images) and again.sources == first.sources
    volume, spacing = read_volume(Path(first.sources[0]), VOLUMES)
    expected = np.round(fit_volume(volume, spacing, (16, 16, 16)) * 255).astype(np.uint8)
    np.testing.assert_array_equal(again.images[0].numpy(), expected)
    two_d = load_split(source, "train", Preprocessing(image_size=(16, 16)), tmp_path / "cache", log=lambda _: None)
    assert two_d.images.shape == (48, 1, 16, 16)  # without --spatial-dims 3 the same files are cut into slices


def test_every_unusable_file_is_skipped_with_one_line_naming_it(tmp_path: Path):
    data = make_volumes(tmp_path / "data", counts=(2, 1, 0))
    train_dir = data / "volumes_train"
    bad = {
        "four_d.nii.gz": (np.random.default_rng(0).random((8, 8, 8, 3)), "is 4D (8x8x8x3)"),
        "slice.nii.gz": (np.random.default_rng(1).random((16, 16)), "is a 2D slice (16x16)"),
        "tiny.nii.gz": (np.random.default_rng(2).random((2, 2, 2)), "is 2x2x2 voxels, smaller than one code cell"),
        "nan.nii.gz": (np.full((8, 8, 8), np.nan), "NaN"),
        "flat.nii.gz": (np.ones((8, 8, 8)), "is constant"),
    }
    for name, (array, _) in bad.items():
        write_nifti(train_dir / name, array.astype(np.float32))
    flat_axis = np.eye(4)
    flat_axis[2, 2] = 0  # the third axis points nowhere
    degenerate = nib.Nifti1Image(np.random.default_rng(3).random((8, 8, 8)).astype(np.float32), None)
    degenerate.set_sform(flat_axis, code=1)  # only the sform: a qform cannot even be made of it
    nib.save(degenerate, str(train_dir / "degenerate.nii.gz"))
    write_png(train_dir / "picture.png", np.zeros((16, 16), np.uint8))
    (train_dir / "broken.nii.gz").write_bytes(b"not a nifti file")
    messages: list[str] = []
    loaded = load_split(find_data(data), "train", VOLUMES, tmp_path / "cache", min_side=4, log=messages.append)
    assert len(loaded) == 2
    assert "skipped 8 of 10 files in the train split:" in messages
    for name, (_, problem) in bad.items():
        assert any(str(train_dir / name) in line and problem in line for line in messages), name
    assert any("picture.png" in line and "2D picture" in line for line in messages)
    assert any("broken.nii.gz" in line and "cannot be read" in line for line in messages)
    assert any("degenerate.nii.gz" in line and "degenerate affine" in line for line in messages)
    assert volume_shape(train_dir / "degenerate.nii.gz") is None  # the default shape looks past it
    only_bad = tmp_path / "bad"
    write_nifti(only_bad / "a.nii.gz", np.ones((8, 8, 8), np.float32))
    write_nifti(only_bad / "b.nii.gz", np.ones((8, 8, 8), np.float32))
    with pytest.raises(UsageError, match="none of the 1 files in the train split could be used"):
        load_split(find_data(only_bad), "train", VOLUMES, tmp_path / "cache", log=lambda _: None)


def test_3d_ssim_is_skimage_on_3d_arrays():
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(2, 1, 12, 9, 15, generator=generator)
    distorted = (reference + 0.3 * torch.rand(reference.shape, generator=generator)).clamp(0, 1)
    ours = metrics.ssim_per_image(distorted, reference)
    for index in range(2):
        theirs = structural_similarity(distorted[index, 0].numpy(), reference[index, 0].numpy(), win_size=7,
                                       data_range=1.0)
        assert ours[index].item() == pytest.approx(theirs, abs=1e-3)


def test_one_definition_serves_2d_and_3d():
    flat, deep = (build_vqvae(VQVAEConfig(spatial_dims=dims, hidden_channels=16, residual_channels=8,
                                          num_embeddings=16, embedding_dim=8)) for dims in (2, 3))
    assert list(flat.state_dict()) == list(deep.state_dict())  # the same modules, only the kernels gain an axis
    assert flat.encoder.layers[0].weight.dim() == 4 and deep.encoder.layers[0].weight.dim() == 5
    volumes = torch.rand(2, 1, 16, 8, 24)
    for levels in (1, 2):
        model = build_vqvae(VQVAEConfig(spatial_dims=3, levels=levels, hidden_channels=16, residual_channels=8,
                                        num_embeddings=16, embedding_dim=8))
        model.initialise_codebooks([volumes])
        model.eval()
        reconstruction, codes, loss = model(volumes)
        assert reconstruction.shape == volumes.shape and torch.isfinite(loss)
        maps = model.code_maps(volumes)
        assert maps[-1].shape == (2, 4, 2, 6)  # a 3D grid of indices per level
        torch.testing.assert_close(model.decode_code_maps(maps), reconstruction)


def test_demo_volumes_stack_the_phantom_slices_in_ras_order(tmp_path: Path):
    root = make_demo_data(tmp_path, counts={"train": 1}, shape=(16, 12, 8), volumes=True, log=lambda _: None)
    path = root / "volumes_train" / "case_000_week_0.nii.gz"
    image = nib.load(str(path))
    assert image.shape == (16, 12, 8) and np.allclose(nib.affines.voxel_sizes(image.affine), DEMO_VOXEL_MM)
    volume = torch.from_numpy(np.asarray(image.dataobj))
    axial = figures.mid_planes(volume)[0]  # shown with anterior up: the phantom slice as make_phantom draws it
    np.testing.assert_array_equal(axial.numpy(), make_phantom(0, 4 / 8, (12, 16)))


def test_3d_train_predict_features_and_the_prior_refuses(tmp_path: Path):
    data = make_volumes(tmp_path / "data", counts=(6, 2, 2))
    result = train.main(train_args(tmp_path, data, "--spatial-dims", "3", "--epochs", "2", "--kmeans-init",
                                   "--precision", "bf16"))
    saved = checkpoints.load_checkpoint(result["checkpoint"])
    assert saved["config"]["spatial_dims"] == 3 and tuple(saved["preprocessing"]["image_size"]) == (16, 16, 16)
    rows = utils.read_csv_rows(Path(result["figures"]) / "metrics.csv")
    assert len(rows) == 2 and 0 < float(rows[-1]["val_ssim"]) < 1
    cache = ["--cache-dir", str(tmp_path / "cache"), "--resources-dir", str(tmp_path / "res")]
    metrics = predict.main(["-m", result["checkpoint"], "--metrics-json", str(tmp_path / "m.json"), *cache])
    assert metrics["num_images"] == 2 and metrics == json.loads((tmp_path / "m.json").read_text())
    figures = tmp_path / "res" / "tiny"
    for name in ("test_reconstructions.png", "test_ssim_histogram.png", "test_code_usage.png"):
        assert (figures / name).exists(), name
    single = predict.main(["-m", result["checkpoint"], "--data", str(data / "volumes_test" / "case_000.nii.gz"),
                           *cache])
    assert single["num_images"] == 1

    features = extract_features.main(["-m", result["checkpoint"], "--out", str(tmp_path / "f.npz"), *cache])
    assert features["num_slices"] == 10
    with np.load(tmp_path / "f.npz") as stored:
        assert stored["codes"].shape == (10, 4, 4, 4)  # one 3D code map per volume
        assert stored["grid"].shape == (10, 8 * (8 + 64)) and stored["bag"].shape == (10, 32)
        assert stored["pixels"].shape == (10, 64)
    with pytest.raises(UsageError, match="3D VQ-VAE.*2D code maps only"):
        train_prior.main(["-m", result["checkpoint"], *cache, "--checkpoint-dir", str(tmp_path / "ck")])


def test_a_3d_run_resumes_exactly(tmp_path: Path):
    data = make_volumes(tmp_path / "data", counts=(8, 2, 0), shape=(8, 8, 8))
    args = ["--spatial-dims", "3", "--device", "cpu", "--epochs", "2"]
    straight = train.main(train_args(tmp_path / "a", data, *args))
    stopped = train.main(train_args(tmp_path / "b", data, *args, "--max-steps", "3"))
    resumed = train.main(["--resume", stopped["last_checkpoint"], "--max-steps", "0", "--device", "cpu"])
    first, second = (checkpoints.load_checkpoint(r["last_checkpoint"])["model"] for r in (straight, resumed))
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_3d_options_that_cannot_work_are_refused(tmp_path: Path):
    data = make_volumes(tmp_path / "data", counts=(2, 1, 0), shape=(8, 8, 8))
    with pytest.raises(UsageError, match="one number .* or three"):
        train.main(train_args(tmp_path, data, "--spatial-dims", "3", "--image-size", "16", "16"))
    with pytest.raises(UsageError, match="one-channel volumes"):
        train.main(train_args(tmp_path, data, "--spatial-dims", "3", "--channels", "3"))


def test_3d_training_compiles_as_one_graph(tmp_path: Path):
    data = make_volumes(tmp_path / "data", counts=(8, 1, 0), shape=(8, 8, 8))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    result = train.main(train_args(tmp_path, data, "--spatial-dims", "3", "--compile", "--max-steps", "2"))
    assert checkpoints.load_checkpoint(result["last_checkpoint"])["training"]["step"] == 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert not torch._dynamo.utils.counters["graph_break"]


def test_torchrun_trains_a_3d_model_with_one_checkpoint(tmp_path: Path):
    from test_resume_and_distributed import torchrun

    data = make_volumes(tmp_path / "data", counts=(8, 2, 0), shape=(8, 8, 8))
    result = torchrun("train.py", train_args(tmp_path, data, "--spatial-dims", "3", "--device", "cpu",
                                             "--epochs", "2"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("best validation SSIM") == 1
    state = checkpoints.load_checkpoint(tmp_path / "ck" / "tiny-last.pth")["training"]
    assert state["world_size"] == 2 and state["step"] == 2  # 8 volumes / (4 x 2 processes): one step per epoch
