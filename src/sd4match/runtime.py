"""Where and how a run executes: the device, the weights' dtype, the processes of a
data-parallel launch, and the git SHA recorded with every output."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

import torch

from sd4match.errors import Sd4MatchError
from sd4match.fileio import LOCK_NAME

DTYPES = ("auto", "fp32", "bf16", "fp16")


def available_devices() -> list[str]:
    """What torch can use here, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA (this process's GPU under torchrun) if present, else Apple MPS, else CPU.

    Raises:
        Sd4MatchError: a name torch cannot use here, in one line naming what is available.
    """
    name = (name or "auto").strip()
    have = available_devices()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("mps" if "mps" in have else "cpu")
    if not re.fullmatch(r"(cpu|mps|cuda)(:\d+)?", name):
        raise Sd4MatchError(f"--device {name}: not a device name; use auto or one of {', '.join(have)}")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise Sd4MatchError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); available: {', '.join(have)}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise Sd4MatchError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); available: {', '.join(have)}")
    if dev.type == "mps" and "mps" not in have:
        raise Sd4MatchError(f"--device {name}: Apple MPS is not available here; available: {', '.join(have)}")
    return dev


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 weights on CUDA GPUs that support it, fp16 on older ones, fp32 elsewhere."""
    if name not in DTYPES:
        raise Sd4MatchError(f"--dtype {name}: use one of {', '.join(DTYPES)}")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) under ``accelerate launch`` or ``torchrun``; (0, 1) otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # gloo on CPU-only machines, NCCL on GPUs
    return state.process_index, state.num_processes


def gather_dicts(mine: dict) -> dict:
    """Every process's dict merged into one, on every process (a collective: all must call it)."""
    from accelerate.utils import gather_object

    merged: dict = {}
    for part in gather_object([mine]):
        merged.update(part)
    return merged


def finish_distributed() -> None:
    """Wait for every process, then close the process group (an open gloo group torn down at
    interpreter exit while another rank still talks can abort the process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def git_sha() -> str | None:
    """The commit of the sd4match checkout this code runs from; None for an installed copy,
    also one inside some other repository (a project's .venv): its files are not tracked there."""
    here = Path(__file__).parent
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", Path(__file__).name], cwd=here, capture_output=True, text=True, timeout=5)
        if tracked.returncode != 0:
            return None
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def hang_for_tests(folder, where: str, until: Callable[[], bool] | None = None) -> None:
    """Fault injection for the kill-and-resume tests: with ``SD4MATCH_TEST_HANG=<where>``
    (e.g. ``step:7``, ``ckpt:4``, ``pair:120``), write ``<folder>/.test-hang`` and wait to be
    killed (or until ``until()`` holds: a stop was asked for), so a test stops a run at a
    point it reached, never on a clock."""
    if os.environ.get("SD4MATCH_TEST_HANG") == where:
        import time

        (Path(folder) / ".test-hang").write_text(where)
        for _ in range(36_000):
            if until is not None and until():
                return
            time.sleep(0.1)


class StopRequest:
    """Within the block, SIGTERM (a scheduler's notice before it kills a job) and a first
    Ctrl-C ask a long run to stop at its next safe point instead of ending the process at
    once: ``signal`` names the first such signal. A second Ctrl-C ends the run at once
    (KeyboardInterrupt). The handlers are installed from the main thread only, never over a
    signal the process ignores (a shell's background job ignores Ctrl-C), and the ones
    before are put back on leaving."""

    def __init__(self, what: str = "the run stops after the step in progress, keeping what it did"):
        self.what = what
        self.signal: str | None = None
        self._before: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._before[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._before.items():
            signal.signal(sig, handler)
        self._before.clear()

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signal = signal.Signals(signum).name
        print(f"sd4match: {self.signal}: {self.what} (Ctrl-C again stops at once)", file=sys.stderr, flush=True)

    def agreed(self, world: int, device) -> bool:
        """Whether any process of the run was asked to stop; with several processes a
        collective (each calls it at the same step), so that all stop at the same one."""
        if world <= 1:
            return self.signal is not None
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.signal else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def peak_memory_mb(device) -> float:
    """Peak memory of this process so far, in MB: the accelerator's allocator peak on CUDA,
    the resident set's high-water mark on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def run_lock(folder: str | Path, what: str = "run"):
    """``folder_lock`` for a run in one process; none under a data-parallel launch, whose
    processes all write into the folder (each its own files)."""
    return contextlib.nullcontext() if distributed_rank_world()[1] > 1 else folder_lock(folder, what)


def locks_out(what: str):
    """A function whose ``out`` argument is a run folder holds that folder's ``run_lock``
    while it runs: a second run into it is refused in one line, naming ``what`` runs there."""
    import functools
    import inspect

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args, **kwargs):
            with run_lock(signature.bind_partial(*args, **kwargs).arguments["out"], what):
                return fn(*args, **kwargs)

        return locked

    return decorate


_held: set[str] = set()  # the folders whose lock this process holds (re-entrant)


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "run") -> Iterator[None]:
    """Hold ``folder``'s lock while a run writes there: a second process asking for it is
    refused in one line (naming the process that holds it). Re-entrant within a process;
    released when the holder ends, however it ends (the OS drops the lock with the process).
    Where file locks are not available the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    folder = Path(folder)
    key = str(folder.resolve())
    if key in _held:  # held by an outer call of this process
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fh = open(folder / LOCK_NAME, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise Sd4MatchError(f"{folder}: another {what} is writing here ({holder}); wait for it to end or choose another --out") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}")
    fh.flush()
    _held.add(key)
    try:
        yield
    finally:
        _held.discard(key)
        fh.close()  # closing the file releases the lock
