"""Every CUDA path of the repository, run and measured in one go on a GPU machine (about 5 minutes in all).

    python benchmarks/gpu_check.py --data DIR --out gpu_check.json      # on a CUDA machine; DIR: class folders
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check.json     # every step shrunk, on the CPU, ~1 minute

Steps, each in a process of its own (a failing step is reported and the next one still runs):
  1. cuda_tests   pytest tests/test_cuda.py with CUDA visible (smoke: its CPU cases)
  2. speed        benchmarks/speed.py at 128x128, batch 64, against MONAI, without and with --compile
  3. train        128x128 brain MRI, --epochs 30 --time-limit 120: epochs reached, validation SSIM
  4. sampling     benchmarks/sampling.py: 1,000 maps of 16x16 codes from each prior kind
  5. torchrun     torchrun --nproc_per_node=1 with NCCL for a few steps, then that run resumed on the CPU
  6. architectures  the default conv and ViT (--architecture vit) models at 256x128, batch 16: images per second,
                 peak memory, parameters
Each step prints one line of numbers; all of them go to --out as JSON. Targets: training at least 2x MONAI's images
per second at the matched size, 1,000 samples of 16x16 codes from the default prior in under 2 s, no step failing.
Exit status 1 when a step failed.

The GPU machine has its own torch and reaches no package registry: install nothing there but the two pure-Python
wheels it lacks (nibabel, monai), carried with the data.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import utils  # noqa: E402

NUMBER = r"([-+0-9.e]+|nan|inf)"


def run(command: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
    """(exit status, stdout and stderr) of a command run from the repository root; 124 when it ran out of time."""
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        return done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout or b""
        return 124, output.decode() if isinstance(output, bytes) else output


def numbers(text: str, keys: list[str]) -> dict:
    """key=value pairs of the last line that has the first key."""
    lines = [line for line in text.splitlines() if f"{keys[0]}=" in line]
    if not lines:
        return {}
    found = dict(re.findall(r"(\w+)=([^\s]+)", lines[-1]))
    return {key: _number(found[key]) for key in keys if key in found}


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def python(script: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / script), *args]


# ----------------------------------------------------------------------------- the steps

def cuda_tests(args: argparse.Namespace, work: Path) -> dict:
    selection = ["-k", "cpu and (sampling or process_group or host_memory)"] if args.smoke else []
    status, output = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py",
                          *selection], args.step_timeout)
    counts = {kind: int(count) for count, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)", output)}
    return {"ok": status == 0, **counts, "tail": output[-1500:] if status else ""}


def speed_runs(args: argparse.Namespace, size: list[str], variants: dict[str, list[str]], keys: list[str]) -> dict:
    """benchmarks/speed.py once per variant (its own flags after the size's), the numbers of each under its name."""
    result = {"ok": True}
    for name, flags in variants.items():
        status, output = run(python("benchmarks/speed.py", *size, "--device", args.device, *flags), args.step_timeout)
        values = numbers(output, keys)
        result[name] = values
        result["ok"] &= status == 0 and bool(values)
        if status:
            result["tail"] = output[-1500:]
    return result


def speed(args: argparse.Namespace, work: Path) -> dict:
    size = ["--image-size", "32", "--batch-size", "4", "--steps", "2", "--warmup", "1"] if args.smoke else \
        ["--image-size", "128", "--batch-size", "64", "--steps", "50", "--warmup", "10"]
    # compiling on a CPU takes a minute: not in a smoke run
    variants = {"eager": []} if args.smoke else {"eager": [], "compiled": ["--compile"]}
    return speed_runs(args, size, variants, ["images_per_s", "monai_images_per_s", "ratio"])


def architectures(args: argparse.Namespace, work: Path) -> dict:
    """Images per second, peak memory and parameters of the default conv and ViT models at HipMRI's 256x128."""
    size = ["--image-size", "32", "16", "--batch-size", "2", "--steps", "1", "--warmup", "1"] if args.smoke else \
        ["--image-size", "256", "128", "--batch-size", "16", "--steps", "30", "--warmup", "5"]
    variants = {name: ["--defaults", "--vqvae-flags", "--architecture", name] for name in ("conv", "vit")}
    return speed_runs(args, size, variants, ["images_per_s", "peak_mb", "parameters"])


def tiny_classes(folder: Path) -> Path:
    """A few generated slices in two class folders: data for a smoke run."""
    from PIL import Image

    from demo import make_phantom

    for label, name in enumerate(("alpha", "beta")):
        for index in range(8):
            image = make_phantom(100 * label + index, 0.5, (32, 32))
            (folder / "train" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray((255 * image / image.max()).astype("uint8")).save(folder / "train" / name / f"{index}.png")
    return folder


TINY_MODEL = ["--hidden-channels", "16", "--residual-channels", "8", "--residual-layers", "1", "--num-embeddings",
              "32", "--embedding-dim", "8"]


def train_run(args: argparse.Namespace, work: Path) -> dict:
    data = args.data or str(tiny_classes(work / "data"))
    budget = ["--image-size", "32", "--epochs", "1", "--max-steps", "2", *TINY_MODEL] if args.smoke else \
        ["--image-size", "128", "--epochs", "30", "--time-limit", "120"]
    status, output = run(python("benchmarks/quality.py", "--data", data, *budget, "--device", args.device,
                                "--run-name", "gpu-check", "--checkpoint-dir", str(work / "ck"), "--resources-dir",
                                str(work / "res"), "--cache-dir", str(work.parent / "cache")), args.step_timeout)
    values = numbers(output, ["val_ssim", "epochs", "steps", "seconds"])
    return {"ok": status == 0 and bool(values), **values, "tail": output[-1500:] if status else ""}


def sampling(args: argparse.Namespace, work: Path) -> dict:
    size = ["--count", "4", "--batch", "4", "--code-shape", "4", "4", "--width", "16", "--depth", "1", "--heads", "2",
            "--hidden-channels", "8", "--layers", "2"] if args.smoke else ["--count", "1000", "--batch", "1000"]
    status, output = run(python("benchmarks/sampling.py", "--device", args.device, *size), args.step_timeout)
    seconds = {kind: float(value) for kind, value in re.findall(r"prior=(\w+) seconds=" + NUMBER, output)}
    return {"ok": status == 0 and bool(seconds), "seconds": seconds, "tail": output[-1500:] if status else ""}


def torchrun(args: argparse.Namespace, work: Path) -> dict:
    data = args.data or str(tiny_classes(work / "data"))
    common = ["--image-size", "32" if args.smoke else "64", "--epochs", "50", "--batch-size", "4", *TINY_MODEL,
              "--run-name", "ddp", "--checkpoint-dir", str(work / "ck"), "--resources-dir", str(work / "res"),
              "--cache-dir", str(work.parent / "cache")]
    device = "cpu" if args.smoke else "cuda"  # NCCL on a GPU; a smoke run takes gloo on the CPU
    status, output = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                          str(ROOT / "train.py"), "--data", data, *common, "--max-steps", "3", "--device", device],
                         args.step_timeout, env={"OMP_NUM_THREADS": "1"})
    result = {"ok": status == 0, "backend": "gloo" if args.smoke else "nccl"}
    if status:
        return {**result, "tail": output[-1500:]}
    last = work / "ck" / "ddp-last.pth"
    status, output = run(python("train.py", "--resume", str(last), "--max-steps", "5", "--device", "cpu"),
                         args.step_timeout)
    from checkpoints import load_checkpoint

    steps = load_checkpoint(last)["training"]["step"] if last.exists() else 0
    return {**result, "ok": status == 0 and steps == 5, "steps_after_resume_on_cpu": steps,
            "tail": output[-1500:] if status else ""}


STEPS = {"cuda_tests": cuda_tests, "speed": speed, "train": train_run, "sampling": sampling, "torchrun": torchrun,
         "architectures": architectures}


def summary(name: str, result: dict) -> str:
    """The step's one line of numbers."""
    shown = {key: value for key, value in result.items() if key not in ("tail", "ok", "step_seconds")}
    text = json.dumps(shown, separators=(",", "="))[1:-1].replace('"', "")
    return f"{name}: {'ok' if result['ok'] else 'FAILED'} {text} ({result['step_seconds']:.0f}s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("--data", help="a data folder with class folders (brain MRI at 128x128 for the train step; "
                        "a smoke run makes its own)")
    parser.add_argument("--smoke", action="store_true", help="shrink every step to run on the CPU in about a minute")
    parser.add_argument("--device", help="default: cuda, or cpu with --smoke")
    parser.add_argument("--steps", nargs="+", choices=tuple(STEPS), default=list(STEPS))
    parser.add_argument("--step-timeout", type=float, default=240, help="seconds each step may take")
    parser.add_argument("--out", default="gpu_check.json", help="where the numbers of every step go")
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise utils.UsageError("no CUDA GPU is visible: run on a GPU machine, or with --smoke on a CPU")
    machine = utils.describe_machine(torch.device(args.device), "-")
    print(machine)
    results: dict = {"machine": machine}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        for name in args.steps:
            start = time.perf_counter()
            try:
                result = STEPS[name](args, Path(scratch) / name)
            except Exception as error:  # a broken step is reported; the next one still runs
                result = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            result["step_seconds"] = time.perf_counter() - start
            results[name] = result
            print(summary(name, result))
            utils.write_json(args.out, results)  # after every step: a run cut short keeps what it measured
    failed = [name for name in args.steps if not results[name]["ok"]]
    print(f"steps={len(args.steps)} failed={','.join(failed) or 'none'} json={args.out}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
