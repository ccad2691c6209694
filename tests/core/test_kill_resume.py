"""The issue's acceptance test: a real run killed with SIGKILL mid-stage and resumed with
``kdlib resume`` ends bit-identical (CPU) to an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from kdlib.core.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]
ARGS = [
    "seeds=[0]", "baseline=false", "teacher.train.steps=20", "teacher.train.checkpoint_every=10",
    "train.steps=200", "train.checkpoint_every=10", "train.eval_every=0", "train.ema_decays=[0.9]",
    "train.progress=false", "teacher.train.progress=false",
]
STAGE = "stages/seed0-logit_kd"


def _kdlib(*argv, runs: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "kdlib.cli", *argv], cwd=runs, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(p: subprocess.Popen) -> str:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out.decode()[-3000:]
    return out.decode()


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    _finish(_kdlib("distill", "image", "--recipe", "classifier-kd", "name=full", *ARGS, runs=tmp_path))

    victim = _kdlib("distill", "image", "--recipe", "classifier-kd", "name=killed", *ARGS, runs=tmp_path)
    checkpoints = tmp_path / "runs/killed" / STAGE / "checkpoints"
    deadline = time.time() + 240
    while not (checkpoints / "step-00000030").exists():
        assert victim.poll() is None, victim.communicate()[0].decode()[-3000:]
        assert time.time() < deadline, "the run never reached its step-30 checkpoint"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "runs/killed" / STAGE / "done.json").exists(), "killed too late to test anything"

    out = _finish(_kdlib("resume", "runs/killed", runs=tmp_path))
    assert "logit_kd" in out

    full = latest_checkpoint(tmp_path / "runs/full" / STAGE / "checkpoints")
    resumed = latest_checkpoint(checkpoints)
    assert full.step == resumed.step == 200
    compared = [k for k in full.tensors if k.startswith(("model/", "ema/", "optim/"))]
    assert any(k.startswith("ema/") for k in compared)
    for k in compared:
        assert torch.equal(full.tensors[k], resumed.tensors[k]), k
    assert (tmp_path / "runs/killed/report.md").exists()
