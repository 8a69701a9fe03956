"""Run-directory layout, atomic writes and stage DONE markers (the contracts between stages)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(path: Path) -> None:
    """fsync a directory (its entries: a rename in it is durable); errors ignored (not every file system can)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it into place, else remove it.

    Works for files and directories: the final name appears only whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        try:
            yield tmp
        except OSError as e:  # a write error names no file (ENOSPC): name the one being written
            if e.filename is None and e.errno is not None:
                raise OSError(e.errno, e.strerror, str(path)) from e
            raise
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def replace(src: Path, dst: Path) -> None:
    """Rename ``src`` onto ``dst`` (a file, or a directory: the old one is moved aside first, removed after), durably."""
    if dst.is_dir() and src.is_dir():
        old = _tmp_name(dst)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    fsync_dir(dst.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically (write a temporary file, fsync, rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    """Write numpy arrays as an ``.npz`` atomically (no pickles: object arrays are refused)."""
    import numpy as np

    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    return path


def write_npy(path: str | os.PathLike, array: Any) -> Path:
    """Write one numpy array as ``.npy`` atomically (no pickles)."""
    import numpy as np

    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)
    return path


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file (ValueError naming the file when it is not valid JSON)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def remove_stale_tmp(directory: str | os.PathLike) -> int:
    """Delete temporary files/dirs left in ``directory`` by :func:`atomic_path` writers that were killed; their count.

    Call it only when no other process writes into ``directory`` (e.g. on rank 0 before a stage's barrier).
    """
    n = 0
    d = Path(directory)
    for p in d.glob(".*.tmp-*") if d.is_dir() else []:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        n += 1
    return n


def stage_dir(run_dir: str | os.PathLike, stage: str) -> Path:
    """``runs/<run>/<stage>/``, created."""
    d = Path(run_dir) / stage
    d.mkdir(parents=True, exist_ok=True)
    return d


def is_done(run_dir: str | os.PathLike, stage: str) -> bool:
    """Whether ``stage`` finished in this run (its DONE marker exists)."""
    return (Path(run_dir) / stage / "DONE").is_file()


def read_done(run_dir: str | os.PathLike, stage: str) -> dict[str, Any]:
    """The metrics a finished stage wrote into its DONE marker."""
    return read_json(Path(run_dir) / stage / "DONE")


def mark_done(run_dir: str | os.PathLike, stage: str, metrics: dict[str, Any] | None = None) -> Path:
    """Write ``<stage>/DONE`` last, atomically, holding the stage's metrics as JSON."""
    return write_json(stage_dir(run_dir, stage) / "DONE", metrics or {})


def clear_stage(run_dir: str | os.PathLike, stage: str) -> None:
    """Remove everything a stage left in ``runs/<run>/<stage>/`` (DONE first) except its LOCK: it starts over."""
    d = Path(run_dir) / stage
    if not d.is_dir():
        return
    (d / "DONE").unlink(missing_ok=True)
    for p in d.iterdir():
        if p.name == "LOCK":
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    fsync_dir(d)


def round_dir(run_dir: str | os.PathLike, r: int) -> Path:
    """``runs/<run>/cls/round<r>/``: one training round of a method that trains in rounds (sc)."""
    return Path(run_dir) / "cls" / f"round{r}"


def require_done_at(stage_path: str | os.PathLike, stage: str, needed_by: str) -> None:
    """As :func:`require_done` for a stage whose outputs live in ``stage_path`` (e.g. a sweep's shared teacher)."""
    from .errors import StageNotDone

    path = Path(stage_path)
    if not (path / "DONE").is_file():
        raise StageNotDone(f"stage {needed_by!r} needs stage {stage!r} in {path} to be finished (no {path / 'DONE'}); "
                           f"run stage={stage} run={path.parent} first")


def require_done(run_dir: str | os.PathLike, stage: str, needed_by: str) -> None:
    """Fail with a clear message (:class:`StageNotDone`, a user error) if an upstream stage has not finished."""
    from .errors import StageNotDone

    if not is_done(run_dir, stage):
        raise StageNotDone(
            f"stage {needed_by!r} needs stage {stage!r} of run {run_dir} to be finished "
            f"(no {Path(run_dir) / stage / 'DONE'}); run stage={stage} first"
        )
