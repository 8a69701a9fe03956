"""What every benchmark shares: work folders, interleaved repeats and medians, the load average, child processes,
where the real VOC fixture files are, and the figures written as JSON next to printing them.

The benchmarks run from the repository root as modules (``python -m bench.<name>``), so ``wsss_dist`` is the
checkout's; child processes start the same way (:func:`run_child`). Each bench prints its table and writes what it
printed and measured to ``bench/out/<name>.json`` (git-ignored) or to ``--json PATH`` (:class:`Figures`).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
RESULT = "RESULT "  # a child process's last line starting with this carries its figures as JSON


@contextlib.contextmanager
def work_dir(workdir: str | os.PathLike | None, prefix: str) -> Iterator[Path]:
    """``workdir`` (created if needed, kept afterwards) when given, else a temporary folder removed at the end."""
    if workdir is not None:
        path = Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=f"{prefix}-") as tmp:
        yield Path(tmp)


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15-minute load averages (the machine is shared: every figure needs them)."""
    return os.getloadavg()


def load_text() -> str:
    """The load averages as ``"1.23 1.10 0.98"``."""
    return " ".join(f"{x:.2f}" for x in load_average())


def median(values: Sequence[float]) -> float:
    """The median of ``values``."""
    return float(statistics.median(values))


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """The first and third quartiles of ``values`` (linear interpolation, as numpy's percentile)."""
    if len(values) < 2:
        return float(values[0]), float(values[0])
    q = statistics.quantiles(values, n=4, method="inclusive")
    return float(q[0]), float(q[2])


def fmt_times(times: Sequence[float]) -> str:
    """Median (min–max) of a list of seconds."""
    return f"{median(times):.3f} s ({min(times):.3f}–{max(times):.3f})"


def best_of(fn: Callable[..., Any], repeats: int, *args: Any) -> tuple[float, Any]:
    """Fastest wall time of ``repeats`` calls of ``fn(*args)`` and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times), out


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int,
                after_round: Callable[[int, dict[str, list]], None] | None = None) -> tuple[dict[str, list], list[float]]:
    """Call every variant once per round, rounds interleaved (A B C, A B C, ...): the results per variant, and the
    1-minute load average after each call. ``after_round(r, results)`` runs after round ``r`` (a progress line)."""
    results: dict[str, list] = {name: [] for name in variants}
    loads: list[float] = []
    for r in range(repeats):
        for name, fn in variants.items():
            results[name].append(fn())
            loads.append(load_average()[0])
        if after_round is not None:
            after_round(r, results)
    return results, loads


def fixtures_dir() -> Path | None:
    """The real VOC fixture files (voc_mini, voc_lists, voc_real): ``$WSSS_FIXTURES``, else ``../shared/fixtures``
    next to this checkout; None when neither is a folder (the benches then use toy images only)."""
    env = os.environ.get("WSSS_FIXTURES")
    path = Path(env) if env else ROOT.parent / "shared" / "fixtures"
    return path if path.is_dir() else None


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment with the checkout first on ``PYTHONPATH`` (children import its ``wsss_dist``)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_child(module: str, args: Sequence[str], ranks: int = 1, env: dict[str, str] | None = None) -> dict:
    """Run ``python -m <module> ARGS`` in a fresh interpreter from the repository root (``torchrun`` with ``ranks``
    processes when ``ranks`` > 1); its last ``RESULT {json}`` line as a dict, wall seconds of the whole process added
    as ``process_s``. Raises with the child's output tail when it fails."""
    cmd = [sys.executable, "-m", module, *args]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", module,
               *args]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env if env is not None else child_env())
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT)]
    if p.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return {**json.loads(lines[-1][len(RESULT):]), "process_s": time.perf_counter() - t0}


def print_result(figures: dict) -> None:
    """(in a child process) Print the ``RESULT {json}`` line :func:`run_child` reads."""
    print(RESULT + json.dumps(figures), flush=True)


def machine() -> dict[str, Any]:
    """What the figures depend on: host, CPU flags, cores, torch and its CPU capability, threads, CUDA device."""
    import torch

    flags = ""
    with contextlib.suppress(OSError):
        words = Path("/proc/cpuinfo").read_text().split()
        flags = " ".join(sorted({w for w in words if w.startswith(("avx512f", "avx2", "amx"))}))
    return {"host": platform.node(), "python": platform.python_version(), "cpus": os.cpu_count(), "cpu_flags": flags,
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _plain(o: Any) -> Any:
    """JSON for numpy scalars and arrays, tuples, paths."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON: {type(o).__name__}")


class Figures:
    """A bench's output: :meth:`say` prints a line and keeps it, :meth:`put` records a figure; :meth:`save` writes
    both, with the machine, the parameters and the load averages at the start and the end, to ``path`` (default
    ``bench/out/<name>.json``), atomically."""

    def __init__(self, name: str, path: str | os.PathLike | None = None, **params: Any) -> None:
        self.path = Path(path) if path else OUT / f"{name}.json"
        self.data: dict[str, Any] = {
            "bench": name, "command": " ".join([f"python -m bench.{name}", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), "params": params,
            "load_start": load_average(), "figures": {}, "printed": []}

    def say(self, *lines: str) -> None:
        """Print ``lines`` now (flushed: a timeout must still leave them) and keep them for the JSON file."""
        for line in lines:
            print(line, flush=True)
            self.data["printed"].append(line)

    def put(self, key: str, value: Any) -> Any:
        """Record the figure ``key`` (JSON-able: numbers, strings, lists, dicts); returns ``value``."""
        self.data["figures"][key] = value
        return value

    def save(self) -> Path:
        """Write the JSON file (load average at the end added) and print where it is."""
        self.data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.data["load_end"] = load_average()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_plain) + "\n")
        os.replace(tmp, self.path)
        print(f"figures written to {self.path}", flush=True)
        return self.path
