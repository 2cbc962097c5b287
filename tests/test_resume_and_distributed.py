"""Resuming continues exactly; a killed run leaves loadable checkpoints; two gloo processes share one codebook."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

import train
import utils
from modules import VectorQuantizer
from test_end_to_end import ROOT, train_args


def weights(path: str) -> dict:
    return utils.load_checkpoint(path)["model"]


def assert_same_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_resume_mid_epoch_continues_exactly(hipmri_dir: Path, tmp_path: Path):
    straight = train.main(train_args(tmp_path / "a", hipmri_dir, "--epochs", "2"))
    stopped = train.main(train_args(tmp_path / "b", hipmri_dir, "--epochs", "2", "--max-steps", "4"))
    state = utils.load_checkpoint(stopped["last_checkpoint"])["training"]
    assert state["step"] == 4 and state["epoch"] == 2 and state["epoch_totals"]["batches"] == 1
    resumed = train.main(["--resume", stopped["last_checkpoint"], "--max-steps", "0"])
    assert resumed["last_checkpoint"] == stopped["last_checkpoint"]
    assert utils.load_checkpoint(resumed["last_checkpoint"])["training"]["step"] == 6
    assert_same_weights(weights(straight["last_checkpoint"]), weights(resumed["last_checkpoint"]))
    rows = utils.read_csv_rows(tmp_path / "b" / "res" / "tiny" / "metrics.csv")
    assert [int(row["step"]) for row in rows] == [3, 4, 6]  # epoch 1, the stop part-way through 2, its end


def test_sigkill_mid_run_leaves_a_checkpoint_that_resumes(hipmri_dir: Path, tmp_path: Path):
    args = train_args(tmp_path, hipmri_dir, "--epochs", "40", "--checkpoint-every", "1")
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "ck" / "tiny-last.pth"
    deadline = time.time() + 120
    while time.time() < deadline and not (last.exists() and utils.load_checkpoint(last)["training"]["step"] >= 5):
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = utils.load_checkpoint(last)["training"]["step"]
    assert killed_at >= 5
    result = train.main(["--resume", str(last), "--epochs", "3"])
    assert utils.load_checkpoint(result["last_checkpoint"])["training"]["step"] == max(9, killed_at)
    assert not list((tmp_path / "ck").glob(".*.tmp"))  # a half-written file from the kill is cleaned up


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def quantizer_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)  # same initial codebook on both ranks
    quantizer = VectorQuantizer(16, 4, quantizer="ema", dead_code_threshold=1.0).train()
    data = torch.Generator().manual_seed(100 + rank)  # different batches on each rank
    for _ in range(5):
        quantizer(torch.randn(2, 4, 4, 4, generator=data) + rank)
    gathered = [torch.zeros_like(quantizer.embedding) for _ in range(2)]
    torch.distributed.all_gather(gathered, quantizer.embedding.detach().contiguous())
    results[rank] = bool(torch.equal(gathered[0], gathered[1]))
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_hold_identical_codebooks():
    results = mp.Manager().dict()
    mp.spawn(quantizer_worker, args=(free_port(), results), nprocs=2)
    assert dict(results) == {0: True, 1: True}


def test_torchrun_with_gloo_trains_and_writes_one_checkpoint(hipmri_dir: Path, tmp_path: Path):
    options = train_args(tmp_path, hipmri_dir, "--device", "cpu", "--epochs", "15", "--time-limit", "0")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
               str(free_port()), str(ROOT / "train.py"), *options]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("best validation SSIM") == 1  # only rank 0 reports
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["tiny-last.pth", "tiny.pth"]
    # One step per epoch (12 slices / (4 x 2)); out of time from the start, and the ranks agree on it at step 10.
    assert utils.load_checkpoint(tmp_path / "ck" / "tiny-last.pth")["training"]["step"] == train.STOP_CHECK_EVERY
    assert "time limit of 0s reached" in result.stdout
