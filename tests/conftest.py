"""Shared fixtures: a tiny toy dataset in the VOC/SBD layout and its shards (built once per test session), and where
the real VOC fixture files are (``WSSS_FIXTURES``; tests that need them skip without them)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from wsss_dist.config import ToyCfg


def fixtures_dir() -> Path | None:
    """The real VOC fixture files (voc_mini, voc_lists, voc_real): ``$WSSS_FIXTURES`` (.ci/run sets it), else
    ``../shared/fixtures`` next to this checkout; None when neither is a folder."""
    env = os.environ.get("WSSS_FIXTURES")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "fixtures"
    return path if path.is_dir() else None


FIXTURES = fixtures_dir()
NO_FIXTURES = ("no real VOC fixtures: set WSSS_FIXTURES to the folder holding voc_mini and voc_lists"
               + (f" (WSSS_FIXTURES={os.environ['WSSS_FIXTURES']} is not a folder)" if os.environ.get("WSSS_FIXTURES") else ""))
needs_fixtures = pytest.mark.skipif(FIXTURES is None, reason=NO_FIXTURES)
VOC_MINI = (FIXTURES or Path("WSSS_FIXTURES-unset")) / "voc_mini"  # read only by tests marked needs_fixtures
VOC_LISTS = (FIXTURES or Path("WSSS_FIXTURES-unset")) / "voc_lists"

TINY_TOY = dict(seed=0, n_train=24, n_val=16, n_sbd=16, size=48)  # train_aug = 40, val = 16
TINY_SHARD_SIZE = 6
# the stages end to end on a tiny toy dataset (tests/test_pipeline.py and every test that runs stages on `shards`)
TINY = [
    "data.toy.n_train=24", "data.toy.n_val=12", "data.toy.n_sbd=24", "data.toy.size=48", "data.shard_size=12",
    "data.num_workers=0", "model.backbone=resnet18",
    "cls.train.steps=12", "cls.train.batch_size=8", "cls.train.crop=48", "cls.train.resize_long=[40,56]",
    "cls.train.ckpt_every=6", "cls.train.log_every=4", "cls.sc_rounds=2",
    "teacher.arch=vit_tiny_patch16_224", "teacher.img_size=32", "teacher.train.steps=4", "teacher.train.batch_size=8",
    "teacher.train.crop=32",
    "cam.scales=[1.0,0.5]",
    "aff.train.steps=6", "aff.train.batch_size=4", "aff.train.crop=48", "aff.radius=3", "pseudo.radius=3",
    "seg.train.steps=6", "seg.train.batch_size=4", "seg.train.crop=48", "seg.eval_scales=[1.0,0.5]",
    "pseudo.logt=4",
]
# TINY with half the images and steps: for tests of orchestration (sweeps, a killed chain), whose behaviour does not
# depend on how long each stage trains; train_aug = 24 images in 4 shards, val = 6
SHORT = [*TINY, "data.toy.n_train=12", "data.toy.n_val=6", "data.toy.n_sbd=12", "data.shard_size=6", "cls.train.steps=6",
         "cls.train.ckpt_every=3", "aff.train.steps=3", "seg.train.steps=3"]


def pytest_report_header(config) -> str:
    """The CPU the suite runs on, in the header: suite times compare only between machines of one kind (a 2-core
    AVX2-only machine takes about twice as long as an AVX-512 one; docs/performance.md)."""
    import contextlib
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
                break
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), "no AVX2")
    return f"cpu: {model}, {os.cpu_count()} CPUs, {isa}"


def pytest_configure(config) -> None:
    """Under pytest-xdist (``-n auto``, the default in pyproject.toml) each worker runs torch on one thread: the
    workers share the cores, and several threads per worker on tiny tensors only contend. Set before torch is
    imported; the stage jobs the tests start inherit it."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = "1"


# test modules whose module-scoped fixtures train or run a chain: their tests stay on one xdist worker, so that the
# fixture runs once (the other modules' tests are spread one by one); test_slurm.py's tests are one group too (one
# worker queues them on the single-node cluster while the others compute)
ONE_WORKER_MODULES = ("test_slurm", "test_pipeline", "test_rehearsal", "test_infer", "test_preempt", "test_reliability",
                      "test_clip_es", "test_damaged", "test_fingerprints", "test_fuzz_records", "test_models",
                      "test_pretrained_real", "test_weights")


def work_unit(nodeid: str) -> str:
    """The xdist work unit of a test: its module for the modules above, else the test itself."""
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
    return module if module in ONE_WORKER_MODULES else nodeid


def slurm_reason() -> str | None:
    """Why the SLURM tests cannot run here (no client on PATH, no controller answering), or None when they can."""
    import shutil
    import subprocess

    if not (shutil.which("sinfo") and shutil.which("srun") and shutil.which("sbatch")):
        return "no SLURM client (sinfo/srun/sbatch) on PATH; start one with: bash .ci/slurm_up.sh"
    try:
        r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol ping failed: {e}"
    if r.returncode != 0 or "UP" not in r.stdout:
        return f"no SLURM controller answers (scontrol ping: {r.stdout.strip() or r.stderr.strip()}); start one with: bash .ci/slurm_up.sh"
    return None


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per core, and one more when the SLURM tests run (:func:`slurm_reason`): the worker
    holding test_slurm.py mostly waits on the scheduler (sleeping fake stages, job starts), which left 20-45 % of a
    2-core machine idle for the first minutes (docs/performance.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if config.getoption("markexpr", ""):  # -m ...: the quick loop, no SLURM tests
        return cores
    return cores + (slurm_reason() is None)


def pytest_xdist_make_scheduler(config, log):
    """Schedule by :func:`work_unit` (xdist's own ``--dist loadgroup`` reads marks through ``item._nodeid``, which
    pytest ≥ 9.2 no longer uses for ``nodeid``: its groups would silently be single tests)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return GroupScheduling(config, log)


# the longest work units after test_slurm (seconds of a quiet 2-core AVX-512 run with 3 workers, 2026-12-06;
# docs/performance.md): within their rank they go first, longest first, so that no worker starts one of them when the
# others are nearly done. Only the order depends on these numbers; a stale one costs a little wall time, never a result.
UNIT_SECONDS = {"tests/test_sweep.py::test_local_sweep_two_methods_two_seeds_reports_mean_and_std": 166,
                "test_rehearsal": 109, "test_reliability": 95, "test_preempt": 73,
                "tests/test_distributed.py::test_one_and_two_processes_end_with_the_same_cam_miou": 65,
                "test_pipeline": 56, "tests/test_chaos.py::test_chain_survives_random_kill_9": 53, "test_fuzz_records": 50,
                "tests/test_distributed.py::test_one_and_two_processes_see_the_same_global_batch": 36,
                "test_damaged": 26}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """The SLURM tests first, then the groups and tests with a slow one (the longest first), then the rest: the
    workers take the work units in this order, so that they end together instead of one waiting for the last long
    test."""
    def rank(item) -> int:
        return 0 if item.get_closest_marker("slurm") else 1 if item.get_closest_marker("slow") else 2

    group_rank: dict[str, int] = {}  # a group goes where its most urgent test would
    for item in items:
        g = work_unit(item.nodeid)
        group_rank[g] = min(group_rank.get(g, 9), rank(item))
    items.sort(key=lambda it: (group_rank[work_unit(it.nodeid)], -UNIT_SECONDS.get(work_unit(it.nodeid), 0)))


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


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> list[str]:
    """Config words of the TINY toy dataset and its shards (built once per session; treat the files as read-only:
    tests that break shards copy them first)."""
    from wsss_dist import pipeline
    from wsss_dist.config import make_config

    root = tmp_path_factory.mktemp("toy")
    args = TINY + [f"data.toy.root={root / 'src'}", f"data.shards_dir={root / 'shards'}"]
    pipeline.run(make_config(args + ["stage=shards", f"run={root / 'runs' / 'shards'}"]))
    return args
