"""The GPU speed paths that can run on a CPU: bf16 autocast (with a float32 quantizer) and torch.compile."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import checkpoints
import train
import utils
from modules import VectorQuantizer
from test_end_to_end import train_args


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_bf16_only_on_gpus_with_native_bf16(monkeypatch, native_bf16: bool, expected: str):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16)
    assert utils.resolve_precision("auto", torch.device("cuda")) == expected  # A100/H100 vs T4/V100
    assert utils.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert utils.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(utils.UsageError, match="--precision fp16"):
        utils.resolve_precision("fp16", torch.device("cpu"))


def test_bf16_autocast_leaves_the_nearest_code_search_in_float32():
    """Two codes closer together than bfloat16 can tell apart (its spacing near 3 is 0.016): under autocast the
    quantizer must still pick the nearer one, which it can only do in float32."""
    quantizer = VectorQuantizer(2, 4, quantizer="gradient", dead_code_threshold=0).eval()
    base = torch.full((4,), 3.0)
    quantizer.embedding.data = torch.stack([base, base + 0.004])
    latents = (base + 0.003)[None, :, None, None]  # nearer the second code
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantized, indices, loss = quantizer(latents)
    assert indices.item() == 1
    assert quantized.dtype == loss.dtype == torch.float32


def test_bf16_training_learns(hipmri_dir: Path, tmp_path: Path):
    result = train.main(train_args(tmp_path, hipmri_dir.parent, "--precision", "bf16", "--epochs", "2"))
    assert checkpoints.load_checkpoint(result["checkpoint"])["args"]["precision"] == "bf16"
    rows = utils.read_csv_rows(Path(result["figures"]) / "metrics.csv")
    assert all(torch.isfinite(torch.tensor(float(row["val_loss"]))) for row in rows)
    assert float(rows[-1]["train_recon_loss"]) < float(rows[0]["train_recon_loss"])


def test_the_best_checkpoint_is_chosen_on_the_fp32_number_predict_reports(hipmri_dir: Path, tmp_path: Path):
    """Trained in bf16, validated in fp32: the SSIM and NLL that chose the checkpoints are the ones predict.py reads."""
    import predict
    import train_prior
    from test_prior import prior_args

    result = train.main(train_args(tmp_path, hipmri_dir.parent, "--precision", "bf16", "--epochs", "5", "--lr", "3e-3"))
    common = ["--split", "validate", "--cache-dir", str(tmp_path / "cache"), "--resources-dir", str(tmp_path / "res")]
    report = predict.main(["-m", result["checkpoint"], *common])
    assert float(result["best"]["val_ssim"]) == pytest.approx(report["ssim_mean"], abs=1e-6)
    prior = train_prior.main(prior_args(tmp_path, result["checkpoint"], "--precision", "bf16", "--max-steps", "2"))
    prior_report = predict.main(["-m", prior["checkpoint"], *common])
    assert prior["best"]["val_bits_per_code"] == pytest.approx(prior_report["nll_bits_per_code"], abs=1e-5)


def test_compiled_two_level_training_runs_as_one_graph(hipmri_dir: Path, tmp_path: Path):
    """(One level: tests/test_cuda.py, over two epochs without a recompile, on the CPU and on a GPU.)"""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    result = train.main(train_args(tmp_path, hipmri_dir.parent, "--compile", "--max-steps", "2", "--levels", "2"))
    assert checkpoints.load_checkpoint(result["last_checkpoint"])["training"]["step"] == 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the step really was compiled
    assert not torch._dynamo.utils.counters["graph_break"]  # a break would split the GPU step into several graphs


def test_a_cuda_build_that_finds_no_gpu_warns_instead_of_a_quiet_cpu_run(monkeypatch, capsys):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert utils.pick_device("auto") == torch.device("cpu")
    warning = capsys.readouterr().err
    assert warning.startswith("warning:") and "CUDA 12.4 but finds no usable GPU" in warning
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build: nothing to warn about
    assert utils.pick_device("auto") == torch.device("cpu") and capsys.readouterr().err == ""


def test_the_start_of_a_run_says_what_runs_where(hipmri_dir: Path, tmp_path: Path, capsys):
    train.main(train_args(tmp_path, hipmri_dir, "--max-steps", "1", "--device", "cpu"))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("torch "))
    assert f"torch {torch.__version__}" in line and "device cpu, fp32, 1 process" in line
