"""What every job shares: the one error type users see, command-line options built from config dataclasses,
random state, devices and precision, several processes (torchrun), the training clock, and files written whole."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import inspect
import itertools
import os
import random
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

import numpy as np
import torch


class UsageError(Exception):
    """A problem with the user's input (data, flags, checkpoint): printed as one line, exit code 2."""


def run_cli(main: Callable[[], Any]) -> int:
    """Run a script's main(); a UsageError becomes one line on stderr and a non-zero exit, never a traceback."""
    sys.stdout.reconfigure(line_buffering=True)  # job logs show each line as it happens, even when redirected
    try:
        main()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def progress_bar(iterable, **options):
    """A tqdm bar on terminals; silent in logs and CI, where redrawn bars are only noise."""
    from tqdm import tqdm

    return tqdm(iterable, disable=None, leave=False, dynamic_ncols=True, **options)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with every default shown and the script's docstring (its usage examples) kept as written."""


# ----------------------------------------------------------------------------- options written once

def option(default: Any, help: str, flag: str | None = None, choices: Sequence[Any] | None = None) -> Any:
    """A config field that is also a command-line option: its default and its help are written here, once.
    `flag` names the option where it differs from the field (--residual-layers for num_residual_layers)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


class Config:
    """What every config dataclass shares: a plain dict for checkpoints (with "kind" when the class names one) and
    back. LEGACY holds what checkpoints written before an option existed were trained with, so they load as they
    were trained, whatever today's defaults are."""

    KIND: ClassVar[str | None] = None
    LEGACY: ClassVar[dict] = {}

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        return {"kind": self.KIND, **values} if self.KIND else values

    @classmethod
    def from_dict(cls, values: dict) -> Any:
        values = {key: value for key, value in values.items() if key != "kind"}
        unknown = set(values) - {config_field.name for config_field in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} settings: {sorted(unknown)}")
        return cls(**{**cls.LEGACY, **values})


def config_options(config_class: type) -> list[tuple[dataclasses.Field, str, str]]:
    """(field, --flag, argparse dest) of each field of a config dataclass that is a command-line option."""
    found = []
    for config_field in dataclasses.fields(config_class):
        if "help" in config_field.metadata:
            flag = config_field.metadata["flag"] or "--" + config_field.name.replace("_", "-")
            found.append((config_field, flag, flag[2:].replace("-", "_")))
    return found


def add_config_arguments(group: argparse._ActionsContainer, config_class: type) -> None:
    """One command-line option per option field of the config dataclass, with the field's default and help."""
    for config_field, flag, dest in config_options(config_class):
        meta, default = config_field.metadata, config_field.default
        if isinstance(default, bool):
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default,
                               help=meta["help"])
        else:
            kind = type(default) if default is not None else str
            group.add_argument(flag, dest=dest, type=kind, default=default, choices=meta["choices"],
                               help=meta["help"])


def config_from_args(config_class: type, args: argparse.Namespace, **values: Any) -> Any:
    """The config the command line asks for (its option fields, read from args), with `values` for the rest."""
    given = {config_field.name: getattr(args, dest) for config_field, _, dest in config_options(config_class)
             if hasattr(args, dest)}
    return config_class(**{**given, **values})


# ----------------------------------------------------------------------------- random state

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    """Every random generator's state, in types that load with weights_only=True. Of the GPUs only the training
    device's generator is kept, so the state restores on a machine with fewer GPUs, or none."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore rng_state(); a GPU state is restored only when training goes on on a GPU."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    cuda_state = state.get("cuda")
    if isinstance(cuda_state, (list, tuple)):  # older checkpoints kept one state per visible GPU
        cuda_state = cuda_state[0] if cuda_state else None
    if cuda_state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state, device)


# ----------------------------------------------------------------------------- several processes (torchrun)

def launched_world_size() -> int:
    """How many processes torchrun started (1 without torchrun); known before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all processes (in place); a no-op in a single process."""
    if is_distributed():
        torch.distributed.all_reduce(tensor)
    return tensor


def training_device(name: str = "auto") -> torch.device:
    """This process's device. Under torchrun each process takes the GPU of its LOCAL_RANK (or the CPU)."""
    if launched_world_size() <= 1:
        return pick_device(name)
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise UsageError(f"--device {name}: under torchrun each process uses the GPU of its LOCAL_RANK; "
                         "use --device cuda (or auto), or --device cpu")
    pick_device("cuda")  # a clear error when there is no GPU
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise UsageError(f"torchrun started process {local_rank} on a node, but only {torch.cuda.device_count()} "
                         "GPUs are visible: lower --nproc_per_node")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def init_distributed(device: torch.device) -> None:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); nothing without torchrun. Call it after the
    data caches are built, so that no collective waits through a long decode."""
    if launched_world_size() > 1 and not is_distributed():
        cuda = device.type == "cuda"
        torch.distributed.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)


def close_distributed() -> None:
    if is_distributed():
        torch.distributed.destroy_process_group()


def broadcast_module_state(module: torch.nn.Module) -> None:
    """Copy the first process's parameters and buffers to every process."""
    if is_distributed():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            torch.distributed.broadcast(tensor.data, src=0)


def wrap_distributed(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel over torchrun's processes, or the model itself in one process.

    Every process first takes the first one's parameters and buffers: DDP itself copies buffers only with
    broadcast_buffers=True, and that would also overwrite them at every forward pass, where the codebook's
    statistics are already kept equal by the quantizer's own all-reduce."""
    if not is_distributed():
        return model
    broadcast_module_state(model)
    # Newer torch names the option forward_sync_buffers (it also syncs at the start, which the broadcast did already).
    options = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    no_buffer_sync = {"forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers": False}
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)


# ----------------------------------------------------------------------------- devices and precision

def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.version.cuda and launched_rank() == 0:  # a CUDA wheel that finds no GPU: say so, do not go quiet
            print(f"warning: this torch {torch.__version__} is built for CUDA {torch.version.cuda} but finds no usable "
                  "GPU (a driver older than the wheel needs, or no GPU visible: check nvidia-smi and "
                  "CUDA_VISIBLE_DEVICES); running on the CPU", file=sys.stderr)
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for, but CUDA is not available on this machine")
    return torch.device(name)


PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is bf16 on GPUs with native bfloat16 (compute capability 8.0+: A100, H100, RTX 30xx and newer) and
    fp32 elsewhere: older GPUs (T4, V100) and CPUs only emulate bf16, which is slower than fp32."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return "bf16" if native else "fp32"


def describe_machine(device: torch.device, precision: str, processes: int = 1) -> str:
    """What runs where, in one line: torch and CUDA versions, the device and its name, precision, processes."""
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return (f"torch {torch.__version__} ({cuda}), device {device}{name}, {precision}, "
            f"{processes} process{'es' if processes > 1 else ''}")


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Mixed precision for the convolutions under `precision` ('bf16' or 'fp32'). bf16 keeps float32's range, so
    no loss scaling is needed; the quantizer and the losses opt out to float32 themselves."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# ----------------------------------------------------------------------------- training runs

def absolute_paths(args: argparse.Namespace, names: Sequence[str]) -> argparse.Namespace:
    """Make these path options absolute: checkpoints record them, and later jobs may run from another directory."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            setattr(args, name, str(Path(value).expanduser().absolute()))
    return args


def shape_text(shape: Iterable[int]) -> str:
    """A shape as people write it: 256x128, 32x32x32."""
    return "x".join(str(side) for side in shape)


def items_name(spatial_dims: int) -> str:
    """What the items of a data set are called in messages and figures."""
    return "volumes" if spatial_dims == 3 else "slices"


# ----------------------------------------------------------------------------- files

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_DEFAULT_FILE_MODE = 0o666 & ~_umask()  # what open() would have given the file; read once, at import


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) and move the result onto path in one step: a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(tmp_path, _DEFAULT_FILE_MODE)  # mkstemp makes files private (0600); others may need to read them
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Delete what atomic_write left of `path` in a run that was killed while writing it. Only the process that
    owns the file (holding its lock, or the only one writing it) may call this."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


@contextmanager
def file_lock(path: str | os.PathLike, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` while the block runs. Of several processes that would build the same
    cache (torchrun's ranks, or two jobs), one builds it and the others wait, then read it; the operating system
    releases the lock if its holder dies. Where locks are not to be had (Windows, a read-only folder, a file
    system without flock) the block runs unlocked, after a warning."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except OSError as error:
        warn(log, f"cannot create the lock file {path} ({error.strerror}); going on without it")
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            warn(log, f"waiting for another process to build {path.with_name(path.name[1:-5])}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:  # e.g. Lustre or NFS mounted without lock support
            warn(log, f"cannot lock {path} ({error.strerror}); going on without the lock")
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def warn(log: Callable[[str], None] | None, message: str) -> None:
    if log is not None:
        log(message)


def build_once(ready: Callable[[], bool], build: Callable[[], None], outputs: Sequence[Path],
               log: Callable[[str], None]) -> bool:
    """Build a cache unless it is complete already, one process at a time: the others wait on a file lock and then
    find it complete. Leftovers of a build that was killed are removed first. True when this process built it."""
    if ready():
        return False
    with file_lock(outputs[0].with_name(f".{outputs[0].name}.lock"), log):
        if ready():
            return False
        for output in outputs:
            remove_stale_temporaries(output)
        build()
    return True


def write_json(path: str | os.PathLike, values: dict) -> None:
    import json

    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(values, indent=2)))


def write_csv_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write all rows of a metrics table at once, atomically (a killed run never leaves a torn line)."""
    fields = list(dict.fromkeys(key for row in rows for key in row))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def read_csv_rows(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
