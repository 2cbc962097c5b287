"""The transformer priors: causal in raster order and seeing every earlier code, cached sampling equal to sampling by
full forward passes, the masked prior's schedule, two levels, resume, old PixelCNN checkpoints."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import checkpoints
import predict
import train
import train_prior
from conftest import make_classes
from pixelcnn import PixelCNNConfig
from priors import HierarchicalPrior, build_prior, prior_config_dict, sampling_options
from sampling import draw_codes
from test_end_to_end import train_args
from test_prior import prior_args
from transformer import MaskedConfig, MaskedPrior, TransformerConfig, TransformerPrior, random_mask

TINY = TransformerConfig(num_embeddings=12, rows=4, columns=5, width=32, depth=2, heads=4, num_classes=3)


def tiny_transformer(**changes) -> TransformerPrior:
    torch.manual_seed(0)
    return TransformerPrior(TransformerConfig(**{**TINY.__dict__, **changes})).eval()


def test_logits_see_every_earlier_code_and_no_later_one():
    prior = tiny_transformer()
    codes, labels = torch.randint(0, 12, (2, 4, 5)), torch.tensor([0, 2])
    logits = prior(codes, labels).flatten(2)
    for position in range(20):
        changed = codes.flatten(1).clone()
        changed[:, position] = (changed[:, position] + 1) % 12
        difference = (prior(changed.view(2, 4, 5), labels).flatten(2) - logits).abs().amax(dim=(0, 1))
        assert (difference[: position + 1] == 0).all(), f"a code at {position} leaks to a position before it"
        assert (difference[position + 1:] > 0).all(), f"a position after {position} does not see it"
    assert not torch.allclose(prior(codes, torch.tensor([1, 1])), prior(codes, labels))  # the class is seen


def test_cached_sampling_draws_what_full_forward_passes_predict():
    prior = tiny_transformer()
    labels = torch.tensor([0, 1, 2])
    fast = prior.sample(3, (4, 5), labels, generator=torch.Generator().manual_seed(3))
    generator, codes = torch.Generator().manual_seed(3), torch.zeros(3, 20, dtype=torch.long)
    with torch.no_grad():
        for position in range(20):
            codes[:, position] = draw_codes(prior(codes.view(3, 4, 5), labels).flatten(2)[:, :, position], 1.0,
                                            generator)
    assert torch.equal(fast, codes.view(3, 4, 5))


def test_top_k_and_top_p_only_ever_draw_the_likeliest_codes():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    generator = torch.Generator().manual_seed(0)
    assert set(draw_codes(logits, top_k=2, generator=generator).tolist()) == {0, 1}
    probabilities = logits[0].softmax(0)  # 0.64, 0.24, 0.09, ...: the nucleus of 0.8 holds the first two codes
    assert probabilities[:2].sum() > 0.8 > probabilities[0]
    assert set(draw_codes(logits, top_p=0.8, generator=generator).tolist()) == {0, 1}


def test_the_bottom_transformer_sees_the_whole_top_map_and_is_causal_in_its_own():
    torch.manual_seed(0)
    top = TransformerConfig(num_embeddings=12, rows=2, columns=2, width=32, depth=2, heads=4)
    bottom = TransformerConfig(num_embeddings=12, rows=4, columns=4, width=32, depth=2, heads=4,
                               condition_embeddings=12)
    prior = build_prior([top, bottom]).eval()
    assert isinstance(prior, HierarchicalPrior) and isinstance(prior.bottom, TransformerPrior)
    top_codes, bottom_codes = torch.randint(0, 12, (1, 2, 2)), torch.randint(0, 12, (1, 4, 4))
    logits = prior.bottom(bottom_codes, condition=top_codes).flatten(2)
    changed = top_codes.clone()
    changed[0, 1, 1] = (changed[0, 1, 1] + 1) % 12  # the last top code: the first bottom position must see it
    assert (prior.bottom(bottom_codes, condition=changed).flatten(2) - logits).abs()[0, :, 0].amax() > 0
    later = bottom_codes.clone()
    later[0, 3, 3] = (later[0, 3, 3] + 1) % 12
    assert torch.equal(prior.bottom(later, condition=top_codes).flatten(2), logits)  # nothing sees the last one
    new_top, new_bottom = prior.sample_levels(2, [(2, 2), (4, 4)], generator=torch.Generator().manual_seed(0))
    assert new_top.shape == (2, 2, 2) and new_bottom.shape == (2, 4, 4)


@pytest.mark.parametrize("steps", [1, 4, 12])
def test_the_masked_schedule_unmasks_every_position_in_the_given_steps(steps: int, monkeypatch):
    torch.manual_seed(0)
    prior = MaskedPrior(MaskedConfig(num_embeddings=12, rows=4, columns=5, width=32, depth=2, heads=4)).eval()
    still_masked = []
    forward = prior.forward

    def counting(codes, labels=None):
        still_masked.append(int((codes == prior.mask_token).sum()) // len(codes))
        return forward(codes, labels)

    monkeypatch.setattr(prior, "forward", counting)
    sampled = prior.sample(3, (4, 5), steps=steps, generator=torch.Generator().manual_seed(1))
    assert len(still_masked) == steps and still_masked[0] == 20  # one pass per step, from a fully masked map
    assert still_masked == sorted(still_masked, reverse=True) and len(set(still_masked)) == steps  # always fewer
    assert still_masked[1:] + [0] == prior.schedule(steps, 20)
    assert int(sampled.max()) < 12 and int(sampled.min()) >= 0  # no mask token is left


def test_the_masked_loss_scores_only_hidden_codes():
    torch.manual_seed(0)
    prior = MaskedPrior(MaskedConfig(num_embeddings=12, rows=4, columns=5, width=32, depth=2, heads=4)).eval()
    codes = torch.randint(0, 12, (2, 4, 5))
    masked = random_mask(codes.shape, torch.tensor([0.3, 0.3]), torch.Generator().manual_seed(0))
    assert masked.flatten(1).sum(1).tolist() == [6, 6]
    bits = prior.masked_bits(codes, None, masked)
    visible = codes.clone()
    visible[~masked] = (visible[~masked] + 1) % 12  # other visible codes: another score; the same hidden ones
    assert not torch.equal(prior.masked_bits(visible, None, masked), bits)
    assert bits.shape == (2,) and (bits > 0).all()


def test_prior_resume_equals_an_uninterrupted_run(tmp_path: Path):
    data = make_classes(tmp_path / "data", per_class=8)
    vqvae = train.main(train_args(tmp_path, data, "--run-name", "vq", "--max-steps", "2"))["checkpoint"]
    common = ["--epochs", "2", "--device", "cpu"]
    straight = train_prior.main(prior_args(tmp_path / "a", vqvae, *common))
    stopped = train_prior.main(prior_args(tmp_path / "b", vqvae, *common, "--max-steps", "4", "--checkpoint-every",
                                          "2"))
    state = checkpoints.load_checkpoint(stopped["last_checkpoint"], expected_kind="prior")["training"]
    assert state["step"] == 4 and state["epoch"] == 2  # three steps an epoch: part-way through the second
    resumed = train_prior.main(["--resume", stopped["last_checkpoint"], "--max-steps", "0", "--device", "cpu"])
    first, second = (checkpoints.load_checkpoint(run["last_checkpoint"])["model"] for run in (straight, resumed))
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    assert checkpoints.load_checkpoint(resumed["last_checkpoint"])["training"]["step"] == 6


@pytest.mark.parametrize("kind", ["masked", "pixelcnn"])
def test_every_prior_kind_trains_and_samples(kind: str, tmp_path: Path):
    data = make_classes(tmp_path / "data", per_class=6)
    vqvae = train.main(train_args(tmp_path, data, "--run-name", "vq", "--max-steps", "2"))["checkpoint"]
    result = train_prior.main(prior_args(tmp_path, vqvae, "--prior", kind, "--max-steps", "2"))
    saved = checkpoints.load_checkpoint(result["checkpoint"], expected_kind="prior")
    assert saved["config"]["kind"] == kind
    score = "val_masked_bits_per_code" if kind == "masked" else "val_bits_per_code"
    assert 0 < float(result["best"][score]) < 20
    report = predict.main(["-m", result["checkpoint"], "--sample", "3", "--steps", "2", "--cache-dir",
                           str(tmp_path / "cache"), "--resources-dir", str(tmp_path / "res")])
    assert report["sample_seconds"] > 0


def test_a_prior_checkpoint_written_before_there_were_kinds_still_loads_and_samples(tmp_path: Path):
    data = make_classes(tmp_path / "data", per_class=6)
    vqvae = train.main(train_args(tmp_path, data, "--run-name", "vq", "--max-steps", "2"))["checkpoint"]
    result = train_prior.main(prior_args(tmp_path, vqvae, "--prior", "pixelcnn", "--max-steps", "1"))
    old = checkpoints.load_checkpoint(result["checkpoint"])
    old["config"] = {key: value for key, value in old["config"].items() if key != "kind"}  # as PriorConfig wrote it
    for key in ("training", "run_name"):
        del old[key]
    checkpoints.save_checkpoint(tmp_path / "old.pth", old)
    prior, *_ = checkpoints.load_prior(tmp_path / "old.pth", torch.device("cpu"))
    assert type(prior).__name__ == "GatedPixelCNN"
    report = predict.main(["-m", str(tmp_path / "old.pth"), "--sample", "2", "--cache-dir", str(tmp_path / "cache"),
                           "--resources-dir", str(tmp_path / "res")])
    assert report["sample_seconds"] > 0
    assert prior_config_dict([PixelCNNConfig()])["kind"] == "pixelcnn"


@pytest.mark.parametrize("layout", ["classes", "hipmri"])
def test_saved_samples_read_back_as_the_drawn_images_and_are_drawn_a_batch_at_a_time(layout: str, tmp_path: Path,
                                                                                     monkeypatch, request):
    import json

    import numpy as np

    from dataset import find_data
    from modules import VQVAE
    from readers import Preprocessing, read_slices

    data = make_classes(tmp_path / "data", per_class=6) if layout == "classes" else request.getfixturevalue(
        "hipmri_dir")
    # trained long enough for slices that are not blank: the reader refuses constant images
    vqvae = train.main(train_args(tmp_path, data, "--run-name", "vq", "--epochs", "5", "--lr", "3e-3"))["checkpoint"]
    prior = train_prior.main(prior_args(tmp_path, vqvae, "--max-steps", "2"))["checkpoint"]
    batches, decoded = [], []
    sample_levels, decode = TransformerPrior.sample_levels, VQVAE.decode_code_maps

    def counted_sampling(self, count, *args, **kwargs):
        batches.append(count)
        return sample_levels(self, count, *args, **kwargs)

    def counted_decoding(self, codes):
        decoded.append(len(codes[0]))
        return decode(self, codes)

    monkeypatch.setattr(TransformerPrior, "sample_levels", counted_sampling)
    monkeypatch.setattr(VQVAE, "decode_code_maps", counted_decoding)
    out = tmp_path / "samples"
    predict.main(["-m", prior, "--sample", "5", "--batch-size", "2", "--save-samples", str(out), "--top-k", "8",
                  "--cache-dir", str(tmp_path / "cache"), "--resources-dir", str(tmp_path / "res")])
    assert batches == [2, 2, 1] and decoded == [2, 2, 1]  # never more than a batch of maps or images at once
    drawn = json.loads((out / "samples.json").read_text())
    assert drawn["count"] == 5 and drawn["top_k"] == 8 and drawn["seed"] == 0 and drawn["prior_kind"] == "transformer"
    with np.load(out / "codes.npz") as stored:
        codes, files = torch.from_numpy(stored["level0"]).long(), list(stored["files"])
    suffix = ".png" if layout == "classes" else ".nii.gz"
    assert len(files) == 5 and all(name.endswith(suffix) for name in files)
    assert (layout == "classes") == all("/" in name for name in files)  # class folders only for a conditional prior
    model, _ = checkpoints.load_vqvae(vqvae, torch.device("cpu"))
    with torch.no_grad():
        images = model.decode_code_maps([codes]).float().clamp(0, 1)
    prep = Preprocessing(image_size=tuple(images.shape[-2:]))
    for name, image in zip(files, images):
        (read,) = read_slices(out / name, prep)
        assert np.array_equal(np.round(read * 255), np.round(image.numpy() * 255))
    source = find_data(out)  # the folder is a data set this repository reads
    assert sum(len(listed) for listed in source.files.values()) == 5
    with pytest.raises(Exception, match="not empty"):
        predict.main(["-m", prior, "--sample", "1", "--save-samples", str(out), "--cache-dir", str(tmp_path / "cache"),
                      "--resources-dir", str(tmp_path / "res")])


def test_guided_sampling_draws_what_guided_full_forward_passes_predict():
    """Classifier-free guidance: each draw from cond + w (cond - uncond), the no-class half run beside the class's."""
    prior = tiny_transformer()
    labels, guidance = torch.tensor([0, 2]), 2.0
    fast = prior.sample(2, (4, 5), labels, generator=torch.Generator().manual_seed(5), guidance=guidance)
    generator, codes = torch.Generator().manual_seed(5), torch.zeros(2, 20, dtype=torch.long)
    no_class = torch.full_like(labels, prior.no_class)
    with torch.no_grad():
        for position in range(20):
            maps = codes.view(2, 4, 5)
            conditional = prior(maps, labels).flatten(2)[:, :, position]
            unconditional = prior(maps, no_class).flatten(2)[:, :, position]
            codes[:, position] = draw_codes(conditional + guidance * (conditional - unconditional), 1.0, generator)
    assert torch.equal(fast, codes.view(2, 4, 5))
    assert not torch.equal(fast, prior.sample(2, (4, 5), labels, generator=torch.Generator().manual_seed(5)))


def test_class_dropout_hides_the_class_only_while_training():
    prior = tiny_transformer(class_dropout=1.0)
    labels = torch.tensor([0, 1, 2])
    no_class = prior.start.weight[prior.no_class]
    assert torch.equal(prior.class_vectors(labels, 3, labels.device), prior.start.weight[labels])  # eval: kept
    prior.train()
    assert all(torch.equal(vector, no_class) for vector in prior.class_vectors(labels, 3, labels.device))
    prior.eval()
    assert torch.equal(prior.class_vectors(torch.tensor([-1]), 1, labels.device)[0], no_class)  # no class folder


def test_a_prior_trained_without_class_dropout_samples_unguided():
    """It never learnt the class-free prediction (its no-class row is untrained): guidance would steer by noise."""
    prior = tiny_transformer(class_dropout=0.0)
    labels = torch.tensor([0, 2])
    guided = prior.sample(2, (4, 5), labels, generator=torch.Generator().manual_seed(5), guidance=3.0)
    assert torch.equal(guided, prior.sample(2, (4, 5), labels, generator=torch.Generator().manual_seed(5)))
    assert TransformerConfig.from_dict({"num_classes": 3}).class_dropout == 0.0  # configs saved before guidance


def test_each_kind_is_given_only_the_sampling_options_it_takes():
    given = {"top_k": 8, "guidance": 3.0, "steps": 4}
    pixelcnn = build_prior([PixelCNNConfig(num_embeddings=12, hidden_channels=8, num_layers=2)])
    assert sampling_options(pixelcnn, **given) == {"top_k": 8}
    assert sampling_options(tiny_transformer(), **given) == {"top_k": 8, "guidance": 3.0}
    assert sampling_options(MaskedPrior(MaskedConfig(**TINY.__dict__)), **given) == given
    two_levels = build_prior([TransformerConfig(**TINY.__dict__), TransformerConfig(**TINY.__dict__)])
    assert isinstance(two_levels, HierarchicalPrior) and sampling_options(two_levels, **given) == {"top_k": 8,
                                                                                                  "guidance": 3.0}
