"""Sweeps: any key given a list makes a grid of runs under one sweep directory, with one shared shards job and one
report over all points (mean ± std over seeds)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHORT, TINY
from wsss_dist.config import make_config, sweep_points
from wsss_dist.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SUBMIT = ROOT / "launch" / "submit.py"


def test_the_source_reports_grid_expands_to_named_points():
    words = ["stage=all", "method=[cam,mixup,fmix,manifold,sc,teach]", "cls.split=[train,train_aug]",
             "train.seed=[0,1,2]", "cam.scales=[1.0,0.5]"]
    root, points = sweep_points(words)
    assert root == "runs/method-split-seed" and len(points) == 36
    assert points[0].name == "cam-train-s0" and points[-1].name == "teach-train_aug-s2"
    cfg = make_config(list(points[-1].words))
    assert str(cfg.run_dir) == "runs/method-split-seed/teach-train_aug-s2"
    assert (cfg.method, cfg.cls.split, cfg.cam.scales) == ("teach", "train_aug", (1.0, 0.5))  # a list key is no axis
    assert {cfg.cls.train.seed, cfg.aff.train.seed, cfg.seg.train.seed, cfg.teacher.train.seed} == {2}
    assert sweep_points(["method=cam"]) == ("", [])


def test_zip_name_and_errors():
    root, points = sweep_points(["method=[cam,fmix]", "train.seed=[0,1]", "sweep.mode=zip", "sweep.name=pair"])
    assert root == "runs/pair" and [p.name for p in points] == ["cam-s0", "fmix-s1"]
    assert sweep_points(["method=[cam,fmix]", "run=/x/grid"])[1][1].words[-1] == "run=/x/grid/fmix"
    with pytest.raises(ConfigError, match="equal length"):
        sweep_points(["method=[cam,fmix]", "train.seed=[0,1,2]", "sweep.mode=zip"])
    with pytest.raises(ConfigError, match="a list makes a sweep"):
        make_config(["method=[cam,fmix]"])  # one run takes one value


def _report(sweep: Path) -> tuple[str, dict]:
    return (sweep / "report" / "report.md").read_text(), json.loads((sweep / "report" / "results.json").read_text())


@pytest.mark.slow
def test_local_sweep_two_methods_two_seeds_reports_mean_and_std(tmp_path):
    """method=[cam,clip_es] x train.seed=[0,1] (issue 24 #5 and the sweep's mean ± std): four SHORT chains (what a
    sweep does does not depend on how long points train, nor on which classifier methods it holds: tests/test_pipeline.py
    trains each) with a tiny random CLIP; clip_es has no cls stage (no job, no failure); one report with the two
    methods as rows and their CAM, pseudo and val numbers over two seeds."""
    pytest.importorskip("open_clip")
    words = ["stage=all", "method=[cam,clip_es]", "train.seed=[0,1]", "clip.arch=tiny", "clip.weights=random",
             "sweep.name=grid", f"data.shards_dir={tmp_path}/shards", f"data.toy.root={tmp_path}/src", *SHORT,
             "report.num_images=2"]
    r = subprocess.run([sys.executable, str(SUBMIT), *words], cwd=tmp_path, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("[shared] shards: running") == 1  # what the points share runs once
    names = ["cam-s0", "cam-s1", "clip_es-s0", "clip_es-s1"]
    for k, name in enumerate(names, 1):
        first = "cam" if name.startswith("clip_es") else "cls"
        assert f"[point {k}/4] {name}: {first}: running" in r.stdout and f"[point {k}/4] {name}: eval: done" in r.stdout
    assert "clip_es-s0: cls" not in r.stdout and "clip_es-s1: cls" not in r.stdout, r.stdout
    sweep = tmp_path / "runs" / "grid"
    assert not (sweep / "clip_es-s0" / "cls").exists()
    md, res = _report(sweep)
    assert [(g["method"], g["DeepLab (val)"]["n"]) for g in res["groups"]] == [("cam", 2), ("clip_es", 2)]
    for g in res["groups"]:  # (clip_es's DeepLab: 3 steps from random weights, may predict no class right: 0 is a number)
        for t in ("CAM (train)", "after RW (train)", "DeepLab (val)"):
            low = 0 if (g["method"], t) == ("clip_es", "DeepLab (val)") else 1e-9
            assert low <= g[t]["mean"] < 1 and g[t]["std"] is not None and g[t]["std"] >= 0, (g["method"], t, g[t])
    assert res["groups"][0]["CAM (train)"]["std"] > 0  # two seeds of one method really differ
    assert re.search(r"\| cam \| train_aug \| \d+\.\d ± \d+\.\d \(n=2\)", md)
    assert re.search(r"\| clip_es \| [^|]+ \| \d+\.\d ± \d+\.\d \(n=2\) \|", md), md
    for pic in ("bars.png", "iou_cam.png", "iou_pseudo.png", "iou_eval.png", "cams.png", "predictions.png"):
        assert (sweep / "report" / pic).stat().st_size > 5000, pic
    assert {p["name"]: p["status"] for p in res["runs"]} == dict.fromkeys(names, "done")
    again = subprocess.run([sys.executable, str(SUBMIT), *words], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "[shared] shards: skipped (done)" in again.stdout, again.stdout
    assert "running as local job" not in again.stdout and "nothing to do" in again.stdout, again.stdout  # all done
    fewer = [w.replace("method=[cam,clip_es]", "method=[cam]") for w in words]  # other points: the report is rebuilt
    sub = subprocess.run([sys.executable, str(SUBMIT), *fewer], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert sub.returncode == 0 and "[sweep] report: running" in sub.stdout, sub.stdout + sub.stderr[-2000:]
    assert [g["method"] for g in _report(sweep)[1]["groups"]] == ["cam"]
    os.remove(sweep / "report" / "report.md")
    rebuilt = subprocess.run([sys.executable, "-m", "wsss_dist", "report", str(sweep), f"data.shards_dir={tmp_path}/shards"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert rebuilt.returncode == 0 and "(n=2)" in (sweep / "report" / "report.md").read_text(), rebuilt.stderr[-2000:]


def test_points_with_the_same_teacher_config_share_one_teacher():
    from wsss_dist.launcher import shared_teachers

    root, points = sweep_points(["method=[teach,fmix]", "train.seed=[0,1]", "cam.bg_threshold=[0.1,0.2]"])
    words, teachers = shared_teachers(Path(root), points)
    assert [(t.name, [points[i].name for i in t.points]) for t in teachers] == [
        ("teacher-train_aug-s0", ["teach-s0-bg_threshold0.1", "teach-s0-bg_threshold0.2"]),
        ("teacher-train_aug-s1", ["teach-s1-bg_threshold0.1", "teach-s1-bg_threshold0.2"])]
    cfgs = [make_config(w) for w in words]
    assert str(cfgs[0].teacher_dir) == f"{root}/teacher-train_aug-s0/teacher" == str(cfgs[1].teacher_dir)
    assert str(cfgs[4].teacher_dir) == f"{root}/fmix-s0-bg_threshold0.1/teacher"  # no teacher: nothing shared
    tcfg = make_config(teachers[1].words)
    assert (str(tcfg.run_dir), tcfg.stages(), tcfg.teacher.dir, tcfg.teacher.train.seed) == \
        (f"{root}/teacher-train_aug-s1", ["teacher"], "", 1)
    # two teacher configs with the same split and seed get distinct names; a teacher.dir of the user's is kept
    _, pts = sweep_points(["method=teach", "teacher.img_size=[32,64]"])
    names = [t.name for t in shared_teachers(Path("runs/x"), pts)[1]]
    assert len(set(names)) == 2 and all(n.startswith("teacher-train_aug-s0-") for n in names)
    _, pts = sweep_points(["method=teach", "teacher.dir=/t/teacher", "cam.bg_threshold=[0.1,0.2]"])
    assert shared_teachers(Path("runs/x"), pts)[1] == []


@pytest.mark.slow  # ~2.5 min on 2 busy CPU cores
def test_local_sweep_trains_the_shared_teacher_once(tmp_path, monkeypatch):
    """Two method=teach points with the same split and seed (cluster=debug: in this process): one teacher in
    <sweep>/teacher-<split>-s<seed>/teacher, both classifiers cluster its embeddings; resubmitting skips it."""
    from wsss_dist import launcher

    monkeypatch.chdir(tmp_path)
    words = ["cluster=debug", "stage=[shards,teacher,cls]", "method=teach", "cam.bg_threshold=[0.1,0.2]",
             "sweep.name=tg", f"data.shards_dir={tmp_path}/shards", f"data.toy.root={tmp_path}/src", *TINY,
             "cls.train.steps=4", "teacher.train.steps=2"]
    lines: list[str] = []
    launcher.submit(words, out=lines.append)
    text = "\n".join(lines)
    assert text.count("[shared] teacher-train_aug-s0: teacher: done") == 1, text
    sweep = tmp_path / "runs" / "tg"
    teacher = sweep / "teacher-train_aug-s0" / "teacher"
    assert (teacher / "DONE").is_file() and (teacher / "embeddings.npz").is_file()
    for name in ("bg_threshold0.1", "bg_threshold0.2"):
        assert f"[point {1 if name.endswith('1') else 2}/2] {name}: cls: done" in text, text
        assert (sweep / name / "cls" / "subcategories.npz").is_file() and not (sweep / name / "teacher").exists()
    assert json.loads((sweep / "sweep.json").read_text())["points"][0]["teacher"] == str(Path("runs/tg") / teacher.relative_to(sweep))
    lines.clear()
    launcher.submit(words, out=lines.append)
    assert "[shared] teacher-train_aug-s0: teacher: skipped (done)" in lines and "nothing to do: every stage is done" in lines, lines


def test_slurm_sweep_is_one_chain_of_job_arrays_per_group_of_points_with_the_same_jobs(tmp_path, monkeypatch):
    """Without a cluster (submission recorded): points with the same jobs share arrays, task by task (aftercorr);
    sc (cls rounds) is its own group, so are the points that wait for a teacher (task i after teacher i when they
    match one to one); a point with a finished stage is a plain chain; the teachers are one array."""
    from wsss_dist import launcher

    calls: list[tuple] = []
    ids = iter(range(100, 200))

    class Job:
        def __init__(self, job_id: str) -> None:
            self.job_id = job_id

    def fake_array(launch, root, items, dep, label, out):
        a = next(ids)
        calls.append((items[0][1].name, [name for name, _ in items], dep))
        return [Job(f"{a}_{i}") for i in range(len(items))] if len(items) > 1 else [Job(str(a))]

    def fake_chain(cfg, steps, launch, out, label="", first_dep=None):
        got, dep = [], first_dep
        for st in steps:
            if not st.done:
                got.append(Job(str(next(ids))))
                calls.append((st.name, label.strip(), dep))
                dep = f"afterok:{got[-1].job_id}"
        return got

    from wsss_dist.launcher import sweep

    monkeypatch.setattr(sweep, "_submit_array", fake_array)
    monkeypatch.setattr(sweep, "submit_chain", fake_chain)
    monkeypatch.setattr(sweep, "_check_cluster", lambda *a: None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "g" / "fmix-s2" / "cls").mkdir(parents=True)
    (tmp_path / "runs" / "g" / "fmix-s2" / "cls" / "DONE").write_text("{}")
    launcher.submit(["cluster=slurm", "stage=all", "method=[fmix,sc,teach]", "train.seed=[0,1,2]", "cls.sc_rounds=2",
                     "sweep.name=g"], out=lambda line: None)
    chain = ["cam", "aff", "pseudo", "seg", "eval"]
    assert calls == [
        ("shards", "[shared]", None),
        ("teacher", ["teacher-train_aug-s0", "teacher-train_aug-s1", "teacher-train_aug-s2"], "afterok:100"),
        ("cls", ["fmix-s0", "fmix-s1"], "afterok:100"),  # no teacher to wait for
        *[(st, ["fmix-s0", "fmix-s1"], f"aftercorr:{102 + i}") for i, st in enumerate(chain)],
        *[(st, "[point 3/9] fmix-s2:", "afterok:100" if i == 0 else f"afterok:{107 + i}") for i, st in enumerate(chain)],
        ("cls.round0", ["sc-s0", "sc-s1", "sc-s2"], "afterok:100"),
        *[(st, ["sc-s0", "sc-s1", "sc-s2"], f"aftercorr:{113 + i}") for i, st in enumerate(["cls.round1", *chain])],
        ("cls", ["teach-s0", "teach-s1", "teach-s2"], "afterok:100,aftercorr:101"),  # point i after teacher i
        *[(st, ["teach-s0", "teach-s1", "teach-s2"], f"aftercorr:{120 + i}") for i, st in enumerate(chain)],
        ("report", "[sweep]", "afterany:107:112:119:125"),
    ], calls
    points = json.loads((tmp_path / "runs" / "g" / "sweep.json").read_text())["points"]
    assert points[6]["teacher"] == "runs/g/teacher-train_aug-s0/teacher" and "teacher" not in points[0]
    assert points[7]["jobs"]["cls"] == "120_1" and points[2]["jobs"] == {st: str(108 + i) for i, st in enumerate(chain)}


def test_a_points_teacher_stage_uses_the_finished_shared_teacher(tmp_path):
    from wsss_dist import runs
    from wsss_dist.errors import StageNotDone
    from wsss_dist.stages import teacher

    runs.mark_done(tmp_path / "t", "teacher", {"embeddings": 5})
    cfg = make_config(["method=teach", f"run={tmp_path}/p", f"teacher.dir={tmp_path}/t/teacher"])
    assert teacher.run(cfg) == {"embeddings": 5} and not (tmp_path / "p" / "teacher").exists()
    with pytest.raises(StageNotDone, match=f"run stage=teacher run={tmp_path}/none first"):
        teacher.run(make_config(["method=teach", f"run={tmp_path}/p", f"teacher.dir={tmp_path}/none/teacher"]))


def test_the_sweep_report_is_stale_when_it_covers_other_runs_or_predates_a_points_stage(tmp_path):
    from wsss_dist import runs
    from wsss_dist.launcher.sweep import _report_stale

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    runs.mark_done(a, "cls")
    runs.mark_done(tmp_path, "report", {"runs": [a, b], "failed": ["b"]})  # b stopped before its stages: not stale
    os.utime(tmp_path / "report" / "DONE", (2e9, 2e9))
    assert not _report_stale(tmp_path, [a, b])
    assert _report_stale(tmp_path, [a])  # other points
    runs.mark_done(b, "cam")
    os.utime(Path(b) / "cam" / "DONE", (2e9 + 1, 2e9 + 1))  # b went on after the report
    assert _report_stale(tmp_path, [a, b])
