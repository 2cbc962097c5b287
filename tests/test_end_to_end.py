"""Train one short epoch on generated HipMRI- and OASIS-layout folders, then predict on the checkpoint."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoints
import predict
import train
import utils

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ["--hidden-channels", "16", "--residual-channels", "8", "--residual-layers", "1",
              "--num-embeddings", "32", "--embedding-dim", "8", "--batch-size", "4", "--warmup-steps", "1"]


def train_args(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--epochs", "1", "--run-name", "tiny", "--checkpoint-dir", str(tmp_path / "ck"),
            "--resources-dir", str(tmp_path / "res"), "--cache-dir", str(tmp_path / "cache"), *TINY_MODEL, *extra]


@pytest.mark.parametrize("layout", ["hipmri_dir", "oasis_dir"])
def test_train_then_predict(layout: str, request, tmp_path: Path):
    data = request.getfixturevalue(layout)
    result = train.main(train_args(tmp_path, data.parent))
    checkpoint = Path(result["checkpoint"])
    assert checkpoint.exists()
    saved = checkpoints.load_checkpoint(checkpoint, expected_kind="vqvae")
    assert {"model", "optimizer", "config", "preprocessing", "epoch", "metrics", "best_val_ssim"} <= set(saved)
    figures = tmp_path / "res" / "tiny"
    assert (figures / "reconstructions_epoch_001.png").exists() and (figures / "curves.png").exists()
    assert (figures / "reconstructions.gif").exists()
    rows = utils.read_csv_rows(figures / "metrics.csv")
    assert len(rows) == 1 and 0 < float(rows[0]["val_codebook_usage"]) <= 1 and 0 < float(rows[0]["val_mae"]) < 1

    metrics_path = tmp_path / "metrics.json"
    metrics = predict.main(["-m", str(checkpoint), "--metrics-json", str(metrics_path), "--cache-dir",
                            str(tmp_path / "cache"), "--resources-dir", str(tmp_path / "res")])
    written = json.loads(metrics_path.read_text())
    assert written["num_images"] == 4 and written["split"] == "test"
    assert {"ssim_mean", "ssim_min", "ssim_max", "psnr_mean", "mae_mean", "codebook_usage"} <= set(written)
    assert written["ssim_min"] <= written["ssim_mean"] <= written["ssim_max"] <= 1
    assert metrics == written
    for name in ("test_reconstructions.png", "test_ssim_histogram.png", "test_code_usage.png"):
        assert (tmp_path / "res" / "tiny" / name).exists()


def test_predict_evaluates_a_test_split_beside_a_train_split_too_small_to_carve(hipmri_dir: Path, tmp_path: Path):
    from conftest import write_nifti
    from demo import make_phantom

    result = train.main(train_args(tmp_path, hipmri_dir, "--max-steps", "1"))
    other = tmp_path / "other"
    write_nifti(other / "train" / "case_000.nii.gz", make_phantom(0, 0.5, (32, 16)))
    for index in range(3):
        write_nifti(other / "test" / f"case_{index + 1:03d}.nii.gz", make_phantom(index, 0.5, (32, 16)))
    report = predict.main(["-m", result["checkpoint"], "--data", str(other), "--cache-dir", str(tmp_path / "cache"),
                           "--resources-dir", str(tmp_path / "res")])
    assert report["split"] == "test" and report["num_images"] == 3


def test_native_hipmri_shape_256x128_trains(tmp_path: Path):
    from conftest import make_hipmri

    data = make_hipmri(tmp_path, counts=(4, 2, 0), shape=(256, 128))
    result = train.main(train_args(tmp_path, data, "--time-limit", "0"))
    saved = checkpoints.load_checkpoint(result["checkpoint"])
    assert tuple(saved["preprocessing"]["image_size"]) == (256, 128)


def test_time_limit_stops_after_the_crossing_step_and_keeps_the_checkpoint(hipmri_dir: Path, tmp_path: Path):
    result = train.main(train_args(tmp_path, hipmri_dir, "--epochs", "50", "--time-limit", "0"))
    assert result["best"]["epoch"] == 1 and Path(result["checkpoint"]).exists()


def test_same_seed_gives_the_same_model(hipmri_dir: Path, tmp_path: Path):
    first = train.main(train_args(tmp_path / "a", hipmri_dir))
    second = train.main(train_args(tmp_path / "b", hipmri_dir))
    weights = [checkpoints.load_checkpoint(r["checkpoint"])["model"] for r in (first, second)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "400"})  # help text unwrapped


def test_bad_input_gives_one_line_and_a_nonzero_exit(tmp_path: Path):
    missing = run_script("train.py", "--data", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: data folder not found"]
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 100)
    junk = run_script("predict.py", "-m", str(tmp_path / "junk.pth"), cwd=tmp_path)
    assert junk.returncode == 2 and "Traceback" not in junk.stderr
    assert junk.stderr.strip().startswith(f"error: {tmp_path / 'junk.pth'}: cannot load checkpoint")


def test_image_size_that_the_network_cannot_take_is_refused(hipmri_dir: Path, tmp_path: Path):
    with pytest.raises(utils.UsageError, match="multiple of 4"):
        train.main(train_args(tmp_path, hipmri_dir, "--image-size", "30", "16"))


def test_checkpoint_for_other_settings_is_refused(hipmri_dir: Path, tmp_path: Path):
    result = train.main(train_args(tmp_path, hipmri_dir, "--time-limit", "0"))
    checkpoint = checkpoints.load_checkpoint(result["checkpoint"])
    checkpoint["config"]["hidden_channels"] = 64
    checkpoints.save_checkpoint(tmp_path / "other.pth", checkpoint)
    with pytest.raises(utils.UsageError, match="does not match"):
        predict.main(["-m", str(tmp_path / "other.pth")])


def test_help_documents_every_option():
    result = run_script("train.py", "--help", cwd=ROOT)
    assert result.returncode == 0
    for option in ("--data", "--image-size", "--quantizer", "--time-limit", "--seed", "--batch-size", "--lr"):
        assert option in result.stdout


@pytest.mark.parametrize("script", ["train.py", "train_prior.py", "predict.py", "extract_features.py", "anomaly.py",
                                    "finetune.py"])
def test_every_option_is_documented_and_the_options_page_is_current(script: str):
    sys.path.insert(0, str(ROOT / "docs"))
    import options

    page = (ROOT / "docs" / "OPTIONS.md").read_text()
    assert page == options.document(), "docs/OPTIONS.md is out of date: run python docs/options.py"
    result = run_script(script, "--help", cwd=ROOT)
    listed = set(re.findall(r"^\s+(--[a-z][a-z0-9-]*)", result.stdout, flags=re.MULTILINE))
    assert listed and all(f"`{option}`" in page for option in listed - {"--help"})


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_kmeans_initialisation_runs_in_training(hipmri_dir: Path, tmp_path: Path):
    result = train.main(train_args(tmp_path, hipmri_dir, "--kmeans-init"))
    assert float(result["best"]["val_codebook_usage"]) > 0


def local_imports(path: Path) -> set[str]:
    """The repository's own top-level modules a file imports."""
    import ast

    tree = ast.parse(path.read_text())
    names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return {name for name in names if (ROOT / f"{name}.py").exists()}


JOBS = {"train", "train_prior", "predict", "extract_features", "anomaly", "finetune"}


def test_jobs_and_benchmarks_import_only_the_library_and_the_library_has_no_circles():
    """Jobs and benchmarks import library files, never a job; library files never import a job, nor each other in a
    circle (every import points down)."""
    for path in [*(ROOT / f"{job}.py" for job in JOBS), *(ROOT / "benchmarks").glob("*.py")]:
        assert not local_imports(path) & JOBS, f"{path.name} imports {sorted(local_imports(path) & JOBS)}"
    library = {path.stem: local_imports(path) for path in ROOT.glob("*.py") if path.stem not in JOBS}
    assert {"dataset", "modules", "utils"} <= set(library)
    assert not any(imports & JOBS for imports in library.values())
    below: dict[str, set[str]] = {}

    def reachable(name: str, trail: tuple[str, ...] = ()) -> set[str]:
        assert name not in trail, f"import circle: {' -> '.join((*trail, name))}"
        if name not in below:
            below[name] = set().union(*(reachable(child, (*trail, name)) | {child} for child in library[name]))
        return below[name]

    for name in library:
        reachable(name)


def test_the_demo_trains_at_its_own_size_unless_a_flag_says_otherwise():
    import training

    messages: list[str] = []
    argv = ["--hidden-channels", "32"]
    args = train.build_parser().parse_args(argv)
    training.demo_sized(args, argv, train.build_parser(), train.DEMO_SIZE, messages.append)
    assert args.hidden_channels == 32 and args.residual_channels == train.DEMO_SIZE["residual_channels"]
    assert args.epochs == train.DEMO_SIZE["epochs"]
    assert "--residual-channels" in messages[0] and "--hidden-channels" not in messages[0]
