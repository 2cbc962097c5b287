"""Seconds to draw code maps from each kind of prior, at its default size (weights do not change the cost).

    python benchmarks/sampling.py --device cpu                        # 1,000 maps of 16x16 codes from every kind
    python benchmarks/sampling.py --device cuda --count 1000 --batch 1000
    python benchmarks/sampling.py --prior transformer --width 128 --depth 4 --heads 4

One line per kind, then a last line per kind: prior=<kind> seconds=<s> count=<n> batch=<b> code_shape=<h>x<w>
device=<d>
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import utils  # noqa: E402
from pixelcnn import PixelCNNConfig  # noqa: E402
from priors import PRIOR_KINDS, build_prior, sampling_options  # noqa: E402
from transformer import TransformerConfig  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sampling(prior: torch.nn.Module, count: int, batch: int, shape: tuple[int, int], device: torch.device,
                  classes: int, **drawing) -> float:
    """Seconds to draw `count` maps, `batch` at a time."""
    generator = torch.Generator(device=device).manual_seed(0)
    synchronize(device)
    start = time.perf_counter()
    for first in range(0, count, batch):
        size = min(batch, count - first)
        labels = torch.arange(size, device=device) % classes if classes else None
        prior.sample_levels(size, [shape], labels, generator=generator, **drawing)
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prior", choices=tuple(PRIOR_KINDS), nargs="+", default=list(PRIOR_KINDS))
    parser.add_argument("--count", type=int, default=1000, help="maps drawn")
    parser.add_argument("--batch", type=int, default=250, help="maps drawn at once")
    parser.add_argument("--code-shape", type=int, nargs=2, default=(16, 16))
    parser.add_argument("--num-embeddings", type=int, default=512)
    parser.add_argument("--classes", type=int, default=4, help="class-conditional over this many classes; 0 = none")
    parser.add_argument("--repeats", type=int, default=1, help="the fastest of this many runs is reported")
    parser.add_argument("--guidance", type=float, default=3.0, help="the transformers' classifier-free guidance, "
                        "predict.py's default (each map drawn twice); 0 = none")
    utils.add_config_arguments(parser, TransformerConfig)
    utils.add_config_arguments(parser, PixelCNNConfig)
    args = parser.parse_args()
    device = utils.pick_device(args.device)
    rows, columns = args.code_shape
    results = []
    for kind in args.prior:
        values = {"num_embeddings": args.num_embeddings, "num_classes": args.classes}
        if kind != "pixelcnn":
            values.update(rows=rows, columns=columns)
        config = utils.config_from_args(PRIOR_KINDS[kind][0], args, **values)
        prior = build_prior([config]).to(device).eval()
        time_sampling(prior, 2, 2, (2, 2), device, args.classes)  # warm-up: allocator, kernels
        drawing = sampling_options(prior, guidance=args.guidance)
        seconds = min(time_sampling(prior, args.count, args.batch, (rows, columns), device, args.classes, **drawing)
                      for _ in range(args.repeats))
        parameters = sum(p.numel() for p in prior.parameters()) / 1e6
        print(f"{kind:>12}: {args.count} maps of {rows}x{columns} in {seconds:.2f}s ({parameters:.2f}M parameters)")
        results.append(f"prior={kind} seconds={seconds:.2f} count={args.count} batch={args.batch} "
                       f"code_shape={rows}x{columns} device={device} guidance={drawing.get('guidance', 0)}")
    print("\n".join(results))


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
