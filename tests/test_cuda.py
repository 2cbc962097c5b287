"""The CUDA paths: bf16 with channels-last, torch.compile across epochs, pinned staging, no host syncs in a
training step, sampling with a device generator, resume between the GPU and the CPU, a process group of one.

Every test runs on the CPU in the normal suite (so none of them can rot unseen) and again on a GPU when there is
one; only the assertions that mean something on CUDA alone (no host syncs, pinned memory, NCCL) are CUDA-only."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

import checkpoints
import train
import training
import utils
from dataset import BatchLoader, find_data, load_split
from modules import VQVAE, VQVAEConfig
from pixelcnn import GatedPixelCNN, PixelCNNConfig
from readers import Preprocessing
from test_end_to_end import train_args

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=CUDA)]


def cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def setup_training(data: Path, tmp_path: Path, device: torch.device, on_device: bool | None = None):
    """A tiny model, its optimizer and a training loader on the device, with the codebook seeded."""
    slices = load_split(find_data(data), "train", Preprocessing(image_size=(32, 16)), tmp_path / "cache",
                        min_side=4, log=lambda _: None)
    loader = BatchLoader(slices.images, slices.labels, 4, shuffle=True, device=device, drop_last=True,
                         on_device=on_device)
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(hidden_channels=16, residual_channels=8, num_residual_layers=1, num_embeddings=32,
                              embedding_dim=8)).to(device, memory_format=torch.channels_last)
    train.initialise_codebook(model, loader, kmeans=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    args = argparse.Namespace(time_limit=None, max_steps=0, warmup_steps=1, lr=1e-3, lr_schedule="constant",
                              ssim_weight=0.2, checkpoint_every=0)
    clock = training.TrainingClock(args, total_steps=100, device=device)
    return model, optimizer, loader, clock, args


def run_epoch(setup, epoch: int, precision: str = "fp32") -> train.EpochTotals:
    model, optimizer, loader, clock, args = setup
    totals = train.EpochTotals.zeros(len(model.levels), model.config.num_embeddings, loader.device)
    return train.train(epoch, loader, model, optimizer, clock, args, totals, precision)


@pytest.mark.parametrize("name", DEVICES)
def test_a_bf16_channels_last_step_keeps_a_float32_codebook(name: str, hipmri_dir: Path, tmp_path: Path):
    device = torch.device(name)
    if cuda(device) and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("needs a GPU with native bfloat16")
    setup = setup_training(hipmri_dir, tmp_path, device)
    model = setup[0]
    before = model.quantizer.embedding.detach().clone()
    totals = run_epoch(setup, 1, precision="bf16")  # on the CPU bf16 is emulated: slow, but the same code path
    assert totals.batches == 3 and torch.isfinite(totals.losses).all()
    quantizer = model.quantizer
    for tensor in (quantizer.embedding, quantizer.cluster_size, quantizer.embedding_sum, quantizer.restart_candidates):
        assert tensor.dtype == torch.float32
    assert not torch.equal(before, quantizer.embedding.detach())  # the EMA moved it
    assert model.encoder.layers[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), utils.autocast(device, "bf16"):
        latents = model.encode(torch.rand(2, 1, 32, 16, device=device))
        quantized, _, _ = model.quantize(latents)
    assert latents.dtype == torch.bfloat16 and quantized.dtype == torch.float32
    assert quantized.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", DEVICES)
def test_training_steps_never_wait_for_the_gpu(name: str, hipmri_dir: Path, tmp_path: Path):
    device = torch.device(name)
    for on_device in ([True, False] if cuda(device) else [None]):  # data held on the GPU, or pinned staging
        setup = setup_training(hipmri_dir, tmp_path, device, on_device=on_device)
        run_epoch(setup, 1)  # warm-up: cuDNN autotuning and the allocator may synchronise once
        if cuda(device):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # any host sync in a step now raises
        try:
            totals = run_epoch(setup, 2)
        finally:
            if cuda(device):
                torch.cuda.set_sync_debug_mode(0)
        assert totals.batches == 3


@pytest.mark.parametrize("name", DEVICES)
def test_data_kept_in_host_memory_gives_the_batches_of_the_epoch_order(name: str, hipmri_dir: Path, tmp_path: Path):
    device = torch.device(name)
    setup = setup_training(hipmri_dir, tmp_path, device, on_device=False)
    loader = setup[2]
    assert loader.data.device.type == "cpu"  # the data set stays in host memory
    images, labels = next(iter(loader))  # on CUDA: gathered into pinned memory, copied asynchronously
    assert images.device == labels.device and images.device.type == device.type
    expected = loader.data[loader._shard(0)[:4]].float().div(255).to(device)
    torch.testing.assert_close(images, expected)
    assert run_epoch(setup, 1).batches == 3


@pytest.mark.parametrize("name", DEVICES)
def test_compile_over_two_epochs_with_evaluation_between_never_recompiles(name: str, hipmri_dir: Path,
                                                                          tmp_path: Path, monkeypatch):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    result = train.main(train_args(tmp_path, hipmri_dir.parent, "--compile", "--epochs", "2", "--device", name))
    rows = utils.read_csv_rows(Path(result["figures"]) / "metrics.csv")
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the step really was compiled
    assert not torch._dynamo.utils.counters["graph_break"]


@pytest.mark.parametrize("name", DEVICES)
def test_sampling_with_a_device_generator_is_repeatable(name: str):
    device = torch.device(name)
    torch.manual_seed(0)
    prior = GatedPixelCNN(PixelCNNConfig(num_embeddings=12, hidden_channels=16, num_layers=3, output_channels=16,
                                         num_classes=3)).to(device).eval()
    labels = torch.tensor([0, 1, 2], device=device)
    draws = [prior.sample(3, (5, 6), labels, generator=torch.Generator(device=device).manual_seed(seed))
             for seed in (1, 1, 2)]
    assert draws[0].device.type == device.type and draws[0].shape == (3, 5, 6)
    assert int(draws[0].min()) >= 0 and int(draws[0].max()) < 12
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


@pytest.mark.parametrize("name", DEVICES)
def test_a_run_resumes_on_the_device_and_back_on_the_cpu(name: str, hipmri_dir: Path, tmp_path: Path):
    cpu_run = train.main(train_args(tmp_path / "a", hipmri_dir, "--epochs", "2", "--max-steps", "2",
                                    "--device", "cpu"))
    moved = train.main(["--resume", cpu_run["last_checkpoint"], "--device", name, "--max-steps", "4"])
    state = checkpoints.load_checkpoint(moved["last_checkpoint"])["training"]
    assert state["step"] == 4 and (state["rng"]["cuda"].dtype == torch.uint8 if name == "cuda" else "cuda" not in
                                   state["rng"])
    back_on_cpu = train.main(["--resume", moved["last_checkpoint"], "--device", "cpu", "--max-steps", "0"])
    assert checkpoints.load_checkpoint(back_on_cpu["last_checkpoint"])["training"]["step"] == 6
    device_run = train.main(train_args(tmp_path / "b", hipmri_dir, "--epochs", "2", "--max-steps", "2",
                                       "--device", name))
    resumed = train.main(["--resume", device_run["last_checkpoint"], "--device", name, "--max-steps", "0"])
    checkpoint = checkpoints.load_checkpoint(resumed["last_checkpoint"])
    assert checkpoint["training"]["step"] == 6 and torch.isfinite(checkpoint["model"]["quantizer.embedding"]).all()


@pytest.mark.parametrize("name", DEVICES)
def test_a_process_group_of_one_trains_with_one_all_reduce_per_step(name: str, tmp_path: Path):
    """The backend itself (gloo on the CPU, NCCL on a GPU): joining with device_id, copying the first process's
    channels-last model, the quantizer's all-reduce on the device's tensors."""
    device = torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device("cpu")
    torch.distributed.init_process_group("nccl" if cuda(device) else "gloo", init_method=f"file://{tmp_path / 'store'}",
                                         rank=0, world_size=1, device_id=device if cuda(device) else None)
    try:
        torch.manual_seed(0)
        model = VQVAE(VQVAEConfig(hidden_channels=16, residual_channels=8, num_residual_layers=1, num_embeddings=32,
                                  embedding_dim=8)).to(device, memory_format=torch.channels_last)
        model.quantizer.initialise(torch.randn(256, 8, device=device))
        step_model = utils.wrap_distributed(model, device)
        assert isinstance(step_model, torch.nn.parallel.DistributedDataParallel)
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
