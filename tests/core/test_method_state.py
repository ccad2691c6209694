"""Method state outside the trainable modules (``Method.state_tensors``) survives a resume: a run
stopped at a checkpoint and resumed ends bit-identical to one that was not stopped — for TBCM's
trajectory cache and reflow's couplings served over several steps, and TAID's adaptive schedule."""

from __future__ import annotations

import pytest
import torch

from kdlib.core.data import TensorDataset
from kdlib.core.method import METHODS, Method
from kdlib.core.models import Student, Teacher
from kdlib.core.run_config import TrainConfig
from kdlib.core.trainer import Trainer
from kdlib.diffusion.consistency import ConsistencyModel
from kdlib.diffusion.param import get_parameterisation
from tests.methods.nets import TinyNet


def _diffusion_method(name, **args):
    torch.manual_seed(0)
    student = Student(ConsistencyModel(TinyNet(), get_parameterisation("fm")))
    return METHODS.get(name)(METHODS.get(name).Config(**args), student, Teacher(TinyNet()))


def _taid_method():
    torch.manual_seed(0)
    student, teacher = torch.nn.Embedding(30, 30), torch.nn.Embedding(30, 30)
    return METHODS.get("taid_kd")(METHODS.get("taid_kd").Config(total_steps=8, rate=0.5), Student(student),
                                  Teacher(teacher))


def _data(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "taid_kd":
        tokens = torch.randint(0, 30, (2, 256, 5), generator=g)
        return TensorDataset(x=tokens[0], y=tokens[1])
    return TensorDataset(x=torch.zeros(256, 4), y=torch.randint(0, 3, (256,), generator=g))


def _fit(method, kind, stage_dir, steps):
    # constant lr: a 5-step run shares the 8-step run's schedule, as a killed run would
    cfg = TrainConfig(steps=steps, batch_size=32, lr=3e-3, schedule="constant", checkpoint_every=5, log_every=2,
                      progress=False, device="cpu")
    Trainer(method, _data(kind), cfg, stage_dir=stage_dir, seed=0).fit()
    return method


CASES = {
    # refresh_every 3: the cache drawn at step 3 serves steps 3, 4, 5; the checkpoint at step 5 holds it
    "tbcm": lambda: _diffusion_method("tbcm", param="fm", num_intervals=4, refresh_every=3),
    "reflow": lambda: _diffusion_method("reflow", teacher_steps=3, refresh_every=3, init_from_teacher=False),
    "taid_kd": _taid_method,
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_a_resumed_run_ends_as_one_that_was_not_stopped(tmp_path, kind):
    straight = _fit(CASES[kind](), kind, tmp_path / "straight", 8)
    _fit(CASES[kind](), kind, tmp_path / "stopped", 5)
    resumed = _fit(CASES[kind](), kind, tmp_path / "stopped", 8)  # a new process rebuilds the method
    for a, b in zip(straight.student.model.state_dict().values(), resumed.student.model.state_dict().values()):
        assert torch.equal(a, b)
    if kind == "taid_kd":
        assert float(straight.taid.lam) == float(resumed.taid.lam) > 0.4


def test_taid_checkpoints_from_its_first_step(tmp_path):
    """Before its first λ update TAID's last loss is NaN: the checkpoint (which refuses non-finite
    tensors) leaves it out, and a resume from step 1 ends as an uninterrupted run."""
    def fit(stage_dir, steps):
        cfg = TrainConfig(steps=steps, batch_size=32, lr=3e-3, schedule="constant", checkpoint_every=1, log_every=1,
                          progress=False, device="cpu")
        method = _taid_method()
        Trainer(method, _data("taid_kd"), cfg, stage_dir=stage_dir, seed=0).fit()
        return method

    straight = fit(tmp_path / "straight", 3)
    fit(tmp_path / "stopped", 1)
    resumed = fit(tmp_path / "stopped", 3)
    for a, b in zip(straight.student.model.state_dict().values(), resumed.student.model.state_dict().values()):
        assert torch.equal(a, b)
    assert float(straight.taid.lam) == float(resumed.taid.lam)


@pytest.mark.parametrize("kind", ["tbcm", "reflow"])
def test_the_checkpoint_holds_the_cache_being_served(tmp_path, kind):
    method = _fit(CASES[kind](), kind, tmp_path / "run", 5)
    state = method.state_tensors()
    assert state, "a cache was being served at step 5"
    fresh = CASES[kind]()
    fresh.load_state_tensors({k: v.clone() for k, v in state.items()})
    for key, value in fresh.state_tensors().items():
        assert torch.equal(value, state[key]), key
    fresh.load_state_tensors({})  # a checkpoint without method state: start afresh
    assert fresh.state_tensors() == {}


def test_a_method_without_state_refuses_state_it_does_not_know():
    method = _diffusion_method("consistency_distillation", param="fm")
    assert method.state_tensors() == {}
    method.load_state_tensors({})
    with pytest.raises(ValueError, match="keeps no state.*cache/step"):
        Method.load_state_tensors(method, {"cache/step": torch.tensor(1)})


def test_another_world_size_starts_the_method_state_afresh(tmp_path):
    method = CASES["tbcm"]()
    cfg = TrainConfig(steps=1, batch_size=32, progress=False, device="cpu")
    trainer = Trainer(method, _data("tbcm"), cfg, stage_dir=tmp_path, seed=0)
    method._cache = (0, torch.zeros(5, 2, 4), {})
    with pytest.warns(RuntimeWarning, match="written by 2 process.*starts its state"):
        trainer._restore_method_state({"world_size": 2}, {"method/rank0/cache/step": torch.tensor(3)}, tmp_path)
    assert method._cache is None
