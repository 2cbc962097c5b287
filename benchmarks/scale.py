"""Every job at HipMRI size: 11,460 / 660 / 540 synthetic slices of 256x128, a small model, a few steps.

    python benchmarks/scale.py                     # data in data/scale (generated once), 50 training steps
    python benchmarks/scale.py --steps 20 --data-dir /tmp/scale

Generates the data set once (the demo's deterministic phantoms, written as 2D NIfTI in the HipMRI layout), then runs
train.py, predict.py, extract_features.py, train_prior.py and predict.py --sample, each in a process of its own,
and prints per job its wall time, its peak resident memory (the operating system's count for that process) and,
where the job decodes files first, files per second. Target: every job below 3 GB (the uint8 data set is 0.4 GB).

Last line: max_peak_rss_gb=<x> jobs=<n> (with "over_3gb=<names>" when any job went over)
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo import make_demo_data  # noqa: E402

HIPMRI_COUNTS = {"train": 11_460, "validate": 660, "test": 540}
HIPMRI_SHAPE = (256, 128)
SMALL_MODEL = ["--hidden-channels", "32", "--residual-channels", "16", "--residual-layers", "1"]
SMALL_PRIOR = ["--hidden-channels", "32", "--layers", "4"]
LIMIT_GB = 3.0


def run_job(name: str, command: list[str], log_dir: Path) -> dict:
    """Run one job in its own process; its wall time, peak resident memory and decode speed."""
    log_path = log_dir / f"{name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(process.pid, 0)  # the resource use of this process alone
    seconds = time.perf_counter() - start
    output = log_path.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed (exit {os.waitstatus_to_exitcode(status)}); its output is in {log_path}:\n"
                         + "\n".join(output.splitlines()[-15:]))
    speeds = [float(value) for value in re.findall(r"\(([\d.]+) files/s\)", output)]
    return {"job": name, "seconds": seconds, "peak_rss_gb": usage.ru_maxrss / 2**20,  # Linux reports kB
            "files_per_s": min(speeds) if speeds else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data/scale", help="where the HipMRI-sized set is generated once")
    parser.add_argument("--work-dir", default=".cache/scale-run", help="caches, checkpoints, figures and logs")
    parser.add_argument("--steps", type=int, default=50, help="training steps of the VQ-VAE and of the prior")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args()
    started = time.perf_counter()
    data = make_demo_data(Path(args.data_dir), counts=HIPMRI_COUNTS, shape=HIPMRI_SHAPE)
    print(f"data: {data} ({sum(HIPMRI_COUNTS.values())} slices of {HIPMRI_SHAPE[0]}x{HIPMRI_SHAPE[1]}, ready after "
          f"{time.perf_counter() - started:.0f}s)")
    work = Path(args.work_dir).absolute()
    if work.exists():  # a fresh cache each time: the first decode is part of what is measured
        import shutil

        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)
    common = ["--cache-dir", str(work / "cache"), "--device", args.device]
    outputs = ["--checkpoint-dir", str(work / "ck"), "--resources-dir", str(work / "res")]
    vqvae, prior = str(work / "ck" / "scale.pth"), str(work / "ck" / "scale-prior.pth")
    jobs = {
        "train": ["train.py", "--data", str(data), "--run-name", "scale", "--epochs", "1", "--max-steps",
                  str(args.steps), *SMALL_MODEL, *common, *outputs],
        "predict": ["predict.py", "-m", vqvae, *common, "--resources-dir", str(work / "res")],
        "extract_features": ["extract_features.py", "-m", vqvae, "--out", str(work / "features.npz"), *common,
                             "--resources-dir", str(work / "res")],
        "train_prior": ["train_prior.py", "-m", vqvae, "--epochs", "1", "--max-steps", str(args.steps), *SMALL_PRIOR,
                        *common, *outputs],
        "predict_sample": ["predict.py", "-m", prior, "--sample", "4", *common, "--resources-dir", str(work / "res")],
    }
    results = []
    print(f"{'job':>17} {'seconds':>8} {'peak RSS':>9} {'decode':>12}")
    for name, command in jobs.items():
        result = run_job(name, command, work / "logs")
        results.append(result)
        speed = f"{result['files_per_s']:.0f} files/s" if result["files_per_s"] else ""
        print(f"{name:>17} {result['seconds']:8.1f} {result['peak_rss_gb']:7.2f} GB {speed:>12}")
    peak = max(result["peak_rss_gb"] for result in results)
    over = [result["job"] for result in results if result["peak_rss_gb"] >= LIMIT_GB]
    print(f"max_peak_rss_gb={peak:.2f} jobs={len(results)}" + (f" over_3gb={','.join(over)}" if over else ""))


if __name__ == "__main__":
    main()
