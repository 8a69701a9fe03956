"""Shared fixtures: a tiny toy dataset in the VOC/SBD layout and its shards (built once per test session)."""
from __future__ import annotations

from pathlib import Path

import pytest

from wsss_dist.config import ToyCfg

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
if not FIXTURES.is_dir():  # tests run from a checkout next to ../shared, or from /work/main
    FIXTURES = Path("/work/shared/fixtures")
VOC_MINI = FIXTURES / "voc_mini"
VOC_LISTS = FIXTURES / "voc_lists"

TINY_TOY = dict(seed=0, n_train=24, n_val=16, n_sbd=16, size=48)  # train_aug = 40, val = 16
TINY_SHARD_SIZE = 6


@pytest.fixture(scope="session")
def toy_cfg(tmp_path_factory) -> ToyCfg:
    """The tiny toy config (root in a session temp dir)."""
    return ToyCfg(root=str(tmp_path_factory.mktemp("toy-src")), **TINY_TOY)


@pytest.fixture(scope="session")
def toy_data(toy_cfg) -> tuple[Path, Path]:
    """(voc_root, sbd_root) of the tiny toy dataset."""
    from wsss_dist.data.toy import generate

    return generate(Path(toy_cfg.root), toy_cfg)


@pytest.fixture(scope="session")
def toy_source(toy_data):
    """A VOCSource over the tiny toy dataset."""
    from wsss_dist.data.voc import VOCSource

    return VOCSource(*toy_data)


@pytest.fixture(scope="session")
def toy_shards(toy_source, tmp_path_factory) -> Path:
    """Shards (train, val, train_aug; 6 samples per shard) of the tiny toy dataset; treat as read-only."""
    from wsss_dist.data.shards import build_shards

    out = tmp_path_factory.mktemp("toy-shards")
    build_shards(toy_source, out, shard_size=TINY_SHARD_SIZE, progress=False)
    return out


def raw_samples(url: str | Path) -> list[dict]:
    """A shard's samples as raw member bytes, in order (tests that rewrite shards by hand)."""
    import tarfile

    out: dict[str, dict] = {}
    with tarfile.open(url) as tf:
        for m in tf:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {"__key__": key})[ext] = tf.extractfile(m).read()
    return list(out.values())
