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


@pytest.mark.parametrize("levels", ["1", "2"])
def test_compiled_training_runs_as_one_graph(levels: str, hipmri_dir: Path, tmp_path: Path):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    result = train.main(train_args(tmp_path, hipmri_dir.parent, "--compile", "--max-steps", "2", "--levels", levels))
    assert checkpoints.load_checkpoint(result["last_checkpoint"])["training"]["step"] == 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the step really was compiled
    assert not torch._dynamo.utils.counters["graph_break"]  # a break would split the GPU step into several graphs
