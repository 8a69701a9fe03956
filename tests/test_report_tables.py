"""The report's tables: a single run shows no spread; stage times, GPU-hours and the recipe of every run."""
from __future__ import annotations

from wsss_dist import runs
from wsss_dist.stages.report import _pct, load_run, recipes, stage_times


def test_a_single_run_shows_no_plus_minus():
    assert _pct({"mean": 0.4474, "std": 0.0, "n": 1}) == "44.7 (n=1)"
    assert _pct({"mean": 0.5, "std": 0.02, "n": 3}) == "50.0 ± 2.0 (n=3)"


def test_stage_times_gpu_hours_and_recipes(tmp_path):
    run = tmp_path / "fmix-s0"
    runs.atomic_write(run / "config.yaml", "method: fmix\nmodel:\n  backbone: resnet38d\n  weights: ilsvrc.params\n"
                                           "cls:\n  train:\n    steps: 9915\n    batch_size: 16\n")
    runs.mark_done(run, "cls", {"seconds": 7200.0})
    runs.mark_done(run, "cam", {"seconds": 600.0, "miou": 0.48})
    runs.write_json(run / "cls" / "environment.json", {"gpus_used": 4})
    runs.write_json(run / "cam" / "environment.json", {"gpus_used": 0})
    points = [load_run(run)]
    header, rows = stage_times(points)
    assert header == ["run", "cls (min)", "cam (min)", "total (min)", "GPU-hours"]
    assert rows == [["fmix-s0", "120.0", "10.0", "130.0", "8.00"]]  # 2 h on 4 GPUs; the CPU stage adds none
    header, rows = recipes(points)
    row = dict(zip(header, rows[0]))
    assert (row["method"], row["model.backbone"], row["model.weights"], row["cls.train.steps"]) == \
        ("fmix", "resnet38d", "ilsvrc.params", "9915")
    assert row["seg.backbone"] == "–"
