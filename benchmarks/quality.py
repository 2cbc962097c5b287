"""Train with a given budget and print validation quality as one line.

    python benchmarks/quality.py --data DIR --image-size 64 --time-limit 180

Every option of train.py is accepted and passed on to it (it runs as a process of its own); the last line reads
    val_ssim=<x> val_psnr=<x> val_mae=<x> val_seam_ratio=<x> perplexity=<x> codebook_usage=<x> epochs=<n> steps=<n>
    seconds=<s>   (one line)
with perplexity_top=, perplexity_bottom=, codebook_usage_top=, ... for two-level models.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import checkpoints  # noqa: E402
import utils  # noqa: E402


def best_checkpoint(argv: list[str]) -> tuple[list[str], Path]:
    """train.py's arguments with a run name (one is made when none is given) and the best checkpoint it writes."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--run-name")
    parser.add_argument("--checkpoint-dir", default="checkpoints")
    parser.add_argument("--resume")
    known, _ = parser.parse_known_args(argv)
    if known.resume:  # the run goes on under its own name, beside its checkpoint
        resumed = checkpoints.load_checkpoint(known.resume, expected_kind="vqvae")
        return argv, Path(known.resume).parent / f"{resumed['run_name']}.pth"
    if known.run_name is None:
        known.run_name = f"quality-{time.strftime('%Y%m%d-%H%M%S')}"
        argv = [*argv, "--run-name", known.run_name]
    return argv, Path(known.checkpoint_dir) / f"{known.run_name}.pth"


def main() -> None:
    argv, checkpoint = best_checkpoint(sys.argv[1:])
    if subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], check=False).returncode:
        raise utils.UsageError("train.py failed (its message is above)")
    best = checkpoints.load_checkpoint(checkpoint, expected_kind="vqvae")["metrics"]
    use = " ".join(f"{key[4:]}={float(value):.3f}" for key, value in best.items()
                   if key.startswith(("val_perplexity", "val_codebook_usage")))  # per level for two levels
    seams = f"val_seam_ratio={float(best['val_seam_ratio']):.3f} " if "val_seam_ratio" in best else ""
    print(f"val_ssim={best['val_ssim']:.4f} val_psnr={best['val_psnr']:.2f} val_mae={best['val_mae']:.4f} {seams}{use} "
          f"epochs={best['epoch']} steps={best['step']} seconds={best['seconds']:.0f}")


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
