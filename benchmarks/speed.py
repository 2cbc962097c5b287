"""Training throughput of this repository's VQ-VAE and, when `monai` is installed, of MONAI's VQVAE.

Both are configured alike (2 downsamplings, 128 hidden channels, 2 residual layers, K=512, D=64) and trained on
the same random batches with Adam on MSE + their quantization loss; each runs in a fresh process so that peak
memory is its own. MONAI is an optional benchmark dependency only (`pip install monai`).

    python benchmarks/speed.py --image-size 128 --batch-size 64 --device cpu --steps 10
    python benchmarks/speed.py --image-size 128 --batch-size 64 --device cuda --steps 100 --compile
    python benchmarks/speed.py --image-size 256 128 --defaults --steps 10      # the default model at HipMRI size
    python benchmarks/speed.py --image-size 256 128 --batch-size 16 --defaults --vqvae-flags --architecture vit

Last line: images_per_s=<x> monai_images_per_s=<y> ratio=<x/y> peak_mb=<ours> parameters=<ours>
"""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import utils  # noqa: E402

MATCHED = {"downsamples": 2, "hidden": 128, "residual_layers": 2, "num_embeddings": 512, "embedding_dim": 64}


def default_config(flags: list[str]):
    """train.py's VQ-VAE config: its defaults, changed by the --vqvae-flags given."""
    from modules import VQVAEConfig

    parser = argparse.ArgumentParser(prog="--vqvae-flags")
    utils.add_config_arguments(parser, VQVAEConfig)
    return utils.config_from_args(VQVAEConfig, parser.parse_args(flags))


def build(which: str, flags: list[str]) -> tuple[torch.nn.Module, callable]:
    """The model and a function images -> (reconstruction, quantization loss)."""
    if which in ("ours", "defaults"):
        from modules import VQVAE, VQVAEConfig

        model = VQVAE(default_config(flags) if which == "defaults" else VQVAEConfig(
            hidden_channels=MATCHED["hidden"], residual_channels=MATCHED["hidden"],
            num_residual_layers=MATCHED["residual_layers"], downsamples=MATCHED["downsamples"],
            num_embeddings=MATCHED["num_embeddings"], embedding_dim=MATCHED["embedding_dim"]))

        def step(module, images):
            reconstruction, _, loss = module(images)
            return reconstruction, loss

        return model, step
    from monai.networks.nets import VQVAE as MonaiVQVAE

    levels = MATCHED["downsamples"]
    model = MonaiVQVAE(spatial_dims=2, in_channels=1, out_channels=1, channels=(MATCHED["hidden"],) * levels,
                       num_res_layers=MATCHED["residual_layers"], num_res_channels=(MATCHED["hidden"],) * levels,
                       downsample_parameters=((2, 4, 1, 1),) * levels, upsample_parameters=((2, 4, 1, 1, 0),) * levels,
                       num_embeddings=MATCHED["num_embeddings"], embedding_dim=MATCHED["embedding_dim"])
    return model, lambda module, images: module(images)


def measure(which: str, args: argparse.Namespace, results) -> None:
    torch.manual_seed(0)
    device = torch.device(args.device)
    model, step = build(which, args.vqvae_flags)
    parameters = sum(p.numel() for p in model.parameters())
    precision = utils.resolve_precision(args.precision, device)
    model = model.to(device, memory_format=torch.channels_last)
    module = torch.compile(model) if args.compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    height, width = args.image_size * 2 if len(args.image_size) == 1 else args.image_size
    batches = [torch.rand(args.batch_size, 1, height, width, generator=generator)
               .to(device).contiguous(memory_format=torch.channels_last) for _ in range(4)]

    def train_step(images):
        with utils.autocast(device, precision):
            reconstruction, loss = step(module, images)
        loss = F.mse_loss(reconstruction.float(), images) + loss.float()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for index in range(args.warmup):
        train_step(batches[index % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for index in range(args.steps):
        train_step(batches[index % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak resident set
    results[which] = (args.steps * args.batch_size / (time.perf_counter() - start), peak_mb, parameters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, nargs="+", default=[128], help="N (square) or H W")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--precision", choices=utils.PRECISIONS, default="auto",
                        help="autocast of both models, as train.py's --precision")
    parser.add_argument("--no-monai", action="store_true", help="measure this repository's model only")
    parser.add_argument("--defaults", action="store_true",
                        help="this repository's default model instead of the size matched to MONAI's (no MONAI)")
    parser.add_argument("--vqvae-flags", nargs=argparse.REMAINDER, default=[],
                        help="with --defaults, last: train.py's model options, e.g. --architecture vit --vit-width 128")
    args = parser.parse_args()
    if args.vqvae_flags and not args.defaults:
        parser.error("--vqvae-flags change the default model: give --defaults too")
    try:
        import monai  # noqa: F401

        models = ["ours"] if args.no_monai or args.defaults else ["ours", "monai"]
    except ImportError:
        models = ["ours"]
        print("monai is not installed: measuring this repository's model only (pip install monai to compare)")
    if args.defaults:
        models = ["defaults"]
    context = multiprocessing.get_context("spawn")
    results = context.Manager().dict()
    for which in models:
        process = context.Process(target=measure, args=(which, args, results))
        process.start()
        process.join()
        if which not in results:
            raise SystemExit(f"the {which} measurement failed")
        images_per_s, peak_mb, parameters = results[which]
        memory = "GPU memory" if args.device.startswith("cuda") else "process memory"
        size = "x".join(map(str, args.image_size * 2 if len(args.image_size) == 1 else args.image_size))
        print(f"{which:>5}: {parameters / 1e6:.2f}M parameters, {images_per_s:8.1f} images/s, peak {memory} "
              f"{peak_mb:,.0f} MB ({size}, batch {args.batch_size}, {args.device}, "
              f"{utils.resolve_precision(args.precision, torch.device(args.device))})")
    ours, peak_mb, parameters = results[models[0]]
    theirs = results["monai"][0] if "monai" in results else float("nan")
    print(f"images_per_s={ours:.1f} monai_images_per_s={theirs:.1f} ratio={ours / theirs:.2f} peak_mb={peak_mb:.0f} "
          f"parameters={parameters}")


if __name__ == "__main__":
    main()
