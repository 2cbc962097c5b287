"""Classifiers from few labels: the fine-tuned encoder, its baselines, the prior's features, and the benchmark."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_end_to_end import ROOT, train_args
from test_features import separable_classes
from test_prior import prior_args

import checkpoints
import classifier
import extract_features
import features
import finetune
import train
import train_prior
from modules import Encoder, VQVAEConfig
from transformer import TransformerConfig, TransformerPrior
from utils import UsageError

QUICK = ["--steps", "30", "--frozen-steps", "10", "--evaluate-every", "10", "--batch-size", "8"]


@pytest.fixture
def vqvae_and_data(tmp_path: Path) -> tuple[str, Path]:
    data = separable_classes(tmp_path / "data")
    checkpoint = train.main(train_args(tmp_path, data, "--max-steps", "3"))["checkpoint"]
    return checkpoint, data


def test_finetune_learns_saves_a_checkpoint_that_rebuilds_alone_and_predicts_a_folder(vqvae_and_data, tmp_path):
    vqvae, data = vqvae_and_data
    common = ["--checkpoint-dir", str(tmp_path / "ck"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    result = finetune.main(["-m", vqvae, "--labels", "100", *QUICK, "--steps", "100", "--lr", "1e-2", "--metrics-json",
                            str(tmp_path / "m.json"), *common])
    assert result["accuracy"] == result["balanced_accuracy"] == 1.0  # dark against bright
    assert json.loads((tmp_path / "m.json").read_text())["labelled"] == result["labelled"]
    model, saved = checkpoints.load_classifier(result["checkpoint"], torch.device("cpu"))
    assert saved["class_names"] == ["bright", "dark"] and model.config.trunk == "encoder"
    out = tmp_path / "predictions.csv"
    predicted = finetune.main(["--predict", result["checkpoint"], "--data", str(data), "--out", str(out), *common])
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == predicted["images"] == 8 and predicted["accuracy"] == 1.0  # the test split: 4 per class
    assert set(rows[0]) == {"file", "class", "p_bright", "p_dark", "true_class"}
    for row in rows:
        assert row["class"] == row["true_class"] == Path(row["file"]).parent.name
        assert abs(float(row["p_bright"]) + float(row["p_dark"]) - 1) < 1e-5


def test_the_pretrained_trunk_is_the_vqvae_encoder_and_the_others_start_elsewhere(vqvae_and_data):
    vqvae, _ = vqvae_and_data
    saved = checkpoints.load_checkpoint(vqvae)
    encoder = {key[len("encoder."):]: value for key, value in saved["model"].items() if key.startswith("encoder.")}
    torch.manual_seed(0)
    pretrained, scratch = (classifier.classifier_for(trunk, saved, 2) for trunk in ("pretrained", "scratch"))
    for name, value in encoder.items():
        torch.testing.assert_close(pretrained.trunk.state_dict()[name], value)
    assert any(not torch.equal(scratch.trunk.state_dict()[name], value) for name, value in encoder.items())
    assert isinstance(classifier.classifier_for("cnn", saved, 3).trunk, classifier.SmallCNN)


def test_the_small_cnn_is_about_the_size_of_the_cpu_recipe_s_encoder():
    def size(module: torch.nn.Module) -> int:
        return sum(parameter.numel() for parameter in module.parameters())

    encoder = size(Encoder(VQVAEConfig(hidden_channels=64, residual_channels=32)))
    cnn = size(classifier.SmallCNN(1, classifier.ClassifierConfig().cnn_widths))
    assert 0.5 < cnn / encoder < 2


def test_the_frozen_phase_trains_the_head_alone_then_the_trunk_moves():
    torch.manual_seed(0)
    config = VQVAEConfig(hidden_channels=16, residual_channels=8, num_residual_layers=1, num_embeddings=16,
                         embedding_dim=4)
    images = torch.rand(12, 1, 16, 16)
    labels = torch.tensor([0, 1] * 6)
    model = classifier.Classifier(classifier.ClassifierConfig("encoder", 2, 1, config.to_dict()))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    settings = classifier.FineTuning(steps=5, frozen_steps=5, evaluate_every=1, batch_size=4, patience=100)
    result = classifier.train_classifier(model, images, labels, settings, pretrained=True)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before if name.startswith("trunk."))
    assert not torch.equal(before["head.1.weight"], after["head.1.weight"]) and result.best_step >= 1
    settings = classifier.FineTuning(steps=8, frozen_steps=5, evaluate_every=100, batch_size=4)
    classifier.train_classifier(model, images, labels, settings, pretrained=True)
    assert any(not torch.equal(before[name], value) for name, value in model.state_dict().items()
               if name.startswith("trunk."))


def test_held_out_part_takes_each_class_share_and_leaves_a_lone_example_to_train():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2])
    train_index, held = classifier.split_held_out(labels, 0.2, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[held], minlength=3).tolist() == [2, 1, 0]
    assert sorted(torch.cat([train_index, held]).tolist()) == list(range(16))


def test_one_example_per_class_trains_every_step_and_keeps_the_last_weights():
    torch.manual_seed(0)
    model = classifier.Classifier(classifier.ClassifierConfig("cnn", 2, 1, cnn_widths=(4, 8), pooling="global"))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    settings = classifier.FineTuning(steps=6, evaluate_every=2, batch_size=2)
    result = classifier.train_classifier(model, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), settings, False)
    assert result.steps == result.best_step == 6
    assert not torch.equal(before["head.1.weight"], model.state_dict()["head.1.weight"])


def test_a_classifier_repeats_with_its_seed_whatever_ran_before(vqvae_and_data):
    vqvae, _ = vqvae_and_data
    saved = checkpoints.load_checkpoint(vqvae)
    images, labels = torch.rand(8, 1, 32, 32), torch.tensor([0, 1] * 4)
    settings = classifier.FineTuning(steps=4, evaluate_every=2, batch_size=4)
    first, _ = classifier.fit_classifier("cnn", saved, images, labels, 2, settings, seed=3)
    torch.rand(100)  # the global random state moves on
    second, _ = classifier.fit_classifier("cnn", saved, images, labels, 2, settings, seed=3)
    for name, value in first.state_dict().items():
        torch.testing.assert_close(second.state_dict()[name], value)


def test_augmentations_keep_shape_and_range_and_flip_some_images():
    images = torch.linspace(0, 1, 16).repeat(8, 1, 16, 1)  # brighter to the right
    settings = classifier.FineTuning(shift=0.0, jitter=0.0)
    moved = classifier.augment(images, settings, torch.Generator().manual_seed(0))
    assert moved.shape == images.shape and 0 <= moved.min() and moved.max() <= 1
    flipped = moved[:, 0, 0, 0] > moved[:, 0, 0, -1]
    assert 0 < int(flipped.sum()) < 8
    torch.testing.assert_close(moved[~flipped], images[~flipped], atol=1e-5, rtol=0)


def test_finetune_refuses_data_without_class_folders(hipmri_dir: Path, tmp_path: Path):
    vqvae = train.main(train_args(tmp_path, hipmri_dir.parent, "--time-limit", "0"))["checkpoint"]
    with pytest.raises(UsageError, match="needs every image in a class folder"):
        finetune.main(["-m", vqvae, "--cache-dir", str(tmp_path / "cache")])


def test_prior_features_are_each_slice_s_own_and_have_their_documented_size():
    torch.manual_seed(0)
    prior = TransformerPrior(TransformerConfig(num_embeddings=16, rows=4, columns=6, width=8, depth=3, heads=2,
                                               dropout=0.0)).eval()
    codes = torch.randint(0, 16, (10, 4, 6))
    whole, batched = (features.prior_features(prior, codes, 2, torch.device("cpu"), batch_size)
                      for batch_size in (10, 3))
    assert whole["prior"].shape == (10, 8) and whole["prior_grid"].shape == (10, 20 * 8)
    for name in features.PRIOR_SETS:
        torch.testing.assert_close(whole[name], batched[name], atol=1e-5, rtol=1e-4)
    first_block = features.prior_features(prior, codes, 1, torch.device("cpu"))["prior"]
    assert not torch.allclose(first_block, whole["prior"])


def test_extract_features_probes_the_prior_s_hidden_states(vqvae_and_data, tmp_path: Path):
    vqvae, _ = vqvae_and_data
    prior = train_prior.main(prior_args(tmp_path, vqvae, "--max-steps", "2", "--unconditional"))["checkpoint"]
    common = ["-m", vqvae, "--prior", prior, "--out", str(tmp_path / "f.npz"), "--cache-dir", str(tmp_path / "cache"),
              "--resources-dir", str(tmp_path / "res")]
    results = extract_features.main([*common, "--probe", "--fractions", "100", "--seeds", "1", "--features", "prior",
                                     "prior_grid+bag"])
    assert 0 <= results["accuracy_prior_100"] <= 1 and "accuracy_prior_grid+bag_100" in results
    import numpy as np

    assert np.load(tmp_path / "f.npz")["prior"].shape[1] == 16  # the prior's width
    with pytest.raises(UsageError, match="--block 3: this prior has blocks 1 to 2"):
        extract_features.main([*common, "--block", "3", "--features", "prior"])
    with pytest.raises(UsageError, match="need a transformer prior"):
        extract_features.main(["-m", vqvae, "--features", "prior"])


def test_a_prior_that_saw_labels_is_refused_where_labels_must_not_leak(vqvae_and_data, tmp_path: Path, capsys):
    vqvae, _ = vqvae_and_data
    prior = train_prior.main(prior_args(tmp_path, vqvae, "--max-steps", "2", "--classes", "dark"))["checkpoint"]
    with pytest.raises(UsageError, match="trained on the slices of dark only"):
        features.load_feature_prior(prior, torch.device("cpu"), vqvae, refuse_labels=True)
    features.load_feature_prior(prior, torch.device("cpu"), vqvae)
    assert "warning: --prior" in capsys.readouterr().out


def test_classifiers_refuse_volumes_and_two_level_encoders_in_one_line():
    with pytest.raises(UsageError, match="classifiers take 2D slices"):
        classifier.check_trunk("cnn", VQVAEConfig(spatial_dims=3))
    with pytest.raises(UsageError, match="this one has 2 levels"):
        classifier.check_trunk("pretrained", VQVAEConfig(levels=2))
    classifier.check_trunk("cnn", VQVAEConfig(levels=2))
    with pytest.raises(UsageError, match="--evaluate-every 0: at least 1"):
        classifier.FineTuning(evaluate_every=0)


def test_the_benchmark_scores_every_method_on_the_same_draws(vqvae_and_data, tmp_path: Path):
    vqvae, data = vqvae_and_data
    prior = train_prior.main(prior_args(tmp_path, vqvae, "--max-steps", "2", "--unconditional"))["checkpoint"]
    out, metrics = tmp_path / "out", tmp_path / "metrics.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "few_labels.py"), "--data", str(data),
                             "--vqvae", vqvae, "--prior", prior, "--percents", "50", "100", "--seeds", "2", *QUICK,
                             "--out", str(out), "--metrics-json", str(metrics), "--cache-dir", str(tmp_path / "cache"),
                             "--device", "cpu", "--eval-split", "test"],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(metrics.read_text())
    for method in ("pixels", "features", "prior", "finetune", "scratch", "cnn"):
        for percent in ("50", "100"):
            for score in ("accuracy", "balanced_accuracy"):
                assert 0 <= report[f"{score}_{method}_{percent}"] <= 1
                assert report[f"{score}_{method}_{percent}_std"] >= 0
        assert report[f"seconds_{method}"] > 0
    assert report["accuracy_pixels_100"] == 1.0 and report["evaluated_slices"] == 8  # the test split
    assert report["accuracy_finetune_100_std"] == 0  # one draw of all the labels
    assert (out / "few_labels.png").exists() and json.loads((out / "few_labels.json").read_text()) == report
