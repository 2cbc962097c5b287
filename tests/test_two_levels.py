"""VQ-VAE-2: two levels of codes, and the hierarchical prior over them."""
from __future__ import annotations

import dataclasses

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_classes
from test_end_to_end import train_args
from test_prior import prior_args

import anomaly
import checkpoints
import extract_features
import predict
import train
import train_prior
import priors
import utils
from modules import VQVAE, VQVAE2, VQVAEConfig, build_vqvae
from pixelcnn import GatedPixelCNN, PixelCNNConfig
from priors import HierarchicalPrior
from sampling import draw_codes, mixture_level_bits, stack_levels, unstack_levels

SMALL = dict(hidden_channels=32, residual_channels=8, num_residual_layers=1, num_embeddings=16, embedding_dim=8)
TWO_LEVELS = ["--levels", "2"]


def test_two_levels_at_hipmri_size_round_trip():
    torch.manual_seed(0)
    model = build_vqvae(VQVAEConfig(levels=2, **SMALL))
    assert isinstance(model, VQVAE2) and model.config.image_multiple == 8
    images = torch.rand(2, 1, 256, 128)
    model.initialise_codebooks([images])
    model.eval()  # training steps would move the codebooks between the calls below
    reconstruction, (top, bottom), loss = model(images)
    assert reconstruction.shape == images.shape and loss.ndim == 0
    assert top.shape == (2, 32, 16) and bottom.shape == (2, 64, 32)  # bottom at 4x, top one more halving
    maps = model.code_maps(images)
    assert torch.equal(maps[0], top) and torch.equal(maps[1], bottom)
    torch.testing.assert_close(model.decode_code_maps(maps), reconstruction)


def test_one_level_is_the_model_it_always_was():
    torch.manual_seed(0)
    model = build_vqvae(VQVAEConfig(**SMALL))
    assert type(model) is VQVAE and model.levels == ("codes",)
    images = torch.rand(2, 1, 32, 16)
    reconstruction, codes, loss = model.eval()(images)
    quantized, expected_codes, expected_loss = model.quantizer(model.encoder(images))
    assert torch.equal(codes, expected_codes) and torch.equal(reconstruction, model.decoder(quantized))
    names = {name.split(".")[0] for name in model.state_dict()}
    assert names == {"encoder", "quantizer", "decoder"}  # the checkpoints of earlier versions keep loading
    assert VQVAEConfig.from_dict({k: v for k, v in VQVAEConfig(**SMALL).to_dict().items() if k != "levels"}).levels == 1


def test_the_top_codebook_restarts_at_its_own_rate():
    # Four times fewer top positions per step (eight for volumes): four times fewer uses make a top code dead.
    model = build_vqvae(VQVAEConfig(levels=2, dead_code_threshold=2.0, **SMALL))
    assert model.top_quantizer.dead_code_threshold == 0.5 and model.bottom_quantizer.dead_code_threshold == 2.0
    volumes = build_vqvae(VQVAEConfig(levels=2, spatial_dims=3, **SMALL))
    assert volumes.top_quantizer.dead_code_threshold == volumes.bottom_quantizer.dead_code_threshold / 8
    model.train()
    model.initialise_codebooks([torch.rand(2, 1, 32, 16)])
    model.top_quantizer.cluster_size.fill_(1.0)  # used once a step: alive at the top's threshold, dead at 2
    model.bottom_quantizer.cluster_size.fill_(1.0)
    top_codes, bottom_codes = model.top_quantizer.embedding.clone(), model.bottom_quantizer.embedding.clone()
    model.top_quantizer._restart_dead_codes()
    model.bottom_quantizer._restart_dead_codes()
    assert torch.equal(model.top_quantizer.embedding, top_codes)
    assert not torch.equal(model.bottom_quantizer.embedding, bottom_codes)


def test_the_top_level_is_also_trained_to_give_the_pooled_image():
    torch.manual_seed(0)
    model = build_vqvae(VQVAEConfig(levels=2, top_image_weight=0.5, **SMALL)).eval()
    images = torch.rand(2, 1, 32, 16)
    model.initialise_codebooks([images])
    _, _, loss = model(images)
    levels, top_features = model._quantize_levels(images)
    pooled = images.view(2, 1, 8, 4, 4, 4).mean(dim=(3, 5))  # 4x4 means: the bottom map's size
    image_loss = torch.nn.functional.mse_loss(model.top_image_head(top_features), pooled)
    torch.testing.assert_close(loss, levels[0][2] + levels[1][2] + 0.5 * image_loss)
    model.top_image_loss(top_features, images).backward()  # through the top codes to the encoders
    assert model.top_encoder.layers[0].weight.grad.abs().sum() > 0
    assert model.bottom_encoder.layers[0].weight.grad.abs().sum() > 0
    assert model.bottom_quantizer.embedding.grad is None and model.decoder.layers[0].weight.grad is None
    # Off, and in checkpoints written before it existed: no head, so their weights load as they were saved.
    before = {key: value for key, value in VQVAEConfig(levels=2, **SMALL).to_dict().items()
              if key != "top_image_weight"}
    old = build_vqvae(VQVAEConfig.from_dict(before))
    assert old.top_image_head is None and not any(key.startswith("top_image") for key in old.state_dict())
    _, _, old_loss = old.eval()(images)
    old_levels, _ = old._quantize_levels(images)
    torch.testing.assert_close(old_loss, old_levels[0][2] + old_levels[1][2])


def test_stacked_levels_unstack_exactly():
    top, bottom = torch.randint(0, 9, (3, 4, 2)), torch.randint(0, 9, (3, 8, 4))
    stacked = stack_levels([top, bottom])
    assert stacked.shape == (3, 2, 8, 4)
    again = unstack_levels(stacked, 2)
    assert torch.equal(again[0], top) and torch.equal(again[1], bottom)
    assert stack_levels([bottom]) is bottom and unstack_levels(bottom, 1)[0] is bottom


def hierarchical_prior() -> HierarchicalPrior:
    torch.manual_seed(0)
    top = PixelCNNConfig(num_embeddings=12, hidden_channels=16, num_layers=3, output_channels=16, num_classes=2)
    bottom = dataclasses.replace(top, condition_embeddings=12)
    return HierarchicalPrior(GatedPixelCNN(top), GatedPixelCNN(bottom)).eval()


def test_bottom_prior_is_causal_in_the_bottom_codes_and_sees_the_whole_top_map():
    prior = hierarchical_prior().bottom
    top, bottom, labels = torch.randint(0, 12, (2, 2, 3)), torch.randint(0, 12, (2, 4, 6)), torch.tensor([0, 1])
    base = prior(bottom, labels, condition=top)
    height, width = bottom.shape[1:]
    for i in range(height):
        for j in range(width):
            changed = bottom.clone()
            changed[:, i, j] = (changed[:, i, j] + 1) % 12
            difference = (prior(changed, labels, condition=top) - base).abs().amax(dim=(0, 1)).flatten()
            assert difference[: i * width + j + 1].max() == 0, f"bottom position {(i, j)} leaks"
    changed_top = top.clone()
    changed_top[:, 1, 2] = (changed_top[:, 1, 2] + 1) % 12  # the top map's last position: seen from the start
    assert (prior(bottom, labels, condition=changed_top) - base)[:, :, 0, 0].abs().max() > 0


def test_incremental_sampling_with_a_top_condition_draws_what_the_full_model_predicts():
    prior = hierarchical_prior()
    labels = torch.tensor([0, 1, 1])
    top, bottom = prior.sample_levels(3, [(2, 3), (4, 6)], labels, generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    expected = [torch.zeros(3, 2, 3, dtype=torch.long), torch.zeros(3, 4, 6, dtype=torch.long)]
    with torch.no_grad():
        for level, model in enumerate((prior.top, prior.bottom)):
            condition = expected[0] if level else None
            for i in range(expected[level].shape[1]):
                for j in range(expected[level].shape[2]):
                    logits = model(expected[level], labels, condition=condition)[:, :, i, j]
                    expected[level][:, i, j] = draw_codes(logits, generator=generator)
    assert torch.equal(top, expected[0]) and torch.equal(bottom, expected[1])


def test_mixture_over_classes_splits_into_levels_that_add_up():
    prior = hierarchical_prior()
    maps = [torch.randint(0, 12, (2, 2, 3)), torch.randint(0, 12, (2, 4, 6))]
    shares = [0.7, 0.3]
    per_class = [prior.level_bits(maps, torch.full((2,), label)) for label in range(2)]
    top, bottom = mixture_level_bits(per_class, np.log(shares).tolist())
    joint = [sum(levels) for levels in per_class]
    expected = -torch.log2(sum(share * 2 ** (-bits.double()) for share, bits in zip(shares, joint)))
    torch.testing.assert_close((top + bottom).double(), expected, rtol=1e-5, atol=1e-4)
    expected_top = -torch.log2(sum(share * 2 ** (-levels[0].double()) for share, levels in zip(shares, per_class)))
    torch.testing.assert_close(top.double(), expected_top, rtol=1e-5, atol=1e-4)


def test_two_level_train_predict_features_prior_sample(tmp_path: Path):
    data = make_classes(tmp_path / "data", classes=("alpha", "beta"), per_class=6)
    result = train.main(train_args(tmp_path, data, *TWO_LEVELS, "--run-name", "vq2", "--epochs", "2",
                                   "--kmeans-init"))
    rows = utils.read_csv_rows(Path(result["figures"]) / "metrics.csv")
    assert {"val_perplexity_top", "val_codebook_usage_bottom", "train_perplexity_bottom"} <= set(rows[0])
    checkpoint = result["checkpoint"]
    metrics = predict.main(["-m", checkpoint, "--cache-dir", str(tmp_path / "cache"), "--resources-dir",
                            str(tmp_path / "res")])
    assert {"codebook_usage_top", "codebook_usage_bottom", "mae_mean"} <= set(metrics)
    figures = tmp_path / "res" / "vq2"
    assert (figures / "validate_levels.png").exists() and (figures / "validate_reconstructions.png").exists()
    out = tmp_path / "features.npz"
    extract_features.main(["-m", checkpoint, "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    saved = np.load(out)
    assert saved["codes_top"].shape[1:] == (4, 4) and saved["codes_bottom"].shape[1:] == (8, 8)
    assert saved["bag"].shape[1] == 2 * 32 and saved["grid"].shape[1] == 2 * 20 * 8  # both levels (K=32, D=8)
    prior = train_prior.main(prior_args(tmp_path, checkpoint, "--run-name", "pr2"))
    prior_checkpoint = checkpoints.load_checkpoint(prior["checkpoint"], expected_kind="prior")
    assert prior_checkpoint["code_shapes"] == [[4, 4], [8, 8]] and len(prior_checkpoint["config"]["levels"]) == 2
    metrics_path = tmp_path / "prior.json"
    sampled = predict.main(["-m", prior["checkpoint"], "--sample", "3", "--cache-dir", str(tmp_path / "cache"),
                            "--resources-dir", str(tmp_path / "res"), "--metrics-json", str(metrics_path)])
    assert json.loads(metrics_path.read_text()) == sampled
    assert 0 < sampled["nll_bits_per_code_top"] and 0 < sampled["nll_bits_per_code_bottom"]
    assert sampled["nll_bits_per_image"] == pytest.approx(16 * sampled["nll_bits_per_code_top"]
                                                          + 64 * sampled["nll_bits_per_code_bottom"], rel=1e-4)
    assert (tmp_path / "res" / "pr2" / "samples_with_nearest.png").exists()
    out = tmp_path / "anomaly"  # both levels' codes judged and healed
    anomaly.main(["-m", prior["checkpoint"], "--out", str(out), "--resamplings", "1", "--threshold", "0.05",
                  "--cache-dir", str(tmp_path / "cache"), "--resources-dir", str(tmp_path / "res")])
    rows = utils.read_csv_rows(out / "scores.csv")
    assert rows and max(float(row["codes_replaced"]) for row in rows) > 0
    assert all(np.load(out / "maps" / f"{row['file']}.npy").shape == (32, 32) for row in rows)


def test_a_two_level_run_resumes_exactly(hipmri_dir: Path, tmp_path: Path):
    args = [*TWO_LEVELS, "--device", "cpu", "--epochs", "2"]
    straight = train.main(train_args(tmp_path / "a", hipmri_dir, *args, "--image-size", "32", "16"))
    stopped = train.main(train_args(tmp_path / "b", hipmri_dir, *args, "--image-size", "32", "16",
                                    "--max-steps", "4"))
    resumed = train.main(["--resume", stopped["last_checkpoint"], "--max-steps", "0", "--device", "cpu"])
    first, second = (checkpoints.load_checkpoint(r["last_checkpoint"])["model"] for r in (straight, resumed))
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_a_one_level_prior_is_still_a_gated_pixelcnn():
    prior = priors.build_prior([PixelCNNConfig(num_embeddings=8, hidden_channels=8, num_layers=2)])
    assert type(prior) is GatedPixelCNN and checkpoints.prior_configs(PixelCNNConfig().to_dict()) == [PixelCNNConfig()]
