"""The benchmark scripts that measure what the README reports run end to end on tiny data."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_classes, phantom_uint8
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
