"""No silently wrong results: every output knows what it was made from (data settings, shard content, upstream
outputs, the config keys that shape it), and a changed input or setting is never ignored."""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss_dist import fingerprints, pipeline, runs
from wsss_dist.config import make_config
from wsss_dist.data.shards import MANIFEST, record_path, split_urls
from wsss_dist.errors import DataError, RunConfigChanged
from wsss_dist.launcher import shards_jobs

TINY = ["data.toy.n_train=12", "data.toy.n_val=6", "data.toy.n_sbd=6", "data.toy.size=40", "data.shard_size=6",
        "data.num_workers=0", "model.backbone=resnet18", "cls.train.steps=4", "cls.train.batch_size=4",
        "cls.train.crop=40", "cls.train.resize_long=[36,44]", "cam.scales=[1.0]", "cam.flip=false"]


def test_each_data_setting_gets_its_own_shards_folder(tmp_path):
    """Finding 1: runs with other data settings never share the default shards folder; equal settings do."""
    a = make_config(["data.toy.n_train=20"])
    b = make_config(["data.toy.n_train=30"])
    c = make_config(["data.toy.n_train=20", "run=elsewhere", "cls.train.steps=7", "data.num_workers=0"])
    assert a.shards_dir != b.shards_dir and a.shards_dir == c.shards_dir
    assert a.shards_dir.name.startswith("toy-") and a.toy_root == a.shards_dir / "src"
    assert make_config(["data.toy.root=/x"]).shards_dir == a.shards_dir.with_name(make_config([]).shards_dir.name)


@pytest.mark.slow
def test_a_shards_folder_of_other_data_settings_is_refused_not_rebuilt(tmp_path):
    """Finding 1: a second run pointed at the first run's folder with other data settings fails in one line and
    leaves the first run's shards as they are."""
    shared = [f"data.shards_dir={tmp_path / 'shards'}", f"data.toy.root={tmp_path / 'src'}"]
    first = subprocess.run([sys.executable, "-m", "wsss_dist", *TINY, *shared, f"run={tmp_path / 'a'}", "stage=shards"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "stage shards: starting" in (tmp_path / "a" / "run.log").read_text()  # a log file per run (issue 25 #5)
    before = {p.name: p.read_bytes() for p in (tmp_path / "shards").glob("*.tar")}
    words = TINY + shared + [f"run={tmp_path / 'b'}", "stage=shards", "data.toy.n_train=18"]
    r = subprocess.run([sys.executable, "-m", "wsss_dist", *words], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "holds the shards of other data settings" in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "data.toy.n_train=12 there, 18 here" in last, r.stderr
    assert "generating" not in r.stderr and "Traceback" not in r.stderr  # refused before any work
    assert {p.name: p.read_bytes() for p in (tmp_path / "shards").glob("*.tar")} == before
    with pytest.raises(RunConfigChanged, match="holds the shards of other data settings"):  # and no stage reads them
        pipeline.run(make_config(TINY + shared + [f"run={tmp_path / 'b'}", "stage=cls", "data.toy.n_train=18"]))


def test_a_sweep_over_data_keys_builds_one_shards_job_per_data_setting():
    """Finding 2: points with other data settings get their own shared shards job; points with equal ones share."""
    cfgs = [make_config(w) for w in (["data.toy.n_train=20", "method=cam"], ["data.toy.n_train=30", "method=cam"],
                                     ["data.toy.n_train=20", "method=fmix"])]
    jobs = shards_jobs(cfgs)
    assert list(jobs.values()) == [0, 1] and all(n.startswith("shards-toy-") for n in jobs)
    assert shards_jobs(cfgs[:1] + cfgs[2:]) == {"shards": 0}


@pytest.mark.slow
def test_a_sweep_over_data_keys_runs_each_point_on_its_own_data(tmp_path):
    """Finding 2 end to end: ``data.toy.n_train=[12,18]``: each point's shards hold its own number of images."""
    submit = Path(__file__).resolve().parents[1] / "launch" / "submit.py"
    words = ["stage=[shards]", "data.toy.n_train=[12,18]", "sweep.name=dk", *[w for w in TINY if "n_train" not in w]]
    r = subprocess.run([sys.executable, str(submit), *words], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    jobs = re.findall(r"\[shared (shards-toy-\w+)\] shards: running as local job", r.stdout)  # progress lines aside
    assert len(jobs) == len(set(jobs)) == 2 and r.stdout.count("] shards: done") == 2, r.stdout
    for n in (12, 18):
        cfg = make_config([*words[2:], f"data.toy.n_train={n}"])
        manifest = json.loads((tmp_path / cfg.shards_dir / MANIFEST).read_text())
        assert manifest["splits"]["train"]["total"] == n and manifest["data"]["data.toy.n_train"] == n


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """A run with shards, cls and cam done (its own shards folder), to copy."""
    root = tmp_path_factory.mktemp("fp")
    words = TINY + [f"data.shards_dir={root / 'shards'}", f"data.toy.root={root / 'src'}", f"run={root / 'run'}"]
    pipeline.run(make_config(words + ["stage=[shards,cls,cam]"]))
    return root, words


def _copy(done_run, tmp_path) -> list[str]:
    import shutil

    root, words = done_run
    for name in ("shards", "src", "run"):
        shutil.copytree(root / name, tmp_path / name)
    return [w.replace(str(root), str(tmp_path)) for w in words]


def test_done_records_what_it_was_made_from(done_run, tmp_path):
    words = _copy(done_run, tmp_path)
    cfg = make_config(words + ["stage=cam"])
    cam = fingerprints.recorded(cfg.run_dir / "cam")
    assert cam["settings"]["cam.bg_threshold"] == 0.15 and "cam.batch_images" not in cam["settings"]
    assert cam["inputs"]["shards"] == fingerprints.manifest_digest(cfg.shards_dir)
    assert cam["inputs"]["cls"] == fingerprints.recorded(cfg.run_dir / "cls")["output"] is not None
    assert cam["output"] == fingerprints.output_digest(cfg.run_dir / "cam")
    assert fingerprints.recorded(cfg.run_dir / "cls")["settings"]["cls.train.steps"] == 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(cfg.run_dir / "cam" / "tb"))
    tb.Reload()  # the CAM mIoU and per-class IoU reach TensorBoard (issue 25 #5)
    assert tb.Scalars("cam/miou")[0].value == pytest.approx(runs.read_done(cfg.run_dir, "cam")["miou"])
    assert "cam/iou/background" in tb.Tags()["scalars"]
    env = runs.read_json(cfg.run_dir / "cls" / "environment.json")  # what it ran with (issue 25 #5)
    assert env["versions"]["torch"] and env["world_size"] == 1 and env["gpus_used"] == 0 and env["argv"]
    if (Path(__file__).resolve().parents[1] / ".git").exists():  # a checkout: the commit is recorded
        assert len(env["git"]["commit"]) == 40 and isinstance(env["git"]["dirty"], bool)


@pytest.mark.slow
def test_a_changed_setting_on_a_finished_stage_is_a_one_line_error_and_redo_runs_it(done_run, tmp_path):
    """A run is its config (issue 25 #1): other values of a finished stage's keys stop the run before any work and
    name the keys and the two ways on; ``redo=cam`` runs it with them; operational keys change nothing."""
    words = _copy(done_run, tmp_path)
    with pytest.raises(RunConfigChanged, match=r"stage cam with other settings \(cam.bg_threshold: 0.15 → 0.3\).*"
                                               r"run=NAME.*redo=cam"):
        pipeline.run(make_config(words + ["stage=[cls,cam]", "cam.bg_threshold=0.3"]))
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "launch" / "submit.py"), *words,
                        "stage=[cls,cam]", "cls.train.steps=5"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "cls.train.steps: 4 → 5" in r.stderr and "redo=cls" in r.stderr, r.stdout + r.stderr
    assert "running" not in r.stdout  # refused before any job
    out = pipeline.run(make_config(words + ["stage=[cls,cam]", "cam.batch_images=2", "data.num_workers=1"]))
    assert out["cam"]["seconds"] == runs.read_done(tmp_path / "run", "cam")["seconds"]  # skipped: nothing changed
    redone = pipeline.run(make_config(words + ["stage=[cls,cam]", "cam.bg_threshold=0.3", "redo=cam"]))
    assert redone["cam"]["fingerprint"]["settings"]["cam.bg_threshold"] == 0.3
    assert runs.read_done(tmp_path / "run", "cam")["fingerprint"]["settings"]["cam.bg_threshold"] == 0.3


def test_outputs_made_from_rebuilt_shards_are_redone(done_run, tmp_path, caplog):
    """Finding 3: after an image was fixed and the shards rebuilt, the CAM shard made from the old input shard is not
    kept: stage=cam runs again from scratch, and stage=cls too (it trained on the old images)."""
    words = _copy(done_run, tmp_path)
    cfg = make_config(words + ["stage=shards"])
    assert pipeline.stage_action(make_config(words + ["stage=[shards,cls,cam]"]), "shards")[0] == "skip"
    manifest = json.loads((cfg.shards_dir / MANIFEST).read_text())
    key = manifest["splits"]["train_aug"]["ids"][0]
    jpg = next(Path(cfg.toy_root).rglob(f"{key}.jpg"))
    img = np.asarray(Image.open(jpg)).copy()
    img[:8, :8] = 255 - img[:8, :8]  # "fix" the image
    Image.fromarray(img).save(jpg, quality=95)
    pipeline.run(cfg)  # stage=shards: rebuilds
    new = json.loads((cfg.shards_dir / MANIFEST).read_text())
    changed = [n for n, sha in new["splits"]["train_aug"]["sha256"].items()
               if manifest["splits"]["train_aug"]["sha256"][n] != sha]
    assert changed == [new["splits"]["train_aug"]["shards"][0]]
    out = pipeline.run(make_config(words + ["stage=cam"]))
    rec = runs.read_json(record_path(cfg.run_dir / "cam" / changed[0]))
    assert rec["input_sha256"] == new["splits"]["train_aug"]["sha256"][changed[0]]
    assert "stage cam: made from other inputs than now (shards changed since): running it again from scratch" \
        in caplog.text
    assert out["cam"]["fingerprint"]["inputs"]["shards"] == fingerprints.manifest_digest(cfg.shards_dir)
    assert pipeline.stage_action(make_config(words + ["stage=cls"]), "cls")[0] == "restart"  # cls is stale too
    assert pipeline.stage_action(make_config(words + ["stage=[cam,aff]"]), "cam")[0] == "skip"


def test_output_records_cannot_be_removed_or_altered_without_notice(done_run, tmp_path):
    """Finding 4: a deleted record is an error naming how to regenerate (never a silent pass); an edited confusion
    matrix is detected by its checksum; following the advice (stage=cam) repairs both, with the same mIoU."""
    words = _copy(done_run, tmp_path)
    cfg = make_config(words + ["stage=cam"])
    miou = runs.read_done(cfg.run_dir, "cam")["miou"]
    cam = cfg.run_dir / "cam"
    first, second = [Path(u).name for u in split_urls(cfg.shards_dir, "train_aug")][:2]
    record_path(cam / first).unlink()
    from wsss_dist.data.shards import read_shard

    with pytest.raises(DataError, match=r"record .* is missing.*run stage=cam again"):
        list(read_shard(str(cam / first), ("cam.npz",)))
    cm = cam / f"{second}.cm.npy"
    m = np.load(cm)
    original = m.copy()
    m[0, 0] += 1000
    np.save(cm, m)
    from wsss_dist.engine.infer import _gather

    with pytest.raises(DataError, match=r"record train_aug-000000.tar.json is missing; run stage=cam again"):
        _gather(cam, split_urls(cfg.shards_dir, "train_aug"))
    with pytest.raises(DataError, match=r"cm.npy: .*differs from the sha256 in its record.*stage=cam"):
        _gather(cam, split_urls(cfg.shards_dir, "train_aug")[1:])
    out = pipeline.run(copy.deepcopy(cfg))  # the advice: stage=cam redoes exactly those shards
    assert record_path(cam / first).is_file() and out["cam"]["miou"] == miou
    assert np.array_equal(np.load(cm), original)


def test_the_advice_for_a_broken_trained_model_works_when_followed_literally(done_run, tmp_path):
    """Finding 6: a damaged ``cls/model.safetensors`` names ``redo=cls``; running exactly that retrains cls (the
    same model: a deterministic rerun), after which the next stage runs again; no DONE is deleted by hand."""
    import re

    from wsss_dist.errors import WeightsError

    words = _copy(done_run, tmp_path)
    weights = tmp_path / "run" / "cls" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(WeightsError) as e:
        pipeline.run(make_config(words + ["stage=cam"]))
    advice = re.search(r"run stage (\w+) again with (redo=\w+)", str(e.value))
    assert advice and advice.groups() == ("cls", "redo=cls"), str(e.value)
    pipeline.run(make_config(words + [f"stage={advice.group(1)}", advice.group(2)]))
    assert weights.read_bytes() == good  # retrained bitwise equal
    out = pipeline.run(make_config(words + ["stage=cam"]))
    assert out["cam"]["miou"] == runs.read_done(done_run[0] / "run", "cam")["miou"]
