"""Train with a given budget and print validation quality as one line.

    python benchmarks/quality.py --data ../shared/data/brain-mri --image-size 64 --time-limit 180

Every option of train.py is accepted and passed on; the last line reads
    val_ssim=<x> val_psnr=<x> perplexity=<x> codebook_usage=<x> epochs=<n> seconds=<s>
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402
import utils  # noqa: E402


def main() -> None:
    result = train.main(sys.argv[1:])
    best = result["best"]
    print(f"val_ssim={best['val_ssim']:.4f} val_psnr={best['val_psnr']:.2f} perplexity={best['val_perplexity']:.1f} "
          f"codebook_usage={best['val_codebook_usage']:.3f} epochs={best['epoch']} seconds={best['seconds']:.0f}")


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
