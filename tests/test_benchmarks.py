"""The benchmark scripts that measure what the README reports run end to end on tiny data."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_classes, phantom_uint8, write_png
from test_end_to_end import ROOT, train_args
from test_prior import prior_args

import train
import train_prior

sys.path.insert(0, str(ROOT / "benchmarks"))
import rate_distortion  # noqa: E402


def test_jpeg_rate_counts_only_the_entropy_coded_scan():
    from PIL import Image

    image = phantom_uint8(3, (64, 64))
    sizes = []
    for quality in (10, 50, 90):
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="JPEG", quality=quality)
        total = len(buffer.getvalue())
        scan = rate_distortion.scan_bytes(buffer.getvalue())
        assert 0 < scan < total - 150  # the header (tables, markers) is a few hundred bytes and is left out
        sizes.append(scan)
    assert sizes == sorted(sizes)  # higher quality, more data
    decoded, scan = rate_distortion.jpeg_round_trip(image, 90)
    assert decoded.shape == image.shape and np.abs(decoded.astype(int) - image).mean() < 3


@pytest.mark.parametrize("with_prior", [False, True])
def test_rate_distortion_compares_models_with_jpeg(with_prior: bool, tmp_path: Path):
    data = make_classes(tmp_path / "data", classes=("alpha", "beta"), per_class=6)
    vqvae = train.main(train_args(tmp_path, data, "--run-name", "vq", "--max-steps", "2"))["checkpoint"]
    command = [sys.executable, str(ROOT / "benchmarks" / "rate_distortion.py"), "-m", vqvae, "--out",
               str(tmp_path / "rd.png"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    if with_prior:
        prior = train_prior.main(prior_args(tmp_path, vqvae, "--max-steps", "2"))["checkpoint"]
        command += ["--prior", prior]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("model=")]
    assert len(lines) == (2 if with_prior else 1) and (tmp_path / "rd.png").exists()
    bpp = float(lines[0].split("bpp=")[1].split()[0])
    assert bpp == pytest.approx(np.log2(32) / 16)  # K=32 codes, one per 4x4 pixels


def test_the_gpu_check_runs_every_step_shrunk_on_the_cpu(tmp_path: Path):
    """benchmarks/gpu_check.py --smoke: the script a GPU machine's few minutes go to cannot rot unseen."""
    import json

    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    steps = ("cuda_tests", "speed", "train", "sampling", "torchrun", "architectures")
    assert set(steps) <= set(report) and all(report[step]["ok"] for step in steps)
    assert report["cuda_tests"]["passed"] >= 3 and set(report["sampling"]["seconds"]) == {"pixelcnn", "transformer",
                                                                                          "masked"}
    assert report["torchrun"]["steps_after_resume_on_cpu"] == 5 and 0 <= report["train"]["val_ssim"] <= 1
    vit, conv = report["architectures"]["vit"], report["architectures"]["conv"]
    assert vit["images_per_s"] > 0 and vit["parameters"] != conv["parameters"]
    assert result.stdout.strip().splitlines()[-1].startswith("steps=6 failed=none")


def test_a_download_is_laid_out_as_the_manifest_says_and_what_is_missing_is_named(tmp_path: Path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import brain_mri

    laid_out = tmp_path / "ours"
    for split, label, index in (("train", "glioma", 0), ("train", "notumor", 1), ("validate", "glioma", 2)):
        write_png(laid_out / split / label / f"Tr-{label[:2]}_{index:04d}.jpg", phantom_uint8(index))
    manifest = tmp_path / "manifest.csv"
    assert brain_mri.write_manifest(laid_out, manifest) == 3
    rows = brain_mri.read_manifest(manifest)
    download = tmp_path / "download" / "Training"
    for row in rows[:2]:  # one file is not in this download; the others under the collection's own folders
        source = laid_out / row["split"] / row["class"] / row["name"]
        (download / row["class"]).mkdir(parents=True, exist_ok=True)
        (download / row["class"] / f"copy-{row['name']}").write_bytes(source.read_bytes())
    found, missing = brain_mri.lay_out(tmp_path / "download", tmp_path / "out", rows)
    assert found == 2 and [row["name"] for row in missing] == [rows[2]["name"]]
    for row in rows[:2]:
        copied = tmp_path / "out" / row["split"] / row["class"] / row["name"]
        assert copied.read_bytes() == (laid_out / row["split"] / row["class"] / row["name"]).read_bytes()
    assert len(brain_mri.read_manifest()) == 5501  # the shipped manifest: 4,953 train and 548 validate


def test_the_generation_benchmark_scores_each_prior_and_rescores_kept_ones(tmp_path: Path):
    import json
    import math

    data = make_classes(tmp_path / "data", per_class=12)
    vqvae = train.main(train_args(tmp_path, data, "--run-name", "vq", "--epochs", "3", "--lr", "3e-3"))["checkpoint"]
    out = tmp_path / "generation"
    command = [sys.executable, str(ROOT / "benchmarks" / "generation.py"), "--data", str(data), "--vqvae", vqvae,
               "--priors", "transformer", "pixelcnn-64x8", "--budget", "2", "--count", "6", "--batch", "4",
               "--judge-epochs", "1", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    rows = json.loads((out / "generation.json").read_text())
    for name in ("transformer", "pixelcnn-64x8"):
        assert rows[name]["images"] == 6 and 0 <= rows[name]["agreement"] <= 1 and math.isfinite(rows[name]["fid"])
        assert rows[name]["steps"] > 0 and (out / f"prior-{name}.pth").exists()
    assert (out / "judge.pth").exists() and (out / "transformer_samples_with_nearest.png").exists()
    second = subprocess.run([*command, "--reuse", "--guidance", "2"], capture_output=True, text=True, timeout=600,
                            check=False)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    again = json.loads((out / "generation.json").read_text())
    assert again["transformer"]["steps"] == rows["transformer"]["steps"]  # scored again, not trained again
    assert again["settings"]["guidance"] == 2 and again["transformer"]["images"] == 6


def test_the_anomaly_benchmark_scores_every_method_kind_and_class(tmp_path: Path):
    import json

    data = tmp_path / "data"
    for split, count in (("train", 8), ("validate", 4)):
        for label, offset in (("normal", 0), ("tumour", 50)):
            for index in range(count):
                write_png(data / split / label / f"{index}.png", phantom_uint8(offset + index + 10 * len(split)))
    vqvae = train.main(train_args(tmp_path, data, "--run-name", "vq", "--max-steps", "2"))["checkpoint"]
    prior = train_prior.main(prior_args(tmp_path, vqvae, "--max-steps", "2", "--classes", "normal"))["checkpoint"]
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "anomaly.py"), "--data", str(data),
                             "--normal-class", "normal", "--vqvae", vqvae, "--prior", prior, "--shares", "0.1",
                             "--orderings", "1", "--timed", "6", "--out", str(out), "--cache-dir",
                             str(tmp_path / "cache"), "--device", "cpu"], capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((out / "anomaly.json").read_text())
    assert set(report["synthetic"]["prior map (anomaly.py)"]) == {"all", "bright", "dark", "noise"}
    assert 0 <= report["synthetic"]["residual |x - reconstruction|"]["all"]["pixel_auprc"] <= 1
    assert [row.get("orderings") for row in report["sweep"]] == [None, 1] and set(report["real"]) == {"tumour"}
    assert 0 < report["settings"]["threshold"] < 1 and report["sweep"][0]["redraw_share"] == 0.1
    assert report["timing"]["slices"] == 6 and (out / "synthetic_examples.png").exists()
