"""The CUDA paths: bf16 with channels-last, torch.compile across epochs, pinned staging, no host syncs in a
training step, sampling with a CUDA generator, and resume between the GPU and the CPU. Skipped without a GPU."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

import checkpoints
import train
import utils
from dataset import BatchLoader, find_data, load_split
from modules import VQVAE, VQVAEConfig
from pixelcnn import GatedPixelCNN, PixelCNNConfig
from readers import Preprocessing
from test_end_to_end import train_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def cuda_setup(data: Path, tmp_path: Path, on_device: bool | None = None):
    """A tiny model, its optimizer and a training loader on the GPU, with the codebook seeded."""
    slices = load_split(find_data(data), "train", Preprocessing(image_size=(32, 16)), tmp_path / "cache",
                        min_side=4, log=lambda _: None)
    loader = BatchLoader(slices.images, slices.labels, 4, shuffle=True, device=CUDA, drop_last=True,
                         on_device=on_device)
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(hidden_channels=16, residual_channels=8, num_residual_layers=1, num_embeddings=32,
                              embedding_dim=8)).to(CUDA, memory_format=torch.channels_last)
    train.initialise_codebook(model, loader, kmeans=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    args = argparse.Namespace(time_limit=None, max_steps=0, warmup_steps=1, lr=1e-3, lr_schedule="constant",
                              ssim_weight=0.2, checkpoint_every=0)
    clock = utils.TrainingClock(args, total_steps=100, device=CUDA)
    return model, optimizer, loader, clock, args


def run_epoch(setup, epoch: int) -> train.EpochTotals:
    model, optimizer, loader, clock, args = setup
    totals = train.EpochTotals.zeros(model.config.num_embeddings, CUDA)
    return train.train(epoch, loader, model, optimizer, clock, args, totals, utils.resolve_precision("auto", CUDA))


@pytest.mark.skipif(not torch.cuda.is_available() or not torch.cuda.is_bf16_supported(including_emulation=False),
                    reason="needs a GPU with native bfloat16")
def test_bf16_channels_last_step_keeps_a_float32_codebook(hipmri_dir: Path, tmp_path: Path):
    setup = cuda_setup(hipmri_dir, tmp_path)
    model = setup[0]
    before = model.quantizer.embedding.detach().clone()
    totals = run_epoch(setup, 1)
    assert totals.batches == 3 and torch.isfinite(totals.losses).all()
    quantizer = model.quantizer
    for tensor in (quantizer.embedding, quantizer.cluster_size, quantizer.embedding_sum, quantizer.restart_candidates):
        assert tensor.dtype == torch.float32
    assert not torch.equal(before, quantizer.embedding.detach())  # the EMA moved it
    assert model.encoder.layers[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), utils.autocast(CUDA, "bf16"):
        latents = model.encode(torch.rand(2, 1, 32, 16, device=CUDA))
        quantized, _, _ = model.quantize(latents)
    assert latents.dtype == torch.bfloat16 and quantized.dtype == torch.float32
    assert quantized.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("on_device", [True, False], ids=["data-on-gpu", "pinned-staging"])
def test_training_steps_never_wait_for_the_gpu(on_device: bool, hipmri_dir: Path, tmp_path: Path):
    setup = cuda_setup(hipmri_dir, tmp_path, on_device=on_device)
    run_epoch(setup, 1)  # warm-up: cuDNN autotuning and the allocator may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        totals = run_epoch(setup, 2)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert totals.batches == 3


def test_pinned_staging_path_trains(hipmri_dir: Path, tmp_path: Path):
    setup = cuda_setup(hipmri_dir, tmp_path, on_device=False)
    loader = setup[2]
    assert loader.data.device.type == "cpu"  # the data set stays in host memory
    images, labels = next(iter(loader))
    assert images.device.type == "cuda" and labels.device.type == "cuda"
    expected = loader.data[loader._shard(0)[:4]].float().div(255).to(CUDA)
    torch.testing.assert_close(images, expected)
    assert run_epoch(setup, 1).batches == 3


def test_compile_over_two_epochs_with_evaluation_between_never_recompiles(hipmri_dir: Path, tmp_path: Path,
                                                                          monkeypatch):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    result = train.main(train_args(tmp_path, hipmri_dir.parent, "--compile", "--epochs", "2", "--device", "cuda"))
    rows = utils.read_csv_rows(Path(result["figures"]) / "metrics.csv")
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert not torch._dynamo.utils.counters["graph_break"]


def test_sampling_with_a_cuda_generator_is_repeatable():
    torch.manual_seed(0)
    prior = GatedPixelCNN(PixelCNNConfig(num_embeddings=12, hidden_channels=16, num_layers=3, output_channels=16,
                                      num_classes=3)).to(CUDA).eval()
    labels = torch.tensor([0, 1, 2], device=CUDA)
    draws = [prior.sample(3, (5, 6), labels, generator=torch.Generator(device=CUDA).manual_seed(seed))
             for seed in (1, 1, 2)]
    assert draws[0].device.type == "cuda" and draws[0].shape == (3, 5, 6)
    assert int(draws[0].min()) >= 0 and int(draws[0].max()) < 12
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_resume_between_gpu_and_cpu(hipmri_dir: Path, tmp_path: Path):
    cpu_run = train.main(train_args(tmp_path / "a", hipmri_dir, "--epochs", "2", "--max-steps", "2",
                                    "--device", "cpu"))
    on_gpu = train.main(["--resume", cpu_run["last_checkpoint"], "--device", "cuda", "--max-steps", "4"])
    state = checkpoints.load_checkpoint(on_gpu["last_checkpoint"])["training"]
    assert state["step"] == 4 and state["rng"]["cuda"].dtype == torch.uint8
    back_on_cpu = train.main(["--resume", on_gpu["last_checkpoint"], "--device", "cpu", "--max-steps", "0"])
    assert checkpoints.load_checkpoint(back_on_cpu["last_checkpoint"])["training"]["step"] == 6
    gpu_run = train.main(train_args(tmp_path / "b", hipmri_dir, "--epochs", "2", "--max-steps", "2",
                                    "--device", "cuda"))
    resumed = train.main(["--resume", gpu_run["last_checkpoint"], "--device", "cuda", "--max-steps", "0"])
    checkpoint = checkpoints.load_checkpoint(resumed["last_checkpoint"])
    assert checkpoint["training"]["step"] == 6 and torch.isfinite(checkpoint["model"]["quantizer.embedding"]).all()


def test_nccl_group_of_one_process_trains_with_one_all_reduce_per_step(tmp_path: Path):
    """NCCL itself: joining with device_id, copying the first process's channels-last model, the quantizer's
    all-reduce on GPU tensors."""
    device = torch.device("cuda", torch.cuda.current_device())
    torch.distributed.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                                         device_id=device)
    try:
        torch.manual_seed(0)
        model = VQVAE(VQVAEConfig(hidden_channels=16, residual_channels=8, num_residual_layers=1, num_embeddings=32,
                                  embedding_dim=8)).to(device, memory_format=torch.channels_last)
        model.quantizer.initialise(torch.randn(256, 8, device=device))
        step_model = utils.wrap_distributed(model, device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(3):
            images = torch.rand(4, 1, 32, 16, device=device)
            with utils.autocast(device, utils.resolve_precision("auto", device)):
                reconstruction, _, vq_loss = step_model(images)
            loss = train.reconstruction_loss(reconstruction, images, 0.2) + vq_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert torch.isfinite(loss) and torch.isfinite(model.quantizer.embedding).all()
        assert model.quantizer.cluster_size.sum() > 0
    finally:
        torch.distributed.destroy_process_group()
