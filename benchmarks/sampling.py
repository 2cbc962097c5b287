"""Seconds to sample one batch of code maps from the PixelCNN prior (weights do not change the cost).

    python benchmarks/sampling.py --device cpu            # 64 samples of 32x32 codes, default prior
    python benchmarks/sampling.py --device cuda --repeats 3

Last line: seconds_per_batch=<s> batch=<n> code_shape=<h>x<w> device=<d>
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import utils  # noqa: E402
from pixelcnn import GatedPixelCNN, PixelCNNConfig  # noqa: E402


def time_sampling(prior: GatedPixelCNN, batch: int, shape: tuple[int, int], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    prior.sample(batch, shape, generator=torch.Generator(device=device).manual_seed(0))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--code-shape", type=int, nargs=2, default=(32, 32))
    parser.add_argument("--num-embeddings", type=int, default=512)
    parser.add_argument("--hidden-channels", type=int, default=PixelCNNConfig.hidden_channels)
    parser.add_argument("--layers", type=int, default=PixelCNNConfig.num_layers)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    device = utils.pick_device(args.device)
    config = PixelCNNConfig(num_embeddings=args.num_embeddings, hidden_channels=args.hidden_channels,
                         num_layers=args.layers)
    prior = GatedPixelCNN(config).to(device).eval()
    time_sampling(prior, args.batch, (2, 2), device)  # warm-up: allocator, kernels
    seconds = min(time_sampling(prior, args.batch, tuple(args.code_shape), device) for _ in range(args.repeats))
    print(f"seconds_per_batch={seconds:.2f} batch={args.batch} code_shape={args.code_shape[0]}x{args.code_shape[1]} "
          f"device={device}")


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
