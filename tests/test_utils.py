from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

import checkpoints
import figures
import metrics
import utils
from demo import make_phantom
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
    ours = metrics.ssim_per_image(torch.tensor(noisy)[None, None], torch.tensor(image)[None, None]).item()
    assert abs(ours - expected) < 1e-3


def test_ssim_matches_skimage_on_colour_and_batches():
    pairs = [realistic_pair(seed, (48, 48)) for seed in range(3)]
    rgb = np.stack([pairs[0][0], pairs[1][0], pairs[2][0]], axis=-1)
    rgb_noisy = np.stack([pairs[0][1], pairs[1][1], pairs[2][1]], axis=-1)
    expected = structural_similarity(rgb, rgb_noisy, data_range=1.0, channel_axis=-1)
    ours = metrics.ssim_per_image(torch.tensor(rgb_noisy).permute(2, 0, 1)[None],
                                torch.tensor(rgb).permute(2, 0, 1)[None])
    assert abs(ours.item() - expected) < 1e-3
    batch = metrics.ssim_per_image(torch.tensor(np.stack([p[1] for p in pairs]))[:, None],
                                 torch.tensor(np.stack([p[0] for p in pairs]))[:, None])
    for value, (image, noisy) in zip(batch.tolist(), pairs):
        assert abs(value - structural_similarity(image, noisy, data_range=1.0)) < 1e-3


def test_psnr_of_a_known_error():
    reference = torch.zeros(1, 1, 8, 8)
    assert metrics.psnr_per_image(reference + 0.1, reference).item() == pytest.approx(20.0, abs=1e-4)


def test_codebook_usage_and_perplexity_on_hand_made_indices():
    counts = torch.bincount(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), minlength=8).float()
    assert metrics.codebook_usage(counts) == 0.5
    assert metrics.perplexity(counts) == pytest.approx(4.0)
    one_code = torch.bincount(torch.tensor([5] * 10), minlength=8).float()
    assert metrics.codebook_usage(one_code) == 1 / 8 and metrics.perplexity(one_code) == pytest.approx(1.0)
    skewed = torch.tensor([3.0, 1.0])
    entropy = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    assert metrics.perplexity(skewed) == pytest.approx(np.exp(entropy))


def test_checkpoint_round_trip_leaves_no_temporary_files(tmp_path: Path):
    path = tmp_path / "ck" / "model.pth"
    checkpoints.save_checkpoint(path, {"kind": "vqvae", "config": {"a": 1}, "model": {"w": torch.ones(2)}})
    loaded = checkpoints.load_checkpoint(path, expected_kind="vqvae")
    assert torch.equal(loaded["model"]["w"], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == ["model.pth"]
    (path.parent / ".model.pth.abc123.tmp").write_bytes(b"half a checkpoint from a killed run")
    checkpoints.save_checkpoint(path, {"kind": "vqvae", "config": {"a": 2}, "model": {}})
    assert [p.name for p in path.parent.iterdir()] == ["model.pth"]
    with pytest.raises(UsageError, match="a prior checkpoint is needed"):
        checkpoints.load_checkpoint(path, expected_kind="prior")


class Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_bad_checkpoints_are_refused_with_a_clear_message_and_never_run_code(tmp_path: Path):
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(UsageError, match="notes.pth: cannot load checkpoint"):
        checkpoints.load_checkpoint(text)
    good = tmp_path / "good.pth"
    checkpoints.save_checkpoint(good, {"kind": "vqvae", "config": {}, "model": {"w": torch.ones(1000)}})
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(UsageError, match="truncated or corrupt"):
        checkpoints.load_checkpoint(truncated)
    marker = tmp_path / "pwned"
    exploit = Exploit()
    exploit.target = str(marker)
    crafted = tmp_path / "crafted.pth"
    torch.save({"kind": "vqvae", "config": {}, "payload": exploit}, crafted)
    with pytest.raises(UsageError, match="refused"):
        checkpoints.load_checkpoint(crafted)
    assert not marker.exists()
    plain = tmp_path / "plain.pth"
    torch.save({"weights": torch.ones(1)}, plain)
    with pytest.raises(UsageError, match="not a checkpoint written by this tool"):
        checkpoints.load_checkpoint(plain)


def test_mean_absolute_error_of_a_known_difference():
    reference = torch.zeros(2, 1, 4, 4)
    changed = reference.clone()
    changed[1] += 0.25
    torch.testing.assert_close(metrics.mae_per_image(changed, reference), torch.tensor([0.0, 0.25]))


def test_code_colours_give_similar_codes_similar_colours():
    generator = torch.Generator().manual_seed(0)
    near_a = torch.randn(20, 8, generator=generator) * 0.05 + 3
    near_b = torch.randn(20, 8, generator=generator) * 0.05 - 3
    colours = figures.code_colours(torch.cat([near_a, near_b]))
    assert colours.shape == (40, 3) and colours.min() >= 0 and colours.max() <= 1
    within = torch.cdist(colours[:20], colours[:20]).max()
    across = torch.cdist(colours[:20], colours[20:]).min()
    assert across > 5 * within


def test_figures_fill_their_canvas(tmp_path: Path):
    """No blank band under the title: the top rows of pixels below the title hold image content."""
    from PIL import Image

    images = torch.rand(4, 1, 64, 32)
    figures.save_image_rows(tmp_path / "rows.png", {"a": images, "b": images}, title="a title")
    picture = np.asarray(Image.open(tmp_path / "rows.png").convert("L"), dtype=np.float32)
    blank_rows = (picture.std(axis=1) < 1).astype(int)  # rows that are all one colour (white)
    assert blank_rows[: len(blank_rows) // 8].sum() < 0.05 * len(blank_rows)
    height, width = picture.shape
    assert 1.5 < height / width < 4.5  # four rows of 2:1 images in two columns, not a square-cell grid


def test_gif_holds_one_frame_per_picture(tmp_path: Path):
    from PIL import Image

    frames = []
    for index, size in enumerate([(40, 30), (42, 30), (40, 31)]):  # the grids of different epochs differ slightly
        frames.append(tmp_path / f"{index}.png")
        Image.new("RGB", size, (index * 80, 0, 0)).save(frames[-1])
    figures.save_gif(tmp_path / "epochs.gif", frames)
    with Image.open(tmp_path / "epochs.gif") as gif:
        assert gif.n_frames == 3 and gif.size == (42, 31)


def test_atomic_write_leaves_a_complete_file_with_the_usual_permissions(tmp_path: Path):
    target = tmp_path / "out.txt"
    utils.atomic_write(target, lambda name: Path(name).write_text("done"))
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives under this process's umask
    assert target.read_text() == "done"
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    assert [path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")] == []
