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


def repair_advice(path: str | os.PathLike) -> str:
    """What to do about a damaged file that a stage wrote: run that stage again with ``redo=`` (it starts over)."""
    from .config import STAGES

    p = Path(path)
    if p.name == "manifest.json":
        return "delete it and run stage=shards again (it verifies the shards and rebuilds what differs)"
    stage = next((d for d in reversed(p.parent.parts) if d in STAGES), None)
    if stage is None:
        return "restore it, or delete it and run the stage that wrote it again"
    return f"run stage={stage} again with redo={stage} (it starts {stage} over; the stages after it follow)"


def damaged(path: str | os.PathLike, what: str, advice: str | None = None) -> Exception:
    """The one-line error for a damaged file: its path, what is wrong, what to do (:func:`repair_advice`)."""
    from .errors import DamagedFile

    return DamagedFile(f"{path}: damaged file ({what}); {advice or repair_advice(path)}")


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | os.PathLike, expect: type | None = None) -> Any:
    """Read a JSON file (holding an ``expect``, e.g. dict, when given); DamagedFile (a DataError and a ValueError)
    naming the file, what is wrong and what to do when it is not UTF-8, not JSON or of another type."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise damaged(path, f"not UTF-8 text: byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise damaged(path, f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise damaged(path, "not valid JSON: nested too deeply") from None
    if expect is not None and not isinstance(value, expect):
        raise damaged(path, f"holds a JSON {type(value).__name__}, not a {'mapping' if expect is dict else expect.__name__}")
    return value


def read_npz(path: str | os.PathLike, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """The arrays of an ``.npz`` written by :func:`write_npz` (no pickles), all read now; DamagedFile naming the file
    when it is not a readable npz or lacks one of ``keys``."""
    import zipfile
    import zlib

    import numpy as np

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise damaged(path, f"not a readable npz: {_first_line(e)}") from None
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise damaged(path, f"no array {missing[0]!r} (holds {', '.join(arrays) or 'none'})")
    return arrays


def read_npy(path: str | os.PathLike) -> Any:
    """One array of an ``.npy`` written by :func:`write_npy` (no pickles); DamagedFile naming the file when it is not
    a readable npy."""
    import numpy as np

    path = Path(path)
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as e:
        raise damaged(path, f"not a readable npy: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[0][:200] if lines else type(e).__name__


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
    return read_json(Path(run_dir) / stage / "DONE", expect=dict)


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
