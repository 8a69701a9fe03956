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


def test_loss_curves_come_from_the_trainers_tensorboard_events(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from wsss_dist.stages.report import loss_curves, loss_figure

    run = tmp_path / "cam-s0"
    with SummaryWriter(str(run / "cls" / "tb")) as w:
        for step, loss in ((10, 0.7), (20, 0.5), (30, 0.4)):
            w.add_scalar("cls/cam/loss", loss, step)
            w.add_scalar("cls/cam/lr", 0.1, step)
    assert [(s, round(v, 3)) for s, v in loss_curves(run, "cls")] == [(10, 0.7), (20, 0.5), (30, 0.4)]
    assert loss_curves(run, "seg") == []
    png = loss_figure([{"run": str(run), "name": run.name}])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert loss_figure([{"run": str(tmp_path / "nothing"), "name": "x"}]) is None


def test_log_with_mlflow_gets_the_training_curve_and_the_scores(tmp_path, monkeypatch):
    """Issue 25 #5: log_with=[mlflow] (accelerate's tracker; a local file store here) receives the engine's scalars
    beside TensorBoard; an unknown tracker or a missing package is a one-line config error."""
    import pytest

    from wsss_dist.config import make_config
    from wsss_dist.engine.scalars import open_scalars
    from wsss_dist.errors import ConfigError

    with pytest.raises(ConfigError, match=r"log_with=neptune: allowed trackers are wandb, mlflow"):
        make_config(["log_with=[neptune]"])
    mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (pip install mlflow-skinny)")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store, no server
    assert make_config(["log_with=[mlflow]"]).log_with == ("mlflow",)
    sink = open_scalars(tmp_path / "tb", ("mlflow",), "run/cls")
    for step, loss in ((10, 0.7), (20, 0.5)):
        sink.add_scalar("cls/cam/loss", loss, step)
    sink.close()
    client = mlflow.tracking.MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    run = client.search_runs([client.get_experiment_by_name("wsss-dist").experiment_id])[0]
    history = client.get_metric_history(run.info.run_id, "cls/cam/loss")
    assert [(m.step, round(m.value, 3)) for m in history] == [(10, 0.7), (20, 0.5)]
    assert run.info.run_name == "run/cls" and list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_a_method_without_cls_is_done_without_it_and_its_recipe_shows_no_classifier(tmp_path):
    run = tmp_path / "clip_es"
    runs.atomic_write(run / "config.yaml", "method: clip_es\nrefine: irn\nmodel:\n  backbone: resnet18\n"
                                           "cls:\n  train:\n    steps: 300\n    batch_size: 16\n"
                                           "aff:\n  init: cls\nirn:\n  init: imagenet\n")
    for st in ("cam", "aff", "pseudo", "seg", "eval"):
        runs.mark_done(run, st, {"seconds": 60.0, "miou": 0.1})
    p = load_run(run)
    assert (p["status"], p["method"]) == ("done", "clip_es+irn")
    header, rows = recipes([p])
    row = dict(zip(header, rows[0]))
    assert (row["cls.train.steps"], row["cls.train.batch_size"], row["model.backbone"]) == ("–", "–", "resnet18")
    assert row["aff.init"] == "imagenet (irn.init)"  # refine=irn: the boundary network's start, not AffinityNet's
    assert stage_times([p])[0][1:3] == ["cam (min)", "aff (min)"]  # no cls column for it
    runs.atomic_write(run / "config.yaml", "method: cam\ncls:\n  train:\n    steps: 300\n")
    assert load_run(run)["status"] == "incomplete: no cls" and recipes([load_run(run)])[1][0][5] == "300"
