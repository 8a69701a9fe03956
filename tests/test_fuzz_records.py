"""Fuzzing the records the package reads back (DONE, STARTED, model.json, the shard manifest, an output shard's
record, a confusion matrix, config.yaml): truncation, bit flips and type swaps each end in a one-line user error, a
rerun that repairs, or a counted skip, never a traceback or a hang (issue 26 #8)."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from conftest import SHORT
from wsss_dist import pipeline
from wsss_dist.config import make_config
from wsss_dist.errors import UserError

WORDS = [*SHORT, "cls.train.steps=4", "cam.scales=[1.0]"]  # what is read back matters, not how much was trained


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    words = WORDS + [f"data.shards_dir={root / 'shards'}", f"data.toy.root={root / 'src'}", f"run={root / 'run'}"]
    pipeline.run(make_config(words + ["stage=[shards,cls,cam]", "method=cam"]))
    return root, words


def _mutations(data: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    out = [("empty", b""), ("truncated", data[: rng.randrange(1, max(2, len(data)))])]
    flipped = bytearray(data)
    for _ in range(3):
        i = rng.randrange(len(flipped))
        flipped[i] ^= 1 << rng.randrange(8)
    out.append(("bit flips", bytes(flipped)))
    try:
        value = json.loads(data)
    except ValueError:
        return out
    out += [("a list", b"[]"), ("a string", b'"x"'), ("a number", b"7")]
    if isinstance(value, dict):
        for k in list(value)[:4]:  # each field swapped for another JSON type
            out.append((f"{k} as a list", json.dumps({**value, k: [1, "a"]}).encode()))
            out.append((f"{k} as a number", json.dumps({**value, k: 3}).encode()))
    return out


def _files(root: Path) -> list[Path]:
    run, shards = root / "run", root / "shards"
    cam = sorted((run / "cam").glob("*.tar"))[0]
    return [run / "cls" / "DONE", run / "cam" / "DONE", run / "cam" / "STARTED", run / "cls" / "model.json",
            shards / "manifest.json", cam.with_name(cam.name + ".json"), cam.with_name(cam.name + ".cm.npy"),
            run / "config.yaml"]


@pytest.mark.slow  # a trained run, then every damaged record through the stages
def test_damaged_records_end_in_one_line_or_a_repair(done):
    """Every mutation of every record: `stage=[cls,cam]` (it reads them all) ends normally or in one UserError line."""
    root, words = done
    rng = random.Random(0)
    seen = []
    for path in _files(root):
        original = path.read_bytes()
        backup = root / "backup"
        shutil.rmtree(backup, ignore_errors=True)
        shutil.copytree(root / "run", backup / "run")
        shutil.copytree(root / "shards", backup / "shards", ignore=shutil.ignore_patterns("src"))
        for what, data in _mutations(original, rng):
            path.write_bytes(data)
            try:
                pipeline.run(make_config(words + ["stage=[cls,cam]", "method=cam"]))
                seen.append((path.name, what, "ran"))
            except UserError as e:
                assert "\n" not in str(e) and str(e), (path, what, str(e))
                seen.append((path.name, what, "one line"))
            except Exception as e:  # noqa: BLE001 - the failure this test looks for
                pytest.fail(f"{path} {what}: {type(e).__name__}: {e}")
            finally:  # back to the intact run
                shutil.rmtree(root / "run")
                shutil.copytree(backup / "run", root / "run")
                for f in (backup / "shards").iterdir():
                    shutil.copy2(f, root / "shards" / f.name)
    assert len(seen) >= 40 and {s[2] for s in seen} == {"ran", "one line"}


def test_damaged_mxnet_params_end_in_one_error_never_a_traceback(tmp_path):
    """psa's MXNet ``.params`` (read without mxnet): 300 seeded mutations of a small valid file — truncations, bit
    flips, overflowing, negative and huge shapes, bad name lengths, non-UTF-8 names — each reads back or raises the
    package's MXNetFormatError (a WeightsError: one line), never another exception or a huge allocation."""
    import struct

    import numpy as np

    from wsss_dist.models.mxnet_params import MXNetFormatError, read_params
    from test_weights import _write_params

    good = tmp_path / "good.params"
    _write_params(good, [("arg:conv1a_weight", np.ones((4, 3, 3, 3), np.float32)),
                         ("aux:bn7_moving_mean", np.arange(5, dtype=np.float32))])
    data = good.read_bytes()
    assert set(read_params(good)) == {"arg:conv1a_weight", "aux:bn7_moving_mean"}
    rng = random.Random(0)
    shape_at = 24 + 4 + 4 + 4  # list header (3 × uint64), magic, storage type, ndim: the first dim (int64)
    cases = [("shape 2**62", data[:shape_at] + struct.pack("<q", 2**62) + data[shape_at + 8:]),
             ("shape -1", data[:shape_at] + struct.pack("<q", -1) + data[shape_at + 8:]),
             ("count 2**40", data[:16] + struct.pack("<Q", 2**40) + data[24:]),
             ("name length 2**60", data[:-len("aux:bn7_moving_mean") - 8] + struct.pack("<Q", 2**60) + b"aux"),
             ("name not UTF-8", data[:-2] + b"\xff\xfe")]
    for i in range(300):
        if i % 2:
            cases.append(("truncated", data[: rng.randrange(len(data))]))
        else:
            b = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            cases.append(("bit flips", bytes(b)))
    outcomes = {"read": 0, "refused": 0}
    for what, blob in cases:
        path = tmp_path / "m.params"
        path.write_bytes(blob)
        try:
            read_params(path)
            outcomes["read"] += 1
        except MXNetFormatError as e:
            assert str(path) in str(e) and "\n" not in str(e).strip(), (what, str(e))
            outcomes["refused"] += 1
    assert outcomes["refused"] >= 150, outcomes  # most mutations are caught, none escapes as another exception
