from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import checkpoints
import predict
import train
import train_prior
import utils
from conftest import make_classes, phantom_uint8, write_png
from pixelcnn import GatedPixelCNN, PixelCNNConfig
from sampling import draw_codes, mixture_level_bits
from test_end_to_end import train_args

TINY_PRIOR = PixelCNNConfig(num_embeddings=12, hidden_channels=16, num_layers=3, output_channels=16, num_classes=3)


def tiny_prior() -> GatedPixelCNN:
    torch.manual_seed(0)
    return GatedPixelCNN(TINY_PRIOR).eval()


def test_logits_never_depend_on_the_current_or_later_positions():
    prior = tiny_prior()
    codes, labels = torch.randint(0, 12, (2, 5, 6)), torch.tensor([0, 2])
    base = prior(codes, labels)
    assert base.shape == (2, 12, 5, 6)
    height, width = codes.shape[1:]
    for i in range(height):
        for j in range(width):
            changed = codes.clone()
            changed[:, i, j] = (changed[:, i, j] + 1) % 12
            difference = (prior(changed, labels) - base).abs().amax(dim=(0, 1)).flatten()
            assert difference[: i * width + j + 1].max() == 0, f"position {(i, j)} leaks"


def test_no_blind_spot_the_code_above_right_is_seen():
    prior = tiny_prior()
    codes, labels = torch.randint(0, 12, (1, 5, 6)), torch.tensor([1])
    changed = codes.clone()
    changed[0, 1, 4] = (changed[0, 1, 4] + 1) % 12  # above and to the right of (2, 3)
    assert (prior(changed, labels) - prior(codes, labels))[0, :, 2, 3].abs().max() > 0


def test_class_label_changes_the_prediction():
    prior = tiny_prior()
    codes = torch.randint(0, 12, (1, 4, 4))
    assert not torch.allclose(prior(codes, torch.tensor([0])), prior(codes, torch.tensor([2])))


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_incremental_sampling_draws_what_the_full_model_predicts(kernel_size: int):
    """The cached, column-at-a-time sampler must match sampling from full forward passes, draw for draw."""
    torch.manual_seed(0)
    prior = GatedPixelCNN(dataclasses.replace(TINY_PRIOR, kernel_size=kernel_size)).eval()
    labels = torch.tensor([0, 1, 2])
    fast = prior.sample(3, (5, 6), labels, generator=torch.Generator().manual_seed(3))
    generator, codes = torch.Generator().manual_seed(3), torch.zeros(3, 5, 6, dtype=torch.long)
    with torch.no_grad():
        for i in range(5):
            for j in range(6):
                codes[:, i, j] = draw_codes(prior(codes, labels)[:, :, i, j], generator=generator)
    assert torch.equal(fast, codes)


def test_draws_follow_the_softmax_and_the_temperature():
    logits = torch.log(torch.tensor([[0.5, 0.0, 0.3, 0.2]])).expand(40_000, 4)
    counts = torch.bincount(draw_codes(logits, generator=torch.Generator().manual_seed(0)), minlength=4)
    assert torch.allclose(counts / 40_000, torch.tensor([0.5, 0.0, 0.3, 0.2]), atol=0.01)
    assert counts[1] == 0  # a code of probability zero is never drawn
    assert (draw_codes(logits[:100], temperature=1e-3) == 0).all()  # near zero temperature: the most likely code


def test_sampling_is_deterministic_under_a_seed():
    prior = tiny_prior()
    draws = [prior.sample(4, (4, 5), torch.tensor([0, 1, 2, 0]), generator=torch.Generator().manual_seed(seed))
             for seed in (7, 7, 8)]
    assert draws[0].shape == (4, 4, 5) and draws[0].dtype == torch.long
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def prior_args(tmp_path: Path, vqvae: str, *extra: str) -> list[str]:
    return ["-m", vqvae, "--hidden-channels", "8", "--layers", "2", "--width", "16", "--depth", "2", "--heads", "2",
            "--run-name", "pr", "--epochs", "1",
            "--batch-size", "4", "--warmup-steps", "1", "--checkpoint-dir", str(tmp_path / "ck"), "--resources-dir",
            str(tmp_path / "res"), "--cache-dir", str(tmp_path / "cache"), *extra]


def test_unlabelled_maps_get_the_class_mixture_likelihood():
    prior = tiny_prior()
    codes = torch.randint(0, 12, (2, 3, 4))
    shares = torch.tensor([0.5, 0.3, 0.2])
    per_class = [prior.level_bits([codes], torch.full((2,), label)) for label in range(3)]
    (mixture,) = mixture_level_bits(per_class, shares.log().tolist())
    bits = torch.stack([level[0] for level in per_class], dim=1).double()
    expected = -torch.log2((shares[None].double() * 2 ** (-bits)).sum(1))
    torch.testing.assert_close(mixture.double(), expected, rtol=1e-5, atol=1e-4)
    assert (mixture >= bits.min(dim=1).values - 1e-4).all()  # never better than the best class


def test_train_prior_then_sample_and_refuse_another_vqvae(tmp_path: Path, capsys):
    data = make_classes(tmp_path / "data", classes=("alpha", "beta", "gamma"), per_class=4)
    for split in ("validate", "test"):  # slices without a class folder, which a conditional prior cannot index
        for index in range(3):
            write_png(data / split / f"{index}.png", phantom_uint8(50 + index))
    vqvae = train.main(train_args(tmp_path, data, "--run-name", "vq"))["checkpoint"]
    result = train_prior.main(prior_args(tmp_path, vqvae))
    assert "3 validation code maps have no class folder" in capsys.readouterr().out
    checkpoint = checkpoints.load_checkpoint(result["checkpoint"], expected_kind="prior")
    assert checkpoint["conditional"] and checkpoint["class_names"] == ["alpha", "beta", "gamma"]

    metrics_path = tmp_path / "prior.json"
    predict_args = ["-m", result["checkpoint"], "--cache-dir", str(tmp_path / "cache"), "--resources-dir",
                    str(tmp_path / "res"), "--metrics-json", str(metrics_path)]
    metrics = predict.main(predict_args + ["--sample", "4", "--label", "beta"])
    assert "3 test slices have no class folder: their NLL is the class-mixture likelihood" in capsys.readouterr().out
    assert json.loads(metrics_path.read_text()) == metrics
    assert 0 < metrics["nll_bits_per_code"] < 20 and metrics["sample_seconds"] > 0
    assert (tmp_path / "res" / "pr" / "samples.png").exists()
    assert (tmp_path / "res" / "pr" / "samples_with_nearest.png").exists()
    with pytest.raises(utils.UsageError, match="not a class of this prior"):
        predict.main(predict_args + ["--sample", "2", "--label", "delta"])

    other = train.main(train_args(tmp_path / "other", data, "--run-name", "vq2", "--seed", "5"))["checkpoint"]
    with pytest.raises(utils.UsageError, match="trained on the codes of another VQ-VAE"):
        predict.main(predict_args + ["--vqvae", other])
    with pytest.raises(utils.UsageError, match="python train_prior.py -m VQVAE_CHECKPOINT"):
        train.main(train_args(tmp_path, data, "--prior"))
