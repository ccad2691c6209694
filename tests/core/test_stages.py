"""Multi-stage recipes: each stage typed by its own method, a bad stage key named, each stage
starting from the previous one's student, and a run killed mid-stage-2 that resumes in stage 2
(stage 1 not run again) and ends bit-identical (CPU) to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdlib.core.checkpoint import latest_checkpoint
from kdlib.core.config import ConfigError, to_dict
from kdlib.core.run_config import load_run_config, resolve_config
from kdlib.core.stages import student_stages

ROOT = Path(__file__).resolve().parents[2]

# supervised warm-up of the student alone -> hot logit KD from its EMA copy -> the run's logit KD
# from the raw weights of that. Tiny networks: the digits classifier recipe, shrunk.
RECIPE = """
domain: image
method: logit_kd
baseline: false
seeds: [0]
model: {teacher_channels: [8, 16, 32], student_hidden: [32]}
teacher:
  train: {steps: 20, batch_size: 64, lr: 0.002, checkpoint_every: 10, progress: false}
method_args: {temperature: 4.0, soft_weight: 0.9, hard_weight: 0.1}
train: {batch_size: 64, lr: 0.005, checkpoint_every: 10, log_every: 5, progress: false}
stages:
  - name: warmup
    method: supervised
    train: {steps: 30, ema_decays: [0.9]}
  - name: kd-hot
    method: logit_kd
    start_from: ema
    method_args: {temperature: 8.0}
    train: {steps: 200}
  - start_from: raw
    train: {steps: 30, ema_decays: [0.9]}
"""


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "three-stages.yaml"
    path.write_text(RECIPE)
    return path


def test_stages_are_typed_by_their_methods_and_inherit_the_run(recipe):
    cfg = load_run_config(recipe)
    assert [s.name for s in cfg.stages] == ["warmup", "kd-hot", "logit_kd"]
    warmup, hot, last = cfg.stages
    assert type(warmup.method_args).__name__ == "SupervisedConfig"
    # Same method as the run: its options over the run's; the last stage takes the run's as they are.
    assert (hot.method_args.temperature, hot.method_args.soft_weight) == (8.0, 0.9)
    assert last.method == "logit_kd" and last.method_args.temperature == 4.0
    # train: each stage's keys over the run's.
    assert (warmup.train.steps, warmup.train.lr, warmup.train.ema_decays) == (30, 0.005, [0.9])
    assert (hot.train.steps, hot.train.ema_decays, last.train.steps) == (200, [], 30)
    plans = student_stages(cfg)
    assert [(p.name, p.start_from, p.previous) for p in plans] == [
        ("warmup", None, None), ("kd-hot", "ema", "warmup"), ("logit_kd", "raw", "kd-hot")]
    assert [p.with_teacher for p in plans] == [True, True, True]
    # A stage's keys can be overridden on the command line by position.
    cfg = load_run_config(recipe, ["stages.1.train.steps=7", "stages.1.method_args.temperature=2"])
    assert cfg.stages[1].train.steps == 7 and cfg.stages[1].method_args.temperature == 2.0
    # The resolved config (config.yaml of the run) resolves to itself.
    again = resolve_config(to_dict(cfg), source="config.yaml")
    assert to_dict(again) == to_dict(cfg)


def test_the_baseline_takes_its_own_train_settings_over_the_runs(recipe):
    """baseline_train: the no-teacher baseline's budget (e.g. the chain's total steps), merged over
    the run's train; without it the baseline trains with the run's train, as before."""
    cfg = load_run_config(recipe, ["baseline=true", "baseline_train.steps=260", "baseline_train.lr=0.001"])
    plans = student_stages(cfg)
    baseline = plans[-1]
    assert not baseline.with_teacher and baseline.name == "supervised"
    assert baseline.train.steps == 260 and baseline.train.lr == pytest.approx(0.001)
    assert baseline.train.batch_size == 64 and baseline.train.checkpoint_every == 10  # the run's train
    assert load_run_config(recipe, ["baseline=true"]).baseline_train is None
    assert student_stages(load_run_config(recipe, ["baseline=true"]))[-1].train == cfg.train
    again = resolve_config(to_dict(cfg), source="config.yaml")  # a run's saved config resolves the same
    assert again.baseline_train == cfg.baseline_train
    with pytest.raises(ConfigError, match="unknown config key 'baseline_train.setps'"):
        load_run_config(recipe, ["baseline=true", "baseline_train.setps=3"])
    with pytest.raises(ConfigError, match="baseline_train.steps must be >= 1"):
        load_run_config(recipe, ["baseline=true", "baseline_train.steps=0"])


@pytest.mark.parametrize(("override", "message"), [
    (["stages.1.trian={steps: 3}"], r"unknown config key 'stages\[1\]\.trian'; did you mean 'stages\[1\]\.train'\?"),
    (["stages.0.train.setps=3"], r"unknown config key 'stages\[0\]\.train\.setps'.*'stages\[0\]\.train\.steps'"),
    (["stages.1.method_args.temprature=2"], r"'stages\[1\]\.method_args\.temprature'.*temperature"),
    (["stages.0.method=supervize"], r"stages\[0\]\.method: unknown method 'supervize'; did you mean 'supervised'"),
    (["stages.2.method=supervised"], r"stages\[2\]\.method is 'supervised' but the run's method is 'logit_kd'"),
    (["stages.2.name=final"], r"stages\[2\]\.name: the last stage is the run's student"),
    (["stages.1.name=warmup"], r"stages\[1\]\.name='warmup' is also stages\[0\]'s name"),
    (["stages.0.name=teacher"], r"stages\[0\]\.name='teacher' is taken by the run's teacher stage"),
    (["stages.2.start_from=ema"], r"stages\[2\]\.start_from=ema but stages\[1\] keeps no EMA copy"),
    (["stages.0.start_from=raw"], r"stages\[0\]\.start_from: the first stage starts from the domain's student"),
    (["stages.1.start_from=best"], r"stages\[1\]\.start_from='best' is not one of 'auto', 'ema', 'raw'"),
    (["stages.3.train.steps=1"], r"stages has 3 items"),
    (["stages.1.train.steps=0"], r"stages\[1\]\.train\.steps must be >= 1"),
])
def test_bad_stage_keys_and_values_stop_the_run(recipe, override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_run_config(recipe, override)
    assert str(recipe) in str(err.value)


def test_each_stage_starts_from_the_previous_students_chosen_weights(recipe, tmp_path):
    """With lr=0 a stage's weights cannot move: its final student is exactly what it started
    from — stage 2 the first EMA copy of stage 1, stage 3 the raw weights of stage 2."""
    from kdlib.core.experiment import Experiment, create_run_dir

    overrides = [f"runs_dir={tmp_path / 'runs'}", "name=handover", "teacher.train.steps=5",
                 "stages.0.train.steps=6", "stages.1.train.steps=2", "stages.1.train.lr=0.0",
                 "stages.2.train.steps=2", "stages.2.train.lr=0.0"]
    cfg = load_run_config(recipe, overrides)
    run_dir = create_run_dir(cfg, recipe)
    results = Experiment(run_dir, cfg).run()
    assert set(results["seeds"]) == {"warmup", "kd-hot", "logit_kd"}

    def final(stage):
        return latest_checkpoint(run_dir / "stages" / f"seed0-{stage}" / "checkpoints").tensors

    warmup, hot, last = final("warmup"), final("kd-hot"), final("logit_kd")
    keys = [k[len("model/student/"):] for k in warmup if k.startswith("model/student/")]
    assert any(not torch.equal(warmup[f"ema/0/{k}"], warmup[f"model/student/{k}"]) for k in keys)
    for k in keys:
        assert torch.equal(hot[f"model/student/{k}"], warmup[f"ema/0/{k}"]), k
        assert torch.equal(last[f"model/student/{k}"], hot[f"model/student/{k}"]), k
        assert torch.equal(last[f"ema/0/{k}"], hot[f"model/student/{k}"]), k


def _kdlib(*argv, runs: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "kdlib.cli", *argv], cwd=runs, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(p: subprocess.Popen) -> str:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out.decode()[-3000:]
    return out.decode()


def _snapshot(stage_dir: Path) -> dict[str, object]:
    return {"done": (stage_dir / "done.json").stat().st_mtime_ns, "log": (stage_dir / "metrics.jsonl").read_text(),
            "checkpoints": sorted(p.name for p in (stage_dir / "checkpoints").iterdir())}


def test_killed_mid_stage_two_resumes_there_and_ends_identical(recipe, tmp_path):
    _finish(_kdlib("distill", "image", "--recipe", str(recipe), "name=full", runs=tmp_path))

    victim = _kdlib("distill", "image", "--recipe", str(recipe), "name=killed", runs=tmp_path)
    stages = tmp_path / "runs/killed/stages"
    deadline = time.time() + 240
    while not (stages / "seed0-kd-hot/checkpoints/step-00000030").exists():
        assert victim.poll() is None, victim.communicate()[0].decode()[-3000:]
        assert time.time() < deadline, "the run never reached stage 2's step-30 checkpoint"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert (stages / "seed0-warmup/done.json").exists()
    assert not (stages / "seed0-kd-hot/done.json").exists(), "killed too late to test anything"
    assert not (stages / "seed0-logit_kd").exists()
    before = _snapshot(stages / "seed0-warmup")

    _finish(_kdlib("resume", "runs/killed", runs=tmp_path))

    assert _snapshot(stages / "seed0-warmup") == before, "the finished stage 1 ran again"
    # Stage 2 went on from its own checkpoint: each logged step appears once (a restart from
    # scratch would log steps 5..30 twice), and matches the uninterrupted run's log.
    logged = [json.loads(line) for line in (stages / "seed0-kd-hot/metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in logged if "student/loss" in r]
    assert train_steps == list(range(5, 201, 5))
    full_log = (tmp_path / "runs/full/stages/seed0-kd-hot/metrics.jsonl").read_text().splitlines()
    assert [r["student/loss"] for r in logged if "student/loss" in r] == [
        json.loads(line)["student/loss"] for line in full_log if "student/loss" in line]
    for stage, steps in (("warmup", 30), ("kd-hot", 200), ("logit_kd", 30)):
        full = latest_checkpoint(tmp_path / "runs/full/stages" / f"seed0-{stage}" / "checkpoints")
        resumed = latest_checkpoint(stages / f"seed0-{stage}" / "checkpoints")
        assert full.step == resumed.step == steps
        compared = [k for k in full.tensors if k.startswith(("model/", "ema/", "optim/"))]
        for k in compared:
            assert torch.equal(full.tensors[k], resumed.tensors[k]), (stage, k)
    report = (tmp_path / "runs/killed/report.md").read_text()
    assert "kd-hot" in report and "warmup" in report
