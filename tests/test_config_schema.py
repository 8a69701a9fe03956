"""Every config value is checked when the config is built: a walk over the schema sets a bad value of each key's
type and expects a one-line ConfigError naming the key; run names, sweep names and SLURM values are checked before
anything is written or submitted."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pytest

from wsss_dist.config import _schema, make_config, sweep_points
from wsss_dist.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# int and float keys for which 0 is valid (everything else that is a number must be > 0 or ≥ 1)
ZERO_IS_VALID = {
    "data.num_workers", "data.shuffle_buffer", "data.max_skip_fraction", "data.max_pixels", "data.toy.seed", "data.toy.n_sbd",
    "cls.ent_weight", "cls.con_weight", "cls.sub_weight", "cls.round", "cam.bg_threshold", "aff.conf_fg",
    "aff.conf_bg", "pseudo.logt", "slurm.gpus_per_node", "slurm.signal_delay_s", "slurm.array_parallelism",
    "irn.logt", "clip.box_threshold", "clip.refine_steps", "irn.bg_threshold", "eval.crf_workers", "eval.crf_pos_w", "eval.crf_bi_w",
    *(f"{t}.train.{k}" for t in ("cls", "teacher", "aff", "irn", "seg") for k in ("ckpt_every", "log_every", "seed")),
    *(f"{t}.optim.{k}" for t in ("cls", "teacher", "aff", "irn", "seg")
      for k in ("momentum", "weight_decay", "poly_power", "warmup_steps", "grad_clip")),
}
# keys whose type's bad value below is valid, with the bad value to use instead
SPECIAL = {"cls.round": "-2", "stage": "nonsense", "method": "nonsense"}
# keys where no value of their type is invalid: none (every string key rejects control characters)
NO_BAD_VALUE: set[str] = set()


def bad_value(key: str, typ: Any) -> str:
    """A value of ``key``'s type that the config must refuse."""
    if key in SPECIAL:
        return SPECIAL[key]
    origin, args = getattr(typ, "__origin__", None), getattr(typ, "__args__", ())
    if origin is Literal:
        return "nonsense"
    if origin is tuple:
        return {float: "[-1.5]", int: "[-2]"}.get(args[0], "[a\tb]")
    if typ is bool:
        return "maybe"
    if typ in (int, float):
        return "-2" if typ is int else "-1.5"
    return "bad\tname"  # strings (paths, names, choices): a control character at least


def _refused(word: str) -> str:
    with pytest.raises(ConfigError) as e:
        make_config([word])
    message, key = str(e.value), word.split("=", 1)[0]
    assert "\n" not in message and (key in message or key == "data.name" and "data=" in message), message
    return message


@pytest.mark.parametrize("key", [k for k in _schema() if k not in NO_BAD_VALUE])
def test_every_key_refuses_a_bad_value_of_its_type(key):
    typ = _schema()[key][0]
    _refused(f"{key}={bad_value(key, typ)}")
    if typ in (int, float) and key not in ZERO_IS_VALID:
        _refused(f"{key}=0")


def test_the_audit_s_late_failures_fail_when_the_config_is_built():
    assert "must be ≥ 1" in _refused("cam.batch_images=0")
    assert "one of 8, 16, 32" in _refused("model.output_stride=5")
    assert "one of DEBUG, INFO" in _refused("log_level=FOO")
    with pytest.raises(ConfigError, match="resnet38d has a fixed output stride of 8"):
        make_config(["model.backbone=resnet38d", "model.output_stride=16", "model.weights=none"])
    assert "one of train, val, train_aug" in _refused("cam.split=trian")


def test_a_bad_value_fails_in_one_line_before_any_stage_runs(tmp_path):
    """python -m wsss_dist stage=all cam.batch_images=0: exit 2, one ``error:`` line, nothing written."""
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "wsss_dist", "stage=all", "cam.batch_images=0", f"run={run}",
                        f"data.shards_dir={tmp_path / 'shards'}"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == ["error: cam.batch_images=0: must be ≥ 1"], r.stderr[-2000:]
    assert not run.exists() and not (tmp_path / "shards").exists()


@pytest.mark.parametrize("word", [
    "run=runs/a\nb", "run=runs/x;rm -rf ~", "run=runs/$(id)", "run=runs/a b", "run=runs/50%j", "run=-rf",
    "run=runs/" + "x" * 101, "run=" + "/".join(["d" * 50] * 5),
    "sweep.name=a\nb", "sweep.name=x`id`",
    "slurm.partition=gpu\n#SBATCH --wrap=id", "slurm.partition=gpu;id", "slurm.account=a b", "slurm.qos=q$x",
    "slurm.constraint=a100\nb", "slurm.constraint=a100;id",
    "slurm.extra=[wrap=id;rm]", "slurm.extra=[comment=a b]", "slurm.extra=[9x=1]", "slurm.extra=[x=$(id)]",
])
def test_run_names_and_slurm_values_are_checked(word):
    _refused(word)


@pytest.mark.parametrize("word", [
    "run=runs/fmix-train_aug-s0", "run=/scratch/me/wsss/runs/lr0.01+bs16", "run=runs/a.b@c=d,e:f~g",
    "slurm.partition=gpu,gpu-long", "slurm.account=proj_123", "slurm.qos=normal",
    "slurm.constraint=[a100|h100]&ib", "slurm.extra=[mail-user=me@example.org,gres=gpu:a100:4,--exclude=node01,requeue]",
    "sweep.name=grid-2",
])
def test_ordinary_names_pass(word):
    make_config([word])


def test_sweep_names_are_checked_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="sweep.name"):
        sweep_points(["method=[cam,fmix]", "sweep.name=x;id"])
    with pytest.raises(ConfigError, match="a point of the sweep"):
        sweep_points(["method=[cam,fmix]", f"run=runs/{'y' * 95}/{'z' * 97}"])  # 198 characters + /cam
    root, points = sweep_points(["method=[cam,fmix]", "sweep.name=ok"])
    assert root == "runs/ok" and [p.name for p in points] == ["cam", "fmix"]


def test_per_stage_slurm_values_are_checked():
    """``slurm.<stage>.<key>=`` words (the launcher's) go through the same checks."""
    from wsss_dist.launcher import split_args

    with pytest.raises(ConfigError, match="slurm.partition"):
        split_args(["slurm.cls.partition=gpu\n#SBATCH --wrap=id"])
    with pytest.raises(ConfigError, match="slurm.time_min=0: must be ≥ 1"):
        split_args(["slurm.seg.time_min=0"])
    launch, rest = split_args(["slurm.seg.gpus_per_node=4", "stage=seg"])
    assert launch.stage_slurm == {"seg": {"gpus_per_node": 4}} and rest == ["stage=seg"]
