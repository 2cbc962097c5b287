"""Finding anomalies: the prior's healing, the maps and their files at each input's own size, the detection metrics,
and anomaly.py end to end on phantoms with a pasted blob."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import anomaly
import metrics
import predict
import train
import train_prior
import utils
from anomalies import AnomalyConfig, Restoration, anomaly_maps, gaussian_blur, image_scores, to_pixels
from conftest import write_nifti, write_png
from demo import make_phantom
from outputs import FileOutputs, source_file
from priors import HierarchicalPrior
from readers import Preprocessing, fit_to_shape, read_slices, unfit_from_shape
from test_end_to_end import train_args
from transformer import TransformerConfig, TransformerPrior

SHAPE = (32, 32)


def smooth_head(seed: int, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """A noiseless head-like slice: a bright ellipse of random size and place with two darker ones inside, blurred,
    in a float range of its own (as HipMRI's)."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[: shape[0], : shape[1]] / np.array(shape)[:, None, None]
    centre = 0.5 + rng.uniform(-0.06, 0.06, 2)
    radii = rng.uniform(0.3, 0.42, 2)
    image = 0.6 * ((((rows - centre[0]) / radii[0]) ** 2 + ((columns - centre[1]) / radii[1]) ** 2) < 1)
    for side in (-1, 1):
        inner = centre + np.array([0.0, side * rng.uniform(0.08, 0.14)])
        image -= 0.35 * ((((rows - inner[0]) / 0.12) ** 2 + ((columns - inner[1]) / 0.05) ** 2) < 1)
    image = torch.nn.functional.avg_pool2d(torch.from_numpy(image)[None, None].float(), 3, 1, 1)[0, 0].numpy()
    return (1000 * image + 50).astype(np.float32)


def with_blob(image: np.ndarray, centre: tuple[int, int], radius: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """A dark disc (the background's intensity) pasted onto a slice, and its mask."""
    rows, columns = np.mgrid[: image.shape[0], : image.shape[1]]
    mask = (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius ** 2
    return np.where(mask, image.min(), image).astype(np.float32), mask


@pytest.fixture(scope="module")
def normal_model(tmp_path_factory) -> dict:
    """A tiny VQ-VAE on head-like slices of two classes (one with blobs) and a prior of the 'normal' class only; a
    test folder of clean slices and of the same slices with a blob (2D NIfTI, 32x32, float intensities)."""
    root = tmp_path_factory.mktemp("anomaly")
    data = root / "data"
    for split, count in (("train", 48), ("validate", 8)):
        for index in range(count):
            seed = index + (0 if split == "train" else 500)
            write_nifti(data / split / "normal" / f"case_{seed:03d}_slice_0.nii.gz", smooth_head(seed))
        for index in range(count // 4):
            seed = 900 + index + (0 if split == "train" else 50)
            blobbed, _ = with_blob(smooth_head(seed), (12, 16))
            write_nifti(data / split / "other" / f"case_{seed:03d}_slice_0.nii.gz", blobbed)
    tests = root / "scans"
    masks = {}
    for index in range(4):
        seed = 700 + index
        clean = smooth_head(seed)
        write_nifti(tests / "clean" / f"case_{seed}.nii.gz", clean, np.diag([0.5, 0.7, 2.0, 1.0]))
        blobbed, mask = with_blob(clean, (11 + index, 13 + 2 * index))
        write_nifti(tests / "blob" / f"case_{seed}.nii.gz", blobbed, np.diag([0.5, 0.7, 2.0, 1.0]))
        masks[f"blob/case_{seed}.nii.gz"] = mask
    common = ["--resources-dir", str(root / "res"), "--cache-dir", str(root / "cache")]
    training = ["--checkpoint-dir", str(root / "ck"), *common]
    vqvae = train.main(train_args(root, data, "--epochs", "12", "--run-name", "vq", "--lr", "3e-3"))["checkpoint"]
    prior = train_prior.main(["-m", vqvae, "--classes", "normal", "--width", "32", "--depth", "2", "--heads", "2",
                              "--dropout", "0", "--lr", "3e-3", "--epochs", "30", "--batch-size", "8",
                              "--warmup-steps", "1", "--run-name", "normal", *training])["checkpoint"]
    return {"root": root, "data": data, "scans": tests, "masks": masks, "vqvae": vqvae, "prior": prior,
            "common": common, "training": training}


def run_anomaly(model: dict, out: Path, *extra: str) -> dict:
    return anomaly.main(["-m", model["prior"], "--data", str(model["scans"]), "--out", str(out), *model["common"],
                         *extra])


def read_scores(out: Path) -> dict[str, dict]:
    with open(out / "scores.csv", newline="") as handle:
        return {row["file"]: row for row in csv.DictReader(handle)}


def test_a_prior_of_one_class_is_unconditional_and_an_unknown_class_is_refused(normal_model: dict):
    import checkpoints

    saved = checkpoints.load_checkpoint(normal_model["prior"], expected_kind="prior")
    assert not saved["conditional"] and saved["class_names"] == ["normal"]
    with pytest.raises(utils.UsageError, match="--classes tumour: no such class folder .*normal, other"):
        train_prior.main(["-m", normal_model["vqvae"], "--classes", "tumour", *normal_model["training"]])


def test_blobs_score_higher_and_their_maps_peak_inside_them(normal_model: dict, tmp_path: Path):
    out = tmp_path / "out"
    run_anomaly(normal_model, out, "--resamplings", "2")
    rows = read_scores(out)
    assert set(rows) == {f"{group}/case_{700 + index}.nii.gz" for group in ("clean", "blob") for index in range(4)}
    for index in range(4):
        clean, blob = rows[f"clean/case_{700 + index}.nii.gz"], rows[f"blob/case_{700 + index}.nii.gz"]
        assert float(blob["score"]) > float(clean["score"])
        assert float(blob["unlikely_bits"]) > float(clean["unlikely_bits"])
        assert blob["class"] == "blob" and clean["class"] == "clean"
    for name, mask in normal_model["masks"].items():
        values = np.load(out / "maps" / f"{name}.npy")
        assert values.shape == SHAPE and values.dtype == np.float32
        assert mask[np.unravel_index(values.argmax(), values.shape)], f"the map of {name} peaks outside the blob"
    assert (normal_model["root"] / "res" / "normal" / "anomaly_test_top.png").exists()
    assert (normal_model["root"] / "res" / "normal" / "anomaly_test_scores.png").exists()


def test_maps_and_healed_slices_have_the_file_s_size_affine_and_intensities(normal_model: dict, tmp_path: Path):
    import nibabel as nib

    data = tmp_path / "scans"
    affine = np.array([[0.0, -0.8, 0, 10], [0.9, 0, 0, -4], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    image = make_phantom(42, 0.3, (40, 24))  # not the network's 32x32: fitted on the way in, unfitted on the way out
    write_nifti(data / "scan.nii.gz", image[..., None], affine)  # stored as [X, Y, 1], as some exporters do
    write_png(data / "picture.png", np.round(255 * make_phantom(43, 0.3, (20, 50)) / image.max()).clip(0, 255)
              .astype(np.uint8))
    out = tmp_path / "out"
    run_anomaly({**normal_model, "scans": data}, out, "--resamplings", "1")
    saved_map = nib.load(str(out / "maps" / "scan.nii.gz"))
    np.testing.assert_allclose(saved_map.affine, affine)
    assert saved_map.shape == (40, 24, 1) and saved_map.header.get_data_dtype() == np.float32
    np.testing.assert_allclose(np.asarray(saved_map.dataobj)[..., 0], np.load(out / "maps" / "scan.nii.gz.npy"))
    healed = nib.load(str(out / "healed" / "scan.nii.gz"))
    assert healed.shape == (40, 24, 1) and np.allclose(healed.affine, affine)
    low, high = np.percentile(image, (0.5, 99.5))
    assert low - 1e-3 <= float(np.asarray(healed.dataobj).min()) and float(np.asarray(healed.dataobj).max()) <= high + 1
    assert float(np.asarray(healed.dataobj).max()) > low + 0.5 * (high - low)  # in the input's units, not [0, 1]
    assert np.load(out / "maps" / "picture.png.npy").shape == (20, 50)
    from PIL import Image

    with Image.open(out / "healed" / "picture.png") as picture:
        assert picture.size == (50, 20)
    assert set(read_scores(out)) == {"scan.nii.gz", "picture.png"}


def test_a_folder_holding_only_a_test_split_is_scored(normal_model: dict, tmp_path: Path):
    data = tmp_path / "study"
    for index in range(2):
        write_nifti(data / "test" / f"case_{index}.nii.gz", smooth_head(800 + index))
    report = run_anomaly({**normal_model, "scans": data}, tmp_path / "out", "--resamplings", "1", "--orderings", "1",
                         "--examples", "0")  # and no figure
    assert report["split"] == "test" and set(read_scores(tmp_path / "out")) == {"test/case_0.nii.gz",
                                                                                  "test/case_1.nii.gz"}


def test_bad_input_gets_one_line(normal_model: dict, tmp_path: Path, capsys):
    data = tmp_path / "scans"
    write_nifti(data / "good.nii.gz", make_phantom(1, 0.5, SHAPE))
    (data / "broken.png").write_bytes(b"not a picture")
    out = tmp_path / "out"
    run_anomaly({**normal_model, "scans": data}, out, "--resamplings", "1")
    assert "skipped 1 of 2 files" in capsys.readouterr().out and set(read_scores(out)) == {"good.nii.gz"}
    with pytest.raises(utils.UsageError, match="--out .*the folder is not empty"):
        run_anomaly({**normal_model, "scans": data}, out)
    with pytest.raises(utils.UsageError, match="--threshold 1.5: a probability"):
        run_anomaly({**normal_model, "scans": data}, tmp_path / "new", "--threshold", "1.5")
    with pytest.raises(utils.UsageError, match="is a vqvae checkpoint, but a prior checkpoint is needed"):
        anomaly.main(["-m", normal_model["vqvae"], "--out", str(tmp_path / "other")])
    with pytest.raises(utils.UsageError, match="--examples -1: 0 or more"):
        run_anomaly({**normal_model, "scans": data}, tmp_path / "new", "--examples", "-1")


def test_priors_without_a_raster_likelihood_are_refused(normal_model: dict, tmp_path: Path):
    pixelcnn = train_prior.main(["-m", normal_model["vqvae"], "--prior", "pixelcnn", "--hidden-channels", "8",
                                 "--layers", "2", "--epochs", "1", "--run-name", "pc", *normal_model["training"]])
    with pytest.raises(utils.UsageError, match="this prior is a GatedPixelCNN: anomaly maps need the transformer"):
        anomaly.main(["-m", pixelcnn["checkpoint"], "--out", str(tmp_path / "out"), *normal_model["common"]])


def test_predict_saves_each_reconstruction_named_and_sized_as_its_input(normal_model: dict, tmp_path: Path):
    import nibabel as nib

    out = tmp_path / "reconstructions"
    predict.main(["-m", normal_model["vqvae"], "--data", str(normal_model["scans"]), "--save-reconstructions",
                  str(out), *normal_model["common"]])
    for name in normal_model["masks"]:
        for group in ("clean", "blob"):
            written = nib.load(str(out / group / Path(name).name))
            assert written.shape == SHAPE and np.allclose(written.affine, np.diag([0.5, 0.7, 2.0, 1.0]))
    with pytest.raises(utils.UsageError, match="--save-reconstructions .*the folder is not empty"):
        predict.main(["-m", normal_model["vqvae"], "--data", str(normal_model["scans"]), "--save-reconstructions",
                      str(out), *normal_model["common"]])


# ----------------------------------------------------------------------------- the parts


def tiny_prior(seed: int = 0, **changes) -> TransformerPrior:
    """A random transformer whose predictions are far from uniform, as a trained one's are."""
    torch.manual_seed(seed)
    values = {"num_embeddings": 10, "rows": 3, "columns": 4, "width": 16, "depth": 2, "heads": 2, **changes}
    prior = TransformerPrior(TransformerConfig(**values)).eval()
    with torch.no_grad():
        prior.head.weight.mul_(40)
    return prior


def test_restoring_redraws_exactly_the_codes_unlikely_given_the_restored_ones_before_them():
    prior = tiny_prior()
    codes = torch.randint(0, 10, (5, 3, 4), generator=torch.Generator().manual_seed(1))
    unchanged, none_replaced = prior.restore(codes, threshold=1e-9)
    assert torch.equal(unchanged, codes) and not none_replaced.any()
    restored, replaced = prior.restore(codes, threshold=0.05, generator=torch.Generator().manual_seed(2))
    assert replaced.any() and not replaced.all()
    assert torch.equal(restored[~replaced], codes[~replaced])
    with torch.no_grad():  # the restored map, scored in one pass: what restore() saw at each position
        probabilities = prior(restored).softmax(dim=1)
        seen = prior(codes).softmax(dim=1)
    kept = probabilities.gather(1, codes[:, None])[:, 0]
    chosen = probabilities.gather(1, restored[:, None])[:, 0]
    # kept codes were likely enough given what came before them as restored; replaced ones were not, and their
    # replacements are (or are the likeliest code there)
    assert (kept[~replaced] >= 0.05).all() and (kept[replaced] < 0.05).all()
    assert ((chosen[replaced] >= 0.05) | (chosen[replaced] == probabilities.amax(dim=1)[replaced])).all()
    first = replaced.flatten(1).float().argmax(dim=1)  # before the first replacement, the input's own scores rule
    flat_seen = seen.gather(1, codes[:, None])[:, 0].flatten(1)
    for row in range(5):
        assert (flat_seen[row, : first[row]] >= 0.05).all()


def test_the_calibrated_threshold_redraws_the_share_asked_of_normal_codes():
    from anomalies import calibrated_threshold

    prior = tiny_prior()
    codes = torch.randint(0, 10, (40, 3, 4), generator=torch.Generator().manual_seed(4))
    threshold = calibrated_threshold(prior, [codes], 0.1, batch_size=7)  # batches of 7: the same as all at once
    with torch.no_grad():
        probabilities = prior(codes).softmax(dim=1).gather(1, codes[:, None])[:, 0]
    assert float((probabilities < threshold * (1 - 1e-5)).float().mean()) == pytest.approx(0.1, abs=0.01)


def test_a_two_level_prior_restores_the_bottom_given_the_restored_top():
    top = tiny_prior(0, rows=2, columns=2)
    bottom = tiny_prior(1, condition_embeddings=10, rows=4, columns=4)
    prior = HierarchicalPrior(top, bottom).eval()
    levels = [torch.randint(0, 10, (3, 2, 2)), torch.randint(0, 10, (3, 4, 4))]
    restored, replaced = prior.restore_levels(levels, 0.2, generator=torch.Generator().manual_seed(0))
    assert [level.shape for level in restored] == [level.shape for level in levels]
    with torch.no_grad():
        given_top = prior.bottom(restored[1], None, condition=restored[0]).softmax(dim=1)
    kept = given_top.gather(1, levels[1][:, None])[:, 0]
    assert (kept[~replaced[1]] >= 0.2).all() and (kept[replaced[1]] < 0.2).all()


def test_the_map_is_what_healing_changed_weighted_by_surprise_and_the_scores_follow():
    images = torch.zeros(2, 1, 8, 8)
    images[1, :, 4:8, 0:4] = 1.0  # the second image has a bright corner that both healed versions remove
    healed = torch.zeros(2, 2, 1, 8, 8)
    healed[1, 0] = 0.5  # a normal change one healed version made everywhere in the first image
    replaced = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    replaced[:, 1, 1, 0] = True
    bits = torch.full((1, 2, 2, 2), 1.0)
    bits[0, 1, 1, 0] = 12.0  # the corner's code is a surprise
    restoration = Restoration(images, images.clone(), healed, [replaced], [bits], uniform_bits=4.0)
    config = AnomalyConfig(threshold=0.01, resamplings=2, orderings=1, smoothing=0.0, top_share=0.25)
    maps = anomaly_maps(restoration, config)
    assert torch.equal(maps[1], 3.0 * to_pixels(replaced[0, 1].float(), (8, 8)))  # change 1 x 12 / 4 bits
    assert torch.allclose(maps[0], torch.full((8, 8), 0.0625))  # the one-off change halved, x 1 / 4 bits
    scores = image_scores(restoration, maps, config)
    assert scores["score"].tolist() == scores["map"].tolist() == [0.0625, 3.0]
    assert scores["unlikely_bits"].tolist() == [0.0, 12.0]  # 12 bits is below p = 0.01 (6.6 bits); 1 bit is not
    assert scores["bits"].tolist() == pytest.approx([1.0, 15 / 4])
    assert scores["codes_replaced"].tolist() == [0.0, 0.25]


@pytest.mark.parametrize("orderings", [1, 2, 4])
def test_every_ordering_is_turned_back_to_the_image_s_own_orientation(orderings: int):
    from anomalies import restore

    class Mirror(torch.nn.Module):  # a stand-in VQ-VAE whose codes are its pixels, and a prior that keeps them
        config = type("Config", (), {"spatial_dims": 2, "num_embeddings": 2})

        def code_maps(self, images):
            return [images[:, 0].round().long()]

        def decode_code_maps(self, levels):
            return levels[0][:, None].float()

    class Keep(torch.nn.Module):
        def level_logits(self, levels, labels):
            return [torch.nn.functional.one_hot(levels[0], 2).permute(0, 3, 1, 2).float()]

        def restore_levels(self, levels, threshold, labels, generator):
            return levels, [torch.zeros_like(levels[0], dtype=torch.bool)]

    images = torch.zeros(1, 1, 4, 6)
    images[0, 0, 0, :2] = 1.0  # a corner: any turn left unturned would move it
    restoration = restore(Mirror(), Keep(), images, AnomalyConfig(threshold=0.1, orderings=orderings, resamplings=1))
    assert restoration.healed.shape == (orderings, 1, 1, 4, 6)
    assert all(torch.equal(version, images) for version in restoration.healed)
    assert restoration.code_bits[0].shape == (orderings, 1, 4, 6)


def test_gaussian_smoothing_keeps_constants_and_spreads_a_point():
    assert torch.allclose(gaussian_blur(torch.full((1, 9, 9), 0.3), 1.5), torch.full((1, 9, 9), 0.3))
    point = torch.zeros(1, 21, 21)
    point[0, 10, 10] = 1.0
    blurred = gaussian_blur(point, 2.0)[0]
    assert blurred.sum() == pytest.approx(1.0, abs=1e-5) and blurred.argmax() == 10 * 21 + 10
    assert blurred[10, 12] == pytest.approx(blurred[10, 10] * math.exp(-0.5), rel=1e-4)


@pytest.mark.parametrize("mode", ["fit", "crop"])
@pytest.mark.parametrize("original", [(37, 23), (20, 50), (64, 64), (31, 64)])
def test_unfitting_puts_every_pixel_back_where_it_came_from(mode: str, original: tuple[int, int]):
    rows, columns = np.mgrid[: original[0], : original[1]]
    image = (0.5 + 0.4 * np.sin(rows / 9.0) * np.cos(columns / 11.0))[None].astype(np.float32)
    restored = unfit_from_shape(torch.from_numpy(fit_to_shape(image, (32, 32), mode)), original, mode).numpy()
    assert restored.shape == image.shape
    if mode == "fit":  # all of it comes back; with crop, the middle does
        assert np.abs(restored - image).mean() < 0.02
    else:
        middle = tuple(slice(side // 3, side - side // 3) for side in original)
        assert np.abs(restored[0][middle] - image[0][middle]).mean() < 0.02


def test_outputs_are_named_after_their_inputs_and_never_overwrite_each_other(tmp_path: Path):
    data = tmp_path / "data"
    for folder in ("yes", "no"):  # the same file name in two folders, and two files differing only by their suffix
        write_png(data / folder / "1.png", phantom_png(1))
    write_png(data / "no" / "1.jpg", phantom_png(2))
    linked = tmp_path / "linked"  # a data folder of links, as some clusters lay data out
    (linked / "yes").mkdir(parents=True)
    (linked / "yes" / "1.png").symlink_to(data / "yes" / "1.png")
    writer = FileOutputs(tmp_path / "out", str(data), data, Preprocessing(image_size=(8, 8)))
    names = {writer.write_map("maps", str(data / folder / name), torch.zeros(8, 8))
             for folder, name in (("yes", "1.png"), ("no", "1.png"), ("no", "1.jpg"))}
    assert names == {tmp_path / "out" / "maps" / name for name in ("yes/1.png.npy", "no/1.png.npy", "no/1.jpg.npy")}
    with pytest.raises(utils.UsageError, match="another input already wrote"):
        writer.write_map("maps", str(data / "yes" / "1.png"), torch.zeros(8, 8))
    links = FileOutputs(tmp_path / "out2", str(linked), linked, Preprocessing(image_size=(8, 8)))
    assert links.relative(str(linked / "yes" / "1.png")) == Path("yes/1.png")
    assert links.relative("/elsewhere/one.png") == Path("one.png")
    assert source_file("/x/scan.nii.gz:12") == (Path("/x/scan.nii.gz"), 12)


def phantom_png(seed: int, shape=(12, 10)) -> np.ndarray:
    return np.round(255 * smooth_head(seed, shape) / 1100).astype(np.uint8)


def test_a_volume_s_slices_come_back_where_they_were_in_it(tmp_path: Path):
    import nibabel as nib

    volume = np.zeros((12, 10, 6), np.float32)  # slices 0 and 5 are empty: the loader skips them
    for index in range(1, 5):
        volume[..., index] = smooth_head(index, (12, 10))
    affine = np.diag([0.9, 0.8, 3.0, 1.0])
    write_nifti(tmp_path / "data" / "v.nii.gz", volume, affine)
    writer = FileOutputs(tmp_path / "out", str(tmp_path / "data"), tmp_path, Preprocessing(image_size=(8, 8)))
    source = str(tmp_path / "data" / "v.nii.gz") + ":0"  # the first slice the loader kept: slice 1 of the volume
    writer.write_map("maps", source, torch.ones(8, 8))
    written = nib.load(str(tmp_path / "out" / "maps" / "v.slice1.nii.gz"))
    assert written.shape == (12, 10, 1) and (tmp_path / "out" / "maps" / "v.nii.gz.slice1.npy").exists()
    np.testing.assert_allclose(written.affine, affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1],
                                                                  [0, 0, 0, 1.0]]))
    healed = writer.write_image("healed", str(tmp_path / "data" / "v.nii.gz") + ":3", torch.full((1, 8, 8), 0.5))
    assert healed.name == "v.slice4.nii.gz" and nib.load(str(healed)).shape == (12, 10, 1)


def test_a_16_bit_picture_comes_back_16_bit_in_its_own_range(tmp_path: Path):
    from PIL import Image

    values = (np.arange(16 * 12).reshape(16, 12) * 40 + 1000).astype(np.uint16)
    path = tmp_path / "data" / "x.png"
    path.parent.mkdir()
    Image.fromarray(values).save(path)
    prep = Preprocessing(image_size=(16, 12))
    writer = FileOutputs(tmp_path / "out", str(tmp_path / "data"), tmp_path, prep)
    written = writer.write_image("healed", str(path), torch.from_numpy(read_slices(path, prep)[0]))
    with Image.open(written) as picture:
        back = np.asarray(picture)
    assert back.dtype == np.uint16 and picture.size == (12, 16)
    low, high = np.percentile(values, (0.5, 99.5))
    inside = (values > low) & (values < high)
    assert np.abs(back.astype(float) - values)[inside].max() <= 1


def test_a_file_read_back_is_what_was_written(tmp_path: Path):
    image = make_phantom(3, 0.5, (16, 16))
    write_nifti(tmp_path / "data" / "x.nii.gz", image)
    prep = Preprocessing(image_size=(16, 16))
    writer = FileOutputs(tmp_path / "out", str(tmp_path / "data"), tmp_path, prep)
    scaled = torch.from_numpy(read_slices(tmp_path / "data" / "x.nii.gz", prep)[0])
    written = writer.write_image("healed", str(tmp_path / "data" / "x.nii.gz"), scaled)
    assert torch.allclose(torch.from_numpy(read_slices(written, prep)[0]), scaled, atol=2e-3)


def test_detection_metrics_match_hand_counts():
    scores, labels = torch.tensor([0.9, 0.8, 0.8, 0.3, 0.1]), torch.tensor([1, 1, 0, 0, 1])
    assert metrics.roc_auc(scores, labels) == pytest.approx(3.5 / 6)  # the tie at 0.8 counts half
    assert metrics.average_precision(scores, labels) == pytest.approx(1 / 3 * (1 + 2 / 3 + 3 / 5))
    assert metrics.best_dice(scores, labels) == pytest.approx((0.75, 0.1))
    assert metrics.roc_auc(torch.tensor([3.0, 2, 1]), torch.tensor([1, 0, 0])) == 1.0
    assert metrics.average_precision(torch.tensor([3.0, 2, 1]), torch.tensor([0, 0, 1])) == pytest.approx(1 / 3)
