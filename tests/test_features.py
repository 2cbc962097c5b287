from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints
import extract_features
import features
import train
from conftest import write_png
from test_end_to_end import train_args
from utils import UsageError


def separable_classes(root: Path, per_class: int = 12) -> Path:
    """Dark slices and bright slices: any sensible feature separates them."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 4)):
        for name, level in (("dark", 40), ("bright", 200)):
            for index in range(count):
                image = np.clip(rng.normal(level, 20, (32, 32)), 0, 255).astype(np.uint8)
                write_png(root / split / name / f"{index}.png", image)
    return root


@pytest.fixture
def vqvae_and_data(tmp_path: Path) -> tuple[str, Path]:
    data = separable_classes(tmp_path / "data")
    checkpoint = train.main(train_args(tmp_path, data, "--time-limit", "0"))["checkpoint"]
    return checkpoint, data


def test_features_file_holds_every_slice_and_every_set_has_its_documented_size(vqvae_and_data, tmp_path: Path):
    checkpoint, data = vqvae_and_data
    out = tmp_path / "features.npz"
    extract_features.main(["-m", checkpoint, "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    saved = np.load(out)
    count = len(saved["path"])
    assert count == 32 and sorted(set(saved["split"])) == ["test", "train", "validate"]
    assert list(saved["class_names"]) == ["bright", "dark"] and set(saved["label"]) == {0, 1}
    assert saved["codes"].shape == (count, 8, 8)
    config = checkpoints.load_checkpoint(checkpoint)["config"]
    from modules import VQVAEConfig

    config = VQVAEConfig.from_dict(config)
    sizes = {"bag": 32, "bag_grid": 9 * 32, "pooled": 2 * 8, "grid": 20 * 8,
             "latent": 2 * 8, "latent_grid": 20 * 8}  # K=32, D=8
    for name, size in sizes.items():
        assert saved[name].shape == (count, size) == (count, features.feature_size(name, config)), name
    assert saved["pixels"].shape == (count, 8 * 8)  # pooled to the 8x8 code map
    np.testing.assert_allclose(saved["bag"].sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(saved["bag_grid"].reshape(count, 9, 32).sum(2), 1, atol=1e-5)  # a histogram per cell
    # Cells of 3, 3 and 2 codes per side on the 8x8 map: weighted by their size, they make the slice's bag.
    cell_sizes = np.outer([3, 3, 2], [3, 3, 2]).reshape(1, 9, 1) / 64
    np.testing.assert_allclose((saved["bag_grid"].reshape(count, 9, 32) * cell_sizes).sum(1), saved["bag"], atol=1e-6)
    mean, maximum = np.split(saved["pooled"], 2, axis=1)
    assert (maximum >= mean - 1e-6).all()
    for path, label in zip(saved["path"], saved["label"]):
        assert Path(path).parent.name == list(saved["class_names"])[label]


def test_probe_learns_a_trivially_separable_set(vqvae_and_data, tmp_path: Path, monkeypatch):
    checkpoint, _ = vqvae_and_data
    metrics = tmp_path / "probe.json"
    fits = []
    fit = features.probe_predictions
    monkeypatch.setattr(features, "probe_predictions", lambda *args: fits.append(len(args[0])) or fit(*args))
    results = extract_features.main(["-m", checkpoint, "--out", str(tmp_path / "f.npz"), "--probe",
                                     "--fractions", "20", "100", "--seeds", "2", "--features", "grid", "bag+pooled",
                                     "--metrics-json", str(metrics), "--cache-dir", str(tmp_path / "cache"),
                                     "--resources-dir", str(tmp_path)])
    assert json.loads(metrics.read_text()) == results
    assert results["accuracy_features_100"] == results["accuracy_grid_100"] == 1.0
    assert results["accuracy_pixels_100"] == 1.0 and results["accuracy_pixels_matched_100"] == 1.0
    assert results["accuracy_bag+pooled_20"] >= 0.75 and "accuracy_bag+pooled_20_std" in results
    assert {"margin_20", "margin_20_std", "accuracy_features_20_std"} <= set(results)
    assert (tmp_path / Path(checkpoint).stem / "probe.png").exists()
    every_label = max(fits)  # four probes (two sets, two pixel baselines): 20% twice each, 100% once each
    assert len(fits) == 4 * 2 + 4 and fits.count(every_label) == 4 and results["accuracy_grid_100_std"] == 0


def test_label_draws_change_with_the_seed_and_repeat_with_it():
    labels = torch.tensor([0] * 100 + [1] * 100)
    draws = [features.balanced_subset(labels, 10, ["a", "b"], seed) for seed in (0, 0, 1)]
    assert torch.equal(draws[0], draws[1]) and set(draws[0].tolist()) != set(draws[2].tolist())


def test_cross_validation_picks_the_penalty_the_data_need():
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1] * 20)
    separable = torch.randn(40, 5, generator=generator) + 4 * labels[:, None].float()  # far apart: barely any
    picked = features.cross_validated_penalty(separable, labels, 2, torch.Generator().manual_seed(0))
    assert picked == min(features.PENALTIES)  # penalty lets the probe grow sure, and it should
    noise = torch.randn(40, 30, generator=generator)  # labels unrelated to the features: only shrinking helps
    picked = features.cross_validated_penalty(noise, labels, 2, torch.Generator().manual_seed(0))
    assert picked == max(features.PENALTIES)


def test_unknown_feature_sets_are_a_clear_error(vqvae_and_data):
    checkpoint, _ = vqvae_and_data
    with pytest.raises(UsageError, match="unknown feature set wavelets"):
        extract_features.main(["-m", checkpoint, "--features", "grid+wavelets"])


def test_balanced_subset_takes_the_fraction_of_every_class():
    labels = torch.tensor([0] * 150 + [1] * 30)
    subset = features.balanced_subset(labels, 10, ["a", "b"], seed=0)
    assert (labels[subset] == 0).sum() == 15 and (labels[subset] == 1).sum() == 3
    assert torch.equal(subset, features.balanced_subset(labels, 10, ["a", "b"], seed=0))
    with pytest.raises(UsageError, match="class 'b' has 30 training slices: 1% of them is less than one"):
        features.balanced_subset(labels, 1, ["a", "b"], seed=0)


def test_probe_without_class_folders_is_a_clear_error(hipmri_dir: Path, tmp_path: Path):
    checkpoint = train.main(train_args(tmp_path, hipmri_dir, "--time-limit", "0"))["checkpoint"]
    with pytest.raises(UsageError, match="--probe needs labels"):
        extract_features.main(["-m", checkpoint, "--out", str(tmp_path / "f.npz"), "--probe",
                               "--cache-dir", str(tmp_path / "cache")])


def test_bag_of_codes_of_a_large_codebook_is_counted_without_a_one_hot(tmp_path: Path):
    """512 HipMRI-sized slices with K=4096: a one-hot of their codes would need 34 GB."""
    from dataset import SliceSet
    from modules import VQVAE, VQVAEConfig

    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(hidden_channels=16, residual_channels=8, num_residual_layers=1, num_embeddings=4096,
                              embedding_dim=4)).eval()
    images = torch.randint(0, 256, (512, 1, 256, 128), dtype=torch.uint8)
    slices = SliceSet(images, torch.full((512,), -1), [f"{i}" for i in range(512)], [], "train", "key")
    computed = features.split_features(model, slices, torch.device("cpu"), str(tmp_path), batch_size=64)
    assert computed.sets["bag"].shape == (512, 4096) and computed.sets["pixels"].shape == (512, 64 * 32)
    assert computed.sets["bag_grid"].shape == (512, 9 * 4096)
    codes = computed.codes[0].long().flatten(1)
    for row in (0, 511):
        expected = torch.bincount(codes[row], minlength=4096).float() / codes.shape[1]
        torch.testing.assert_close(computed.sets["bag"][row], expected)


def test_bags_on_the_grid_count_each_cell():
    codes = torch.randint(0, 16, (3, 6, 4), generator=torch.Generator().manual_seed(0))
    quadrants = features.bags_on_grid(codes, 16, cells_per_side=2).view(3, 4, 16)
    cell = codes[1, 3:, :2].flatten()  # the bottom-left cell of the second map, in row-major cell order
    torch.testing.assert_close(quadrants[1, 2], torch.bincount(cell, minlength=16).float() / 6)
    whole = features.bags_on_grid(codes, 16, cells_per_side=1)
    torch.testing.assert_close(quadrants.mean(1), whole)
    torch.testing.assert_close(whole, torch.stack([torch.bincount(c.flatten(), minlength=16) / 24. for c in codes]))
    thirds = features.bags_on_grid(codes, 16, cells_per_side=3).view(3, 9, 16)  # uneven: rows 2+2+2, cols 2+1+1
    torch.testing.assert_close(thirds[2, 5], torch.bincount(codes[2, 2:4, 3:].flatten(), minlength=16).float() / 2)


def test_each_slice_s_features_are_its_own_whatever_the_batch(tmp_path: Path):
    """No statistic of a batch may reach a slice's features: files are read class by class, so a batch-level
    number (a soft-vote width from the batch's mean distance, say) would tell the probe the class."""
    from dataset import SliceSet
    from modules import VQVAE, VQVAEConfig

    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(hidden_channels=16, residual_channels=8, num_residual_layers=1, num_embeddings=32,
                              embedding_dim=4)).eval()
    images = torch.randint(0, 256, (10, 1, 32, 32), dtype=torch.uint8)
    images[5:] //= 4  # a dark half: its latents lie elsewhere than the bright half's
    slices = SliceSet(images, torch.full((10,), -1), [f"{i}" for i in range(10)], [], "train", "key")
    whole, split = (features.split_features(model, slices, torch.device("cpu"), str(tmp_path / f"{batch}"),
                                                    batch_size=batch) for batch in (10, 3))
    assert set(whole.sets) == set(split.sets)
    for name in whole.sets:
        torch.testing.assert_close(whole.sets[name], split.sets[name], atol=1e-5, rtol=1e-4, msg=name)
