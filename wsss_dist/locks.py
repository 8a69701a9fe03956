"""One owner per (run, stage): ``runs/<run>/<stage>/LOCK``, created atomically with ``os.link`` (no fcntl/flock).

A starter writes its record ({host, pid, job, started, heartbeat}) to a unique file beside ``LOCK`` and links it
to ``LOCK``: the link fails when ``LOCK`` exists, atomically, also on NFS. While held, a daemon thread touches
``LOCK`` (its mtime is the heartbeat; the file is never rewritten, so a late holder cannot clobber a lock taken
over meanwhile). A lock whose holder is gone (same host and a dead pid, a heartbeat older than ``stale_s``, or our
own SLURM job id: a requeued job) is taken over (removed under ``LOCK.break``, then linked again); any other lock
refuses the start with :class:`StageLocked`.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from . import runs
from .errors import StageLocked

logger = logging.getLogger(__name__)

LOCK = "LOCK"
STALE_S = 300.0  # a heartbeat older than this: the holder is gone
ATTEMPTS = 5  # link attempts (each stale lock taken over costs one)
BREAK_WAIT_S = 10.0  # how long a take-over or release waits for another one's ``LOCK.break``
BREAK_STALE_S = 60.0  # a ``LOCK.break`` older than this was left by a killed process


def _side(path: Path, kind: str) -> Path:
    """A unique name beside ``path`` (not ``.*.tmp-*``: runs.remove_stale_tmp must not delete it while in use)."""
    return path.with_name(f".{path.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def _link(src: Path, dst: Path) -> bool:
    """Link ``src`` to ``dst``; False when ``dst`` exists. An error after a link that worked (NFS retrying a request
    whose reply was lost) counts as success: ``src``'s link count is 2."""
    try:
        os.link(src, dst)
        return True
    except FileExistsError:
        return os.stat(src).st_nlink == 2
    except OSError:
        if os.stat(src).st_nlink == 2:
            return True
        raise  # e.g. a file system without hard links


def _remove_if(path: Path, expected: bytes) -> bool:
    """Remove ``path`` if it still holds ``expected``; whether it did.

    Race-free: the check and the unlink happen while holding ``<path>.break`` (made with the same link), so two
    processes taking over one stale lock never remove each other's new one. A ``.break`` older than
    :data:`BREAK_STALE_S` was left by a killed process (it is held for microseconds) and is removed.
    """
    guard = path.with_name(path.name + ".break")
    tmp = _side(path, "break")
    tmp.write_bytes(expected)
    try:
        deadline = time.monotonic() + BREAK_WAIT_S
        while not _link(tmp, guard):
            try:
                if time.time() - guard.stat().st_mtime > BREAK_STALE_S:
                    logger.warning("removing %s, left by a killed process", guard)
                    guard.unlink(missing_ok=True)
                    continue
            except FileNotFoundError:
                continue
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        try:
            if path.read_bytes() != expected:
                return False
            path.unlink()
            runs.fsync_dir(path.parent)
            return True
        except FileNotFoundError:
            return False
        finally:
            guard.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (another user's counts; a zombie — killed, not yet reaped by its
    parent, e.g. an orphaned job after ``kill -9`` of its launcher, until init reaps it — does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: the state letter after the command name's closing parenthesis
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:  # ended meanwhile, or no /proc at all (macOS: kill(0) said it exists)
        return not Path("/proc/self/stat").exists()
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


class StageLock:
    """Context manager: hold ``runs/<run>/<stage>/LOCK`` while a stage runs; :class:`StageLocked` if another holds it."""

    def __init__(self, run_dir: str | os.PathLike, stage: str, stale_s: float = STALE_S) -> None:
        self.path = Path(run_dir) / stage / LOCK
        self.stage = stage
        self.stale_s = float(stale_s)
        self.host = socket.gethostname()
        self.job = os.environ.get("SLURM_JOB_ID") or None
        self._mine: bytes | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "StageLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        """Create LOCK (taking over a stale one) and start the heartbeat; StageLocked when a live holder has it."""
        runs.stage_dir(self.path.parent.parent, self.stage)
        now = time.time()
        record = {"host": self.host, "pid": os.getpid(), "job": self.job, "started": now, "heartbeat": now}
        mine = (json.dumps(record, sort_keys=True) + "\n").encode()
        tmp = _side(self.path, "new")
        try:
            tmp.write_bytes(mine)
            for _ in range(ATTEMPTS):
                if _link(tmp, self.path):
                    break
                self._take_over_or_refuse()
            else:
                raise StageLocked(f"stage {self.stage}: could not create {self.path} after {ATTEMPTS} attempts "
                                  "(other starters keep taking it); try again")
        finally:
            tmp.unlink(missing_ok=True)
        runs.fsync_dir(self.path.parent)
        self._mine = mine
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lock-{self.stage}", daemon=True)
        self._thread.start()
        logger.debug("stage %s: holding %s", self.stage, self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove LOCK if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._mine is not None and not _remove_if(self.path, self._mine):
            logger.warning("stage %s: %s was no longer ours at release (taken over as stale?); left in place",
                           self.stage, self.path)
        self._mine = None

    def _take_over_or_refuse(self) -> None:
        """LOCK exists: remove it if its holder is gone (logged), else raise StageLocked naming the holder."""
        try:
            data = self.path.read_bytes()
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:  # released meanwhile: link again
            return
        try:
            holder = json.loads(data)
            holder = holder if isinstance(holder, dict) else {}
        except ValueError:
            holder = {}
        beat = holder.get("heartbeat")
        age = max(0.0, time.time() - max(mtime, beat if isinstance(beat, (int, float)) else 0.0))
        why = self._gone(holder, age)
        who = (f"host {holder.get('host', '?')} pid {holder.get('pid', '?')} job {holder.get('job') or 'none'}, "
               f"heartbeat {age:.0f} s ago")
        if why is None:
            raise StageLocked(f"stage {self.stage} of run {self.path.parent.parent} is running elsewhere ({who}; lock "
                              f"{self.path}); wait for it to end, or delete {self.path} if that process is gone")
        if _remove_if(self.path, data):
            logger.warning("stage %s: taking over %s (%s; %s)", self.stage, self.path, who, why)

    def _gone(self, holder: dict, age: float) -> str | None:
        """Why the holder of a lock is gone, or None while it may be alive."""
        pid = holder.get("pid")
        if holder.get("host") == self.host and isinstance(pid, int) and not _alive(pid):
            return f"pid {pid} is not running on this host"
        if age > self.stale_s:
            return f"heartbeat older than {self.stale_s:.0f} s"
        if self.job is not None and holder.get("job") == self.job:
            return f"our own SLURM job {self.job}, requeued"
        return None

    def _beat(self) -> None:
        """Touch LOCK every stale_s/4 while it is ours."""
        while not self._stop.wait(self.stale_s / 4):
            try:
                if self.path.read_bytes() != self._mine:
                    logger.error("stage %s: %s is no longer ours (taken over?); another process may run this stage",
                                 self.stage, self.path)
                    return
                os.utime(self.path)
            except OSError as e:
                logger.warning("stage %s: heartbeat of %s failed (%s)", self.stage, self.path, e)
