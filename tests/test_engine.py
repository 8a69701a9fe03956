"""The training engine: schedule, optimiser, exact resume after signals, atomic checkpoints, divergence, DDP on gloo."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wsss_dist.config import OptimCfg
from wsss_dist.engine import (Interrupted, build_optimizer, fit, load_model_weights, newest_checkpoint, poly_lr,
                              save_model_weights)
from wsss_dist.errors import TrainingDiverged, WeightsError

import engine_script as es

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "engine_script.py"


def _fit(out: Path, steps: int, loss_fn=es.loss_fn, ckpt_every: int = 4, grad_accum: int = 1, **train):
    model = es.make_model()
    t, o = es.configs(steps, ckpt_every, grad_accum, **train)
    metrics = fit(model=model, param_groups=model.param_groups(), loss_fn=loss_fn, make_loader=es.make_loader,
                  out_dir=out, train=t, optim=o, log_name="tiny")
    return model, metrics


def _signal_at(*steps: int):
    """A loss_fn that sends SIGUSR1 to this process during each of ``steps``."""
    def loss_fn(model, batch, step):
        if step in steps:
            os.kill(os.getpid(), signal.SIGUSR1)
        return es.loss_fn(model, batch, step)
    return loss_fn


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ


# --------------------------------------------------------------------------------------------- schedule, optimiser

def test_poly_lr_values():
    assert poly_lr(0, 100, 0.1) == pytest.approx(0.1)
    assert poly_lr(50, 100, 0.1) == pytest.approx(0.1 * 0.5 ** 0.9)
    assert poly_lr(99, 100, 0.1, power=1.0) == pytest.approx(0.001)
    assert poly_lr(100, 100, 0.1) == 0.0
    assert [poly_lr(s, 100, 1.0, warmup=4) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert poly_lr(10, 100, 1.0, warmup=4) == pytest.approx(0.9 ** 0.9)


def test_fit_sets_poly_lr_per_group(tmp_path, monkeypatch):
    seen = []
    step = torch.optim.SGD.step

    def record(self, *a, **k):
        seen.append([g["lr"] for g in self.param_groups])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", record)
    _fit(tmp_path, 7)
    want = [poly_lr(s, 7, 0.05 * m, 0.9) for s in range(7) for m in (1.0, 10.0)]
    assert [lr for step in seen for lr in step] == pytest.approx(want)


def test_build_optimizer_groups_and_legacy_momentum():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    groups = [{"params": a.parameters(), "lr_mult": 1.0}, {"params": b.parameters(), "lr_mult": 10.0, "weight_decay": 0.0}]
    opt = build_optimizer(groups, OptimCfg(name="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4))
    assert isinstance(opt, torch.optim.SGD)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.1])
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]
    assert all(g["momentum"] == 0.9 and g["nesterov"] is False for g in opt.param_groups)
    groups = [{"params": a.parameters(), "lr_mult": 1.0}]
    legacy = build_optimizer(groups, OptimCfg(name="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, legacy_momentum_bug=True))
    assert legacy.param_groups[0]["momentum"] == 5e-4
    adamw = build_optimizer([{"params": a.parameters(), "lr_mult": 2.0}], OptimCfg(name="adamw", lr=1e-3, weight_decay=0.01))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["lr"] == pytest.approx(2e-3)


# --------------------------------------------------------------------------------------------- training

def test_loss_falls_and_outputs_written(tmp_path):
    batch = es.synthetic_batch(10_000)

    def objective(model):
        model.eval()
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"]))

    before = objective(es.make_model())
    model, metrics = _fit(tmp_path, 30, ckpt_every=10)
    after = objective(model)
    assert after < 0.6 * before, (before, after)
    assert metrics["steps"] == 30 and math.isfinite(metrics["loss"]) and metrics["images_per_s"] > 0
    assert metrics["skipped"] == (30 - 1) // 5  # the latest count of the one data stream
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    _assert_same_weights(load_file(str(tmp_path / "model.safetensors")), {k: v.contiguous() for k, v in model.state_dict().items()})
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] and newest_checkpoint(tmp_path).name == "step-00000030"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000020", "step-00000030"]  # newest 2 kept
    if (tmp_path / "tb").is_dir():
        assert any(p.name.startswith("events") for p in (tmp_path / "tb").iterdir())


def test_finished_training_returns_at_once(tmp_path):
    model, metrics = _fit(tmp_path, 5)

    def must_not_run(*a):
        raise AssertionError("trained again")

    fresh, again = _fit(tmp_path, 5, loss_fn=must_not_run)
    assert again == metrics
    _assert_same_weights(fresh.state_dict(), model.state_dict())


@pytest.mark.parametrize("stops,grad_accum", [((3,), 1), ((1, 5, 8), 1), ((4,), 2)])
def test_resume_after_signals_is_bitwise_equal(tmp_path, stops, grad_accum):
    steps = 11
    _fit(tmp_path / "ref", steps, grad_accum=grad_accum)
    before = signal.getsignal(signal.SIGUSR1)
    for k in stops:
        with pytest.raises(Interrupted) as e:
            _fit(tmp_path / "run", steps, loss_fn=_signal_at(k), grad_accum=grad_accum)
        assert e.value.signum == signal.SIGUSR1
        assert newest_checkpoint(tmp_path / "run").name == f"step-{k + 1:08d}"  # the step that got the signal finished
        assert signal.getsignal(signal.SIGUSR1) is before  # handlers restored
    assert not (tmp_path / "run" / "model.safetensors").exists()
    _, metrics = _fit(tmp_path / "run", steps, grad_accum=grad_accum)
    assert metrics["steps"] == steps
    _assert_same_weights(load_file(str(tmp_path / "run" / "model.safetensors")),
                         load_file(str(tmp_path / "ref" / "model.safetensors")))


def test_incomplete_newest_checkpoint_is_ignored(tmp_path, caplog):
    _fit(tmp_path / "ref", 10)
    with pytest.raises(Interrupted):
        _fit(tmp_path / "run", 10, loss_fn=_signal_at(5))  # checkpoints at 4 and 6
    newest = newest_checkpoint(tmp_path / "run")
    assert newest.name == "step-00000006"
    (newest / "COMPLETE").unlink()  # as if the process died before the marker
    (newest / "optimizer.bin").write_bytes(b"garbage")
    assert newest_checkpoint(tmp_path / "run").name == "step-00000004"
    (tmp_path / "run" / "ckpt" / ".tmp-step-00000007").mkdir()  # a killed writer's temp dir
    with caplog.at_level(logging.INFO, logger="wsss_dist.engine"):
        _fit(tmp_path / "run", 10)
    assert "step-00000004 at step 4" in caplog.text
    assert not (tmp_path / "run" / "ckpt" / ".tmp-step-00000007").exists()
    _assert_same_weights(load_file(str(tmp_path / "run" / "model.safetensors")),
                         load_file(str(tmp_path / "ref" / "model.safetensors")))


@pytest.mark.slow
def test_kill_9_while_writing_a_checkpoint(tmp_path):
    """SIGKILL inside the second checkpoint write (state files written, no marker): the first one is loaded."""
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "10", "ckpt_every=3", "kill_in_save=2"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    run = tmp_path / "train"
    assert (run / "ckpt" / ".tmp-step-00000006").is_dir() and not (run / "ckpt" / "step-00000006").exists()
    assert newest_checkpoint(run).name == "step-00000003"
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "10", "ckpt_every=3"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stderr and "step-00000003 at step 3" in r.stderr
    model, _ = _fit(tmp_path / "ref", 10, ckpt_every=3)
    _assert_same_weights(load_file(str(run / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors")))


def test_more_steps_continue_from_the_last_checkpoint(tmp_path, caplog):
    _fit(tmp_path, 6)
    with caplog.at_level(logging.INFO, logger="wsss_dist.engine"):
        _, metrics = _fit(tmp_path, 9)
    assert "at step 6" in caplog.text and metrics["steps"] == 9


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_raises_training_diverged(tmp_path, bad):
    def loss_fn(model, batch, step):
        loss, logs = es.loss_fn(model, batch, step)
        return (loss * bad if step == 4 else loss), logs

    with pytest.raises(TrainingDiverged, match=f"loss is {'nan' if bad != bad else 'inf'} at step 5 of tiny"):
        _fit(tmp_path, 12, loss_fn=loss_fn, ckpt_every=6)
    assert newest_checkpoint(tmp_path) is None  # no checkpoint of diverged weights
    assert not (tmp_path / "model.safetensors").exists()


def test_bf16_then_fp32_in_one_process(tmp_path):
    """Each fit makes its own Accelerator: a different mixed precision in the same process works."""
    _, m = _fit(tmp_path / "bf16", 3, mixed_precision="bf16")
    assert math.isfinite(m["loss"])
    _, m = _fit(tmp_path / "fp32", 3)
    assert math.isfinite(m["loss"])


def test_weights_roundtrip_and_errors(tmp_path):
    model = es.make_model(seed=1)
    save_model_weights(model, tmp_path / "w.safetensors")
    other = es.make_model(seed=2)
    load_model_weights(other, tmp_path / "w.safetensors")
    _assert_same_weights(other.state_dict(), model.state_dict())
    with pytest.raises(WeightsError, match="does not exist"):
        load_model_weights(other, tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match="does not fit"):
        load_model_weights(torch.nn.Linear(3, 3), tmp_path / "w.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(WeightsError):
        load_model_weights(other, tmp_path / "bad.safetensors")


# --------------------------------------------------------------------------------------------- two processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, steps: int, *opts: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(SCRIPT), str(out), str(steps), *opts]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def _results(out: Path) -> list[dict]:
    return [json.loads((out / f"result-rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_two_processes_gloo_signal_on_one_rank_and_resume(tmp_path):
    """Rank 1 alone gets SIGUSR1 in step 3: both ranks stop after step 4 (the agreement is overlapped with one step);
    a relaunch with more steps resumes there and continues the step count."""
    r = _launch(tmp_path, 6, "signal_at=2", "signal_rank=1")
    results = _results(tmp_path)
    assert [x["world"] for x in results] == [2, 2] and [x["backend"] for x in results] == ["gloo", "gloo"], r.stderr[-3000:]
    assert [x["interrupted"]["signum"] for x in results] == [signal.SIGUSR1] * 2
    assert all("at step 4 of 6" in x["interrupted"]["message"] for x in results)
    assert newest_checkpoint(tmp_path / "train").name == "step-00000004"
    ckpt = newest_checkpoint(tmp_path / "train")
    assert not list(ckpt.glob("*.pkl"))  # no pickled RNG states: every step reseeds from (seed, step, rank)
    r = _launch(tmp_path, 12)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr and "step-00000004 at step 4" in r.stderr
    assert [x["metrics"]["steps"] for x in _results(tmp_path)] == [12, 12]
    assert _results(tmp_path)[0]["metrics"]["skipped"] == 2 * ((11 - 4) // 5)  # latest count of each rank, summed
