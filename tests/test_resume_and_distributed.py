"""Resuming continues exactly, also on another machine; a killed run leaves loadable checkpoints; processes under
torchrun share one codebook, one data cache and one checkpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import checkpoints
import metrics
import train
import train_prior
import training
import utils
from conftest import make_classes, make_hipmri
from modules import VQVAE, VectorQuantizer, VQVAEConfig
from test_end_to_end import ROOT, TINY_MODEL, train_args
from test_prior import prior_args

CPU = ("--device", "cpu")  # exact comparisons: on CUDA, index_add_ and cuDNN autotuning are not deterministic


def weights(path: str) -> dict:
    return checkpoints.load_checkpoint(path)["model"]


def assert_same_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


def test_resume_mid_epoch_continues_exactly(hipmri_dir: Path, tmp_path: Path):
    straight = train.main(train_args(tmp_path / "a", hipmri_dir, "--epochs", "2", *CPU))
    stopped = train.main(train_args(tmp_path / "b", hipmri_dir, "--epochs", "2", "--max-steps", "4", *CPU))
    state = checkpoints.load_checkpoint(stopped["last_checkpoint"])["training"]
    assert state["step"] == 4 and state["epoch"] == 2 and state["epoch_totals"]["items"] == 4
    resumed = train.main(["--resume", stopped["last_checkpoint"], "--max-steps", "0", *CPU])
    assert resumed["last_checkpoint"] == stopped["last_checkpoint"]
    assert checkpoints.load_checkpoint(resumed["last_checkpoint"])["training"]["step"] == 6
    assert_same_weights(weights(straight["last_checkpoint"]), weights(resumed["last_checkpoint"]))
    rows = utils.read_csv_rows(tmp_path / "b" / "res" / "tiny" / "metrics.csv")
    assert [int(row["step"]) for row in rows] == [3, 4, 6]  # epoch 1, the stop part-way through 2, its end
    straight_rows = utils.read_csv_rows(tmp_path / "a" / "res" / "tiny" / "metrics.csv")
    for key in ("train_recon_loss", "train_perplexity", "train_codebook_usage", "val_ssim"):
        assert float(rows[-1][key]) == pytest.approx(float(straight_rows[-1][key]), rel=1e-5), key


def test_sigkill_mid_run_leaves_a_checkpoint_that_resumes(hipmri_dir: Path, tmp_path: Path):
    args = train_args(tmp_path, hipmri_dir, "--epochs", "40", "--checkpoint-every", "1")
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "ck" / "tiny-last.pth"
    deadline = time.time() + 120
    while time.time() < deadline and not (last.exists() and checkpoints.load_checkpoint(last)["training"]["step"] >= 5):
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = checkpoints.load_checkpoint(last)["training"]["step"]
    assert killed_at >= 5
    result = train.main(["--resume", str(last), "--epochs", "3"])
    assert checkpoints.load_checkpoint(result["last_checkpoint"])["training"]["step"] == max(9, killed_at)
    assert not list((tmp_path / "ck").glob(".*.tmp"))  # a half-written file from the kill is cleaned up


def test_killed_after_the_last_step_of_an_epoch_the_resumed_run_still_evaluates_it(hipmri_dir: Path,
                                                                                    tmp_path: Path, monkeypatch):
    class Killed(Exception):
        pass

    def killed(*_args, **_kwargs):
        raise Killed  # the job dies between the epoch's last step (saved midway) and its evaluation

    with monkeypatch.context() as patch:
        patch.setattr(metrics, "evaluate_vqvae", killed)
        with pytest.raises(Killed):
            train.main(train_args(tmp_path, hipmri_dir, "--epochs", "2", "--checkpoint-every", "3", *CPU))
    last = tmp_path / "ck" / "tiny-last.pth"
    assert checkpoints.load_checkpoint(last)["training"]["step"] == 3  # one epoch of three steps, not yet evaluated
    train.main(["--resume", str(last), *CPU])
    rows = utils.read_csv_rows(tmp_path / "res" / "tiny" / "metrics.csv")
    assert [(int(row["epoch"]), int(row["step"])) for row in rows] == [(1, 3), (2, 6)]


def test_old_mid_epoch_positions_count_the_batches_of_one_process():
    old = {"losses": torch.zeros(2), "code_counts": torch.zeros(4), "batches": 2}  # no "items": an older checkpoint
    assert train.EpochTotals.from_dict(old, torch.device("cpu"), keep_sums=True, batch_size=16).items == 32


def test_a_gpu_run_resumes_on_a_machine_without_gpus(hipmri_dir: Path, tmp_path: Path):
    """A checkpoint of a run on cuda:1 of a two-GPU machine (one generator state per GPU, as older versions kept)
    goes on here on the CPU, where no GPU is visible."""
    stopped = train.main(train_args(tmp_path, hipmri_dir, "--epochs", "2", "--max-steps", "2", *CPU))
    checkpoint = checkpoints.load_checkpoint(stopped["last_checkpoint"])
    checkpoint["training"]["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 2
    checkpoint["args"]["device"] = "cuda:1"
    gpu_run = tmp_path / "ck" / "gpu-last.pth"
    checkpoints.save_checkpoint(gpu_run, checkpoint)
    resumed = train.main(["--resume", str(gpu_run), "--device", "cpu", "--max-steps", "0"])
    assert checkpoints.load_checkpoint(resumed["last_checkpoint"])["training"]["step"] == 6
    assert Path(resumed["last_checkpoint"]).parent == gpu_run.parent  # the run goes on beside its checkpoint
    state = utils.rng_state(torch.device("cpu"))
    assert "cuda" not in state  # a CPU run keeps no GPU generator, so it resumes on a GPU machine too
    utils.set_rng_state({**state, "cuda": torch.zeros(16, dtype=torch.uint8)}, torch.device("cpu"))


def test_jobs_run_from_another_directory_find_the_data(tmp_path: Path, monkeypatch):
    """Relative paths given at training time are recorded absolute: predict, features and resume work from
    anywhere."""
    first, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    make_hipmri(first)
    elsewhere.mkdir()
    monkeypatch.chdir(first)
    relative = ["--data", "keras_slices_data", "--epochs", "2", "--max-steps", "3", "--run-name", "tiny",
                "--checkpoint-dir", "ck", "--resources-dir", "res", "--cache-dir", "cache", *TINY_MODEL]
    result = train.main(relative)
    monkeypatch.chdir(elsewhere)
    import extract_features
    import predict

    metrics = predict.main(["-m", result["checkpoint"], "--cache-dir", "cache2", "--resources-dir", "res2"])
    assert metrics["num_images"] == 4
    extract_features.main(["-m", result["checkpoint"], "--out", "features.npz", "--cache-dir", "cache2"])
    resumed = train.main(["--resume", result["last_checkpoint"], "--max-steps", "0"])
    assert Path(resumed["last_checkpoint"]) == first / "ck" / "tiny-last.pth"
    assert checkpoints.load_checkpoint(resumed["last_checkpoint"])["training"]["step"] == 6
    assert (first / "res" / "tiny" / "curves.png").exists() and not (elsewhere / "ck").exists()


# ----------------------------------------------------------------------------- several processes

def spawn(worker, tmp_path: Path, *args) -> dict:
    """Run worker(rank, store_file, results, *args) in two gloo processes; they meet through a file, not a port."""
    results = mp.Manager().dict()
    mp.spawn(worker, args=(str(tmp_path / "store"), results, *args), nprocs=2)
    return dict(results)


def join_gloo(rank: int, store_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)


def same_on_both(tensor: torch.Tensor) -> bool:
    gathered = [torch.zeros_like(tensor) for _ in range(2)]
    torch.distributed.all_gather(gathered, tensor.detach().contiguous())
    return bool(torch.equal(gathered[0], gathered[1]))


def quantizer_worker(rank: int, store_file: str, results) -> None:
    join_gloo(rank, store_file)
    torch.manual_seed(0)  # same initial codebook on both ranks
    quantizer = VectorQuantizer(16, 4, quantizer="ema", dead_code_threshold=1.0).train()
    data = torch.Generator().manual_seed(100 + rank)  # different batches on each rank
    for _ in range(5):
        quantizer(torch.randn(2, 4, 4, 4, generator=data) + rank)
    results[rank] = all(same_on_both(t) for t in (quantizer.embedding, quantizer.cluster_size,
                                                  quantizer.embedding_sum, quantizer.restart_candidates))
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_hold_identical_codebooks(tmp_path: Path):
    assert spawn(quantizer_worker, tmp_path) == {0: True, 1: True}


TINY_DDP = {"hidden_channels": 16, "residual_channels": 8, "num_residual_layers": 1, "num_embeddings": 16,
            "embedding_dim": 4}


def ddp_worker(rank: int, store_file: str, results, settings: dict) -> None:
    join_gloo(rank, store_file)
    torch.manual_seed(rank)  # different weights on each rank, as after a k-means start on each rank's own batches
    model = VQVAE(VQVAEConfig(**TINY_DDP, **settings))
    model.quantizer.initialise(torch.randn(64, 4) + 3 * rank, kmeans_iterations=3)
    model.quantizer.cluster_size.add_(rank)  # and buffers that differ
    step_model = utils.wrap_distributed(model, torch.device("cpu"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.Generator().manual_seed(10 + rank)
    for _ in range(4):
        reconstruction, _, vq_loss = step_model(torch.rand(2, 1, 16, 16, generator=images))
        optimizer.zero_grad()
        (reconstruction.pow(2).mean() + vq_loss).backward()
        optimizer.step()
    results[rank] = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()]
                     if not same_on_both(tensor)]
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("settings", [{}, {"architecture": "vit", "vit_width": 16, "vit_depth": 1, "vit_heads": 2}])
def test_ddp_keeps_one_model_and_codebook_buffers_included(settings: dict, tmp_path: Path):
    assert spawn(ddp_worker, tmp_path, settings) == {0: [], 1: []}


def compiled_ddp_worker(rank: int, store_file: str, results) -> None:
    """torch.compile over DDP: the quantizer's all-reduce and rank checks run inside the compiled forward."""
    join_gloo(rank, store_file)
    torch.manual_seed(rank)
    model = VQVAE(VQVAEConfig(**TINY_DDP))
    model.quantizer.initialise(torch.randn(64, 4) + 3 * rank, kmeans_iterations=3)
    step_model = torch.compile(utils.wrap_distributed(model, torch.device("cpu")))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.Generator().manual_seed(10 + rank)  # each rank its own batches: only the all-reduce aligns them
    before = model.quantizer.embedding.detach().clone()
    for _ in range(3):
        reconstruction, _, vq_loss = step_model(torch.rand(2, 1, 16, 16, generator=images))
        optimizer.zero_grad()
        (reconstruction.pow(2).mean() + vq_loss).backward()
        optimizer.step()
    results[rank] = ([name for name, tensor in [*model.named_parameters(), *model.named_buffers()]
                      if not same_on_both(tensor)], not torch.equal(before, model.quantizer.embedding))
    torch.distributed.destroy_process_group()


def test_compiled_ddp_keeps_identical_weights_and_codebooks(tmp_path: Path):
    assert spawn(compiled_ddp_worker, tmp_path) == {0: ([], True), 1: ([], True)}


def totals_worker(rank: int, store_file: str, results) -> None:
    join_gloo(rank, store_file)
    totals = train.EpochTotals(torch.tensor([1.0 + rank, 0.5]), torch.tensor([[rank, 2.0, 0.0]]), batches=3, items=12)
    saved = totals.synced().to_dict()  # what the first process writes into a mid-epoch checkpoint
    restored = train.EpochTotals.from_dict(saved, torch.device("cpu"), keep_sums=rank == 0, batch_size=4)
    again = restored.synced()
    same_metrics = again.metrics(("codes",)) == totals.synced().metrics(("codes",))
    results[rank] = (saved["batches"], saved["code_counts"].tolist(), same_metrics,
                     restored.items)
    torch.distributed.destroy_process_group()


def test_mid_epoch_totals_are_saved_summed_over_processes_and_restored_once(tmp_path: Path):
    results = spawn(totals_worker, tmp_path)
    assert results[0] == results[1] == (6, [[1.0, 4.0, 0.0]], True, 12)


def torchrun(script: str, options: list[str], cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    """torchrun --standalone picks its own free port: no race for one between tests."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(ROOT / script), *options]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_torchrun_with_gloo_trains_and_writes_one_checkpoint(tmp_path: Path):
    data = make_hipmri(tmp_path, counts=(12, 1, 0))  # one validation slice for two processes: one evaluates none
    options = train_args(tmp_path, data, *CPU, "--epochs", "15", "--time-limit", "0", "--checkpoint-every", "1",
                         "--levels", "2")  # two codebooks, each with its own all-reduce per step
    result = torchrun("train.py", options, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("best validation SSIM") == 1  # only rank 0 reports
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["tiny-last.pth", "tiny.pth"]
    # One step per epoch (12 slices / (4 x 2)); out of time from the start, and the ranks agree on it at step 10.
    state = checkpoints.load_checkpoint(tmp_path / "ck" / "tiny-last.pth")["training"]
    assert state["step"] == training.STOP_CHECK_EVERY and state["world_size"] == 2
    assert "time limit of 0s reached" in result.stdout


def test_a_global_batch_is_split_over_the_processes_and_the_log_says_the_steps_made(tmp_path: Path, monkeypatch):
    data = make_hipmri(tmp_path, counts=(16, 2, 0))
    options = train_args(tmp_path, data, *CPU, "--epochs", "2", "--global-batch-size", "8")
    result = torchrun("train.py", options, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch 8 (2 processes x 4), 2 steps per epoch, 4 in 2 epochs" in result.stdout
    saved = checkpoints.load_checkpoint(tmp_path / "ck" / "tiny-last.pth")
    assert saved["training"]["step"] == 4 and saved["args"]["batch_size"] == 4
    one = train.main(train_args(tmp_path / "one", data, *CPU, "--epochs", "2", "--global-batch-size", "8"))
    assert checkpoints.load_checkpoint(one["last_checkpoint"])["training"]["step"] == 4  # one process, batch 8
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(utils.UsageError, match="--global-batch-size 8 does not split evenly over 3 processes"):
        train.main(options)


def test_torchrun_trains_one_prior(tmp_path: Path):
    data = make_classes(tmp_path / "data", classes=("alpha", "beta"), per_class=6)
    vqvae = train.main(train_args(tmp_path, data, "--run-name", "vq", "--max-steps", "2"))["checkpoint"]
    result = torchrun("train_prior.py", prior_args(tmp_path, vqvae, *CPU, "--epochs", "2"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("best validation bits per code") == 1
    assert "device cpu, fp32, 2 processes" in result.stdout
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["pr-last.pth", "pr.pth", "vq-last.pth", "vq.pth"]
    assert checkpoints.load_checkpoint(tmp_path / "ck" / "pr.pth", expected_kind="prior")["epoch"] >= 1


@pytest.mark.parametrize("job", ["train", "train_prior"])
def test_caches_are_built_before_the_process_group_starts(job: str, tmp_path: Path, monkeypatch):
    """Under torchrun no process may wait in a collective while another decodes: NCCL gives up after 10 minutes."""
    data = make_classes(tmp_path / "data", per_class=6)
    vqvae = train.main(train_args(tmp_path, data, "--run-name", "vq", "--max-steps", "1"))["checkpoint"]
    cache = tmp_path / "fresh-cache"
    seen: list[list[str]] = []

    def init_distributed(device):
        seen.append(sorted(path.name.split("-")[0] for path in cache.glob("*.np[yz]")))

    monkeypatch.setattr(utils, "init_distributed", init_distributed)
    if job == "train":
        train.main(train_args(tmp_path, data, "--max-steps", "1", "--cache-dir", str(cache)))
        assert seen == [["train", "validate"]]
    else:
        train_prior.main(prior_args(tmp_path, vqvae, "--max-steps", "1", "--cache-dir", str(cache)))
        assert seen == [["codes", "codes", "train", "validate"]]


@pytest.mark.parametrize("job", ["train", "train_prior"])
def test_fewer_training_slices_than_processes_is_a_clear_error(job: str, tmp_path: Path, monkeypatch):
    data = make_hipmri(tmp_path, counts=(2, 1, 0))
    vqvae = train.main(train_args(tmp_path, data, "--run-name", "vq", "--max-steps", "1"))["checkpoint"]
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun --nproc_per_node=4 sets it; no process group is joined
    with pytest.raises(utils.UsageError, match="the training split has 2 slices, fewer than the 4 processes"):
        if job == "train":
            train.main(train_args(tmp_path, data, *CPU))
        else:
            train_prior.main(prior_args(tmp_path, vqvae, *CPU))
