"""The vision-transformer encoder and decoder (--architecture vit): shapes for any 2D size, training, checkpoints,
the refusals, and the decoder's patch seams."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import checkpoints
import metrics
import predict
import train
import utils
from classifier import classifier_for
from modules import VQVAEConfig, build_vqvae
from test_end_to_end import train_args
from test_resume_and_distributed import CPU, assert_same_weights, weights
from vit import sincos_positions, unpatchify

TINY_VIT = {"architecture": "vit", "vit_width": 32, "vit_depth": 1, "vit_heads": 2, "num_embeddings": 32,
            "embedding_dim": 8}
VIT_FLAGS = ["--architecture", "vit", "--vit-width", "32", "--vit-depth", "1", "--vit-heads", "2"]


@pytest.mark.parametrize("channels,shape", [(1, (32, 16)), (1, (16, 48)), (3, (32, 32)), (1, (256, 128))])
@pytest.mark.parametrize("pixel_head", ["linear", "conv"])
def test_codes_have_the_convolutional_models_shape_for_any_2d_size(channels: int, shape: tuple[int, int],
                                                                   pixel_head: str):
    model = build_vqvae(VQVAEConfig(in_channels=channels, vit_pixel_head=pixel_head, **TINY_VIT))
    images = torch.rand(2, channels, *shape)
    reconstruction, indices, loss = model(images)
    assert reconstruction.shape == images.shape and loss.ndim == 0
    assert indices.shape == (2, shape[0] // 4, shape[1] // 4)
    assert model.encode(images).shape == (2, 8, shape[0] // 4, shape[1] // 4)
    assert model.decode_codes(indices).shape == images.shape


def test_positions_differ_everywhere_and_keep_their_values_on_a_larger_map():
    small, large = sincos_positions(4, 6, 16, torch.device("cpu")), sincos_positions(8, 10, 16, torch.device("cpu"))
    assert torch.cdist(small, small).add(torch.eye(24)).min() > 0.1  # no two positions share an embedding
    # (row, column) means the same on every map size: the row-major index differs, the vector does not
    torch.testing.assert_close(small.view(4, 6, 16), large.view(8, 10, 16)[:4, :6])


def test_unpatchify_puts_each_tokens_pixels_in_its_own_patch():
    tokens = torch.arange(2 * 3).float().view(1, 6, 1).repeat(1, 1, 4 * 4)  # token t: every pixel t
    image = unpatchify(tokens, 2, 3, 4)
    assert image.shape == (1, 1, 8, 12)
    expected = torch.arange(6).float().view(2, 3).repeat_interleave(4, 0).repeat_interleave(4, 1)
    torch.testing.assert_close(image[0, 0], expected)


def test_a_vit_learns_a_batch_of_images():
    torch.manual_seed(0)
    model = build_vqvae(VQVAEConfig(**TINY_VIT))
    images = torch.rand(4, 1, 8, 8).repeat_interleave(4, 2).repeat_interleave(4, 3)  # blocky, so learnable
    model.initialise_codebooks([images])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        reconstruction, _, vq_loss = model(images)
        loss = F.mse_loss(reconstruction, images) + vq_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.3 * losses[0]


def test_seam_ratio_is_one_without_seams_and_large_with_them():
    torch.manual_seed(0)
    smooth = F.interpolate(torch.rand(2, 1, 6, 6), size=(48, 48), mode="bicubic", align_corners=True)
    assert metrics.seam_ratio(metrics.seam_jumps(smooth, 4)) == pytest.approx(1.0, abs=0.15)
    patches = smooth + 0.2 * torch.rand(2, 1, 12, 12).repeat_interleave(4, 2).repeat_interleave(4, 3)
    assert metrics.seam_ratio(metrics.seam_jumps(patches, 4)) > 1.8
    volume = F.interpolate(torch.rand(1, 1, 4, 4, 4), size=(24, 24, 24), mode="trilinear", align_corners=True)
    assert metrics.seam_ratio(metrics.seam_jumps(volume, 4)) == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("pixel_head,crosses", [("linear", False), ("conv", True)])
def test_only_the_conv_pixel_head_lets_a_code_reach_past_its_patch(pixel_head: str, crosses: bool):
    """Seams come from patches made each on its own: with the linear head a changed code can only change its own
    4x4 patch; the conv head's 3x3 convolutions carry it over the border, so neighbours can meet smoothly."""
    torch.manual_seed(0)
    decoder = build_vqvae(VQVAEConfig(vit_pixel_head=pixel_head, **TINY_VIT)).decoder.eval()
    tokens = torch.randn(1, 4 * 4, 32)  # the blocks' output, each token already seeing every other
    changed = tokens.clone()
    changed[0, 1 * 4 + 1] += 1.0  # the token of the patch at row 1, column 1
    difference = (decoder.pixels(changed, 4, 4) - decoder.pixels(tokens, 4, 4)).abs()[0, 0] > 1e-6
    inside = torch.zeros_like(difference)
    inside[4:8, 4:8] = True
    assert difference[inside].any()
    assert difference[~inside].any() == crosses


@pytest.mark.parametrize("layout", ["hipmri_dir", "oasis_dir"])
def test_a_vit_run_trains_saves_and_rebuilds_itself_from_its_checkpoint(layout: str, request, tmp_path: Path):
    data = request.getfixturevalue(layout)
    result = train.main(train_args(tmp_path, data.parent, *VIT_FLAGS))
    saved = checkpoints.load_checkpoint(result["checkpoint"], expected_kind="vqvae")
    config = VQVAEConfig.from_dict(saved["config"])
    assert config.architecture == "vit" and config.vit_width == 32
    model = build_vqvae(config)
    model.load_state_dict(saved["model"])  # strict: the file alone rebuilds the same network
    report = predict.main(["-m", result["checkpoint"], "--cache-dir", str(tmp_path / "cache"), "--resources-dir",
                           str(tmp_path / "res")])
    assert report["ssim_mean"] == pytest.approx(float(result["best"]["val_ssim"]), abs=0.2)
    assert report["seam_ratio"] > 0 and float(result["best"]["val_seam_ratio"]) > 0  # every evaluation measures seams
    classifier = classifier_for("pretrained", saved, num_classes=2)  # its encoder is a few-label trunk too
    encoder_weights = {key[len("encoder."):]: value for key, value in saved["model"].items()
                       if key.startswith("encoder.")}
    assert_same_weights(classifier.trunk.state_dict(), encoder_weights)


def test_a_vit_run_resumes_exactly(hipmri_dir: Path, tmp_path: Path):
    straight = train.main(train_args(tmp_path / "a", hipmri_dir, "--epochs", "2", *VIT_FLAGS, *CPU))
    stopped = train.main(train_args(tmp_path / "b", hipmri_dir, "--epochs", "2", "--max-steps", "4", *VIT_FLAGS,
                                    *CPU))
    resumed = train.main(["--resume", stopped["last_checkpoint"], "--max-steps", "0", *CPU])
    assert_same_weights(weights(straight["last_checkpoint"]), weights(resumed["last_checkpoint"]))


def test_a_compiled_bf16_vit_step_runs_as_one_graph(hipmri_dir: Path, tmp_path: Path):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    result = train.main(train_args(tmp_path, hipmri_dir, "--compile", "--precision", "bf16", "--max-steps", "2",
                                   *VIT_FLAGS))
    assert checkpoints.load_checkpoint(result["last_checkpoint"])["training"]["step"] == 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert not torch._dynamo.utils.counters["graph_break"]


@pytest.mark.parametrize("flags,message", [(["--levels", "2"], "--levels 2 trains with --architecture conv"),
                                           (["--spatial-dims", "3"], "3D volumes train with --architecture conv"),
                                           (["--vit-heads", "5"], "does not divide by --vit-heads 5"),
                                           (["--vit-width", "34"], "and by 4")])
def test_what_a_vit_cannot_do_is_refused_in_one_line(flags: list[str], message: str, hipmri_dir: Path,
                                                      tmp_path: Path):
    with pytest.raises(utils.UsageError, match=message):
        train.main(train_args(tmp_path, hipmri_dir, *VIT_FLAGS, *flags))


def test_checkpoints_from_before_the_option_load_as_conv():
    old = {key: value for key, value in VQVAEConfig().to_dict().items() if not key.startswith(("architecture", "vit_"))}
    assert VQVAEConfig.from_dict(old).architecture == "conv"


def test_the_demo_trains_a_vit_at_its_cpu_size(tmp_path: Path):
    result = train.main(["--architecture", "vit", "--demo-dir", str(tmp_path / "demo"), "--max-steps", "2",
                         "--run-name", "demo", "--checkpoint-dir", str(tmp_path / "ck"), "--resources-dir",
                         str(tmp_path / "res"), "--cache-dir", str(tmp_path / "cache")])
    saved = checkpoints.load_checkpoint(result["last_checkpoint"])
    assert tuple(saved["preprocessing"]["image_size"]) == (128, 64)  # the demo's slices, 32x16 tokens
    assert (saved["config"]["vit_width"], saved["config"]["vit_depth"], saved["args"]["lr"]) == (128, 2, 3e-3)
