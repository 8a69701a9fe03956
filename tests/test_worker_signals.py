"""Reader workers and the stop signals: a signal to the process group while the workers are being forked stops the
stage gracefully (the workers never die of it), and a reader left open by an error never hangs the process's exit.
Both were found by tests/test_chaos.py (a SIGTERM while stage seg forked its readers: "DataLoader worker … exited
unexpectedly", and then the job hung at exit waiting for the other worker)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # processes with reader workers, signals to their group

RACE = """
    import os, signal, sys
    from wsss_dist.data.readers import shard_samples
    from wsss_dist.data.shards import split_urls

    got = []
    signal.signal(signal.SIGTERM, lambda *a: got.append(1))  # the stage's graceful stop, as the trainer's handler
    urls = split_urls(sys.argv[1], "train_aug")
    whole = sum(1 for _ in shard_samples(urls, ("jpg",), num_workers=2))  # samples and shard-end markers
    counts = set()
    for _ in range({rounds}):
        reader = shard_samples(urls, ("jpg",), num_workers=2)
        os.killpg(0, signal.SIGTERM)  # at once: the workers may still be starting
        counts.add(sum(1 for _ in reader))
        reader.close()
    print("rounds", {rounds}, "signals", len(got), "all read", counts == {{whole}})
"""

LEFT_OPEN = """
    import sys
    from wsss_dist.data.readers import shard_samples
    from wsss_dist.data.shards import split_urls

    reader = shard_samples(split_urls(sys.argv[1], "train_aug"), ("jpg",), num_workers=2)
    next(reader)  # workers running, the reader referenced until exit
    raise RuntimeError("boom in the stage")
"""


def _run(script: str, shards: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(shards)], capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)  # its own process group: killpg(0) hits only it


def test_a_group_signal_while_reader_workers_start_reaches_only_the_main_process(toy_shards):
    """SIGTERM to the group right after each of 8 readers forks its 2 workers: every reader reads all its samples,
    the main process's handler gets all 8 signals, no worker dies of one (without the held signals most rounds
    ended in "DataLoader worker … is killed by signal: Terminated")."""
    r = _run(RACE.format(rounds=8), toy_shards, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rounds 8 signals 8 all read True" in r.stdout, r.stdout + r.stderr[-3000:]


def test_a_reader_left_open_by_an_error_does_not_hang_the_exit(toy_shards):
    """An exception with a reader's workers still running (its traceback keeps the reader): the process exits with
    the error at once instead of waiting forever for workers that ignore multiprocessing's SIGTERM at exit."""
    r = _run(LEFT_OPEN, toy_shards, timeout=120)
    assert r.returncode == 1 and "RuntimeError: boom in the stage" in r.stderr, r.stderr[-3000:]
