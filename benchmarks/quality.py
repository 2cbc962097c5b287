"""Train with a given budget and print validation quality as one line.

    python benchmarks/quality.py --data ../shared/data/brain-mri --image-size 64 --time-limit 180

Every option of train.py is accepted and passed on; the last line reads
    val_ssim=<x> val_psnr=<x> val_mae=<x> perplexity=<x> codebook_usage=<x> epochs=<n> seconds=<s>
with perplexity_top=, perplexity_bottom=, codebook_usage_top=, ... for two-level models.
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
    use = " ".join(f"{key[4:]}={float(value):.3f}" for key, value in best.items()
                   if key.startswith(("val_perplexity", "val_codebook_usage")))  # per level for two levels
    print(f"val_ssim={best['val_ssim']:.4f} val_psnr={best['val_psnr']:.2f} val_mae={best['val_mae']:.4f} {use} "
          f"epochs={best['epoch']} seconds={best['seconds']:.0f}")


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
