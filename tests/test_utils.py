from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

import utils
from dataset import make_phantom
from utils import UsageError


def realistic_pair(seed: int, shape=(96, 64)) -> tuple[np.ndarray, np.ndarray]:
    image = make_phantom(seed, 0.4, shape)
    image = (image / image.max()).astype(np.float64)
    noisy = np.clip(image + np.random.default_rng(seed).normal(0, 0.05, shape), 0, 1)
    return image, noisy


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ssim_matches_skimage(seed: int):
    image, noisy = realistic_pair(seed)
    expected = structural_similarity(image, noisy, data_range=1.0)
    ours = utils.ssim_per_image(torch.tensor(noisy)[None, None], torch.tensor(image)[None, None]).item()
    assert abs(ours - expected) < 1e-3


def test_ssim_matches_skimage_on_colour_and_batches():
    pairs = [realistic_pair(seed, (48, 48)) for seed in range(3)]
    rgb = np.stack([pairs[0][0], pairs[1][0], pairs[2][0]], axis=-1)
    rgb_noisy = np.stack([pairs[0][1], pairs[1][1], pairs[2][1]], axis=-1)
    expected = structural_similarity(rgb, rgb_noisy, data_range=1.0, channel_axis=-1)
    ours = utils.ssim_per_image(torch.tensor(rgb_noisy).permute(2, 0, 1)[None],
                                torch.tensor(rgb).permute(2, 0, 1)[None])
    assert abs(ours.item() - expected) < 1e-3
    batch = utils.ssim_per_image(torch.tensor(np.stack([p[1] for p in pairs]))[:, None],
                                 torch.tensor(np.stack([p[0] for p in pairs]))[:, None])
    for value, (image, noisy) in zip(batch.tolist(), pairs):
        assert abs(value - structural_similarity(image, noisy, data_range=1.0)) < 1e-3


def test_psnr_of_a_known_error():
    reference = torch.zeros(1, 1, 8, 8)
    assert utils.psnr_per_image(reference + 0.1, reference).item() == pytest.approx(20.0, abs=1e-4)


def test_codebook_usage_and_perplexity_on_hand_made_indices():
    counts = torch.bincount(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), minlength=8).float()
    assert utils.codebook_usage(counts) == 0.5
    assert utils.perplexity(counts) == pytest.approx(4.0)
    one_code = torch.bincount(torch.tensor([5] * 10), minlength=8).float()
    assert utils.codebook_usage(one_code) == 1 / 8 and utils.perplexity(one_code) == pytest.approx(1.0)
    skewed = torch.tensor([3.0, 1.0])
    entropy = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    assert utils.perplexity(skewed) == pytest.approx(np.exp(entropy))


def test_checkpoint_round_trip_leaves_no_temporary_files(tmp_path: Path):
    path = tmp_path / "ck" / "model.pth"
    utils.save_checkpoint(path, {"kind": "vqvae", "config": {"a": 1}, "model": {"w": torch.ones(2)}})
    loaded = utils.load_checkpoint(path, expected_kind="vqvae")
    assert torch.equal(loaded["model"]["w"], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == ["model.pth"]
    (path.parent / ".model.pth.abc123.tmp").write_bytes(b"half a checkpoint from a killed run")
    utils.save_checkpoint(path, {"kind": "vqvae", "config": {"a": 2}, "model": {}})
    assert [p.name for p in path.parent.iterdir()] == ["model.pth"]
    with pytest.raises(UsageError, match="a prior checkpoint is needed"):
        utils.load_checkpoint(path, expected_kind="prior")


class Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_bad_checkpoints_are_refused_with_a_clear_message_and_never_run_code(tmp_path: Path):
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(UsageError, match="notes.pth: cannot load checkpoint"):
        utils.load_checkpoint(text)
    good = tmp_path / "good.pth"
    utils.save_checkpoint(good, {"kind": "vqvae", "config": {}, "model": {"w": torch.ones(1000)}})
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(UsageError, match="truncated or corrupt"):
        utils.load_checkpoint(truncated)
    marker = tmp_path / "pwned"
    exploit = Exploit()
    exploit.target = str(marker)
    crafted = tmp_path / "crafted.pth"
    torch.save({"kind": "vqvae", "config": {}, "payload": exploit}, crafted)
    with pytest.raises(UsageError, match="refused"):
        utils.load_checkpoint(crafted)
    assert not marker.exists()
    plain = tmp_path / "plain.pth"
    torch.save({"weights": torch.ones(1)}, plain)
    with pytest.raises(UsageError, match="not a checkpoint written by this tool"):
        utils.load_checkpoint(plain)
