"""A student that absorbs CFG as an input (LCM §4.2): consistency_distillation and multistep_cd
with ``guidance_input`` guide each sample's teacher step at its own w and hand that w to the
student; the student starts as the teacher at every w, learns w-dependent outputs, and samples at
a chosen w; clear errors for bad ranges and unsupported methods."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("mlxtend")

from domains.image.gen_models import MLPDenoiser  # noqa: E402
from kdlib.core.method import METHODS  # noqa: E402
from kdlib.core.models import Student, Teacher  # noqa: E402
from kdlib.diffusion.consistency import ConsistencyModel  # noqa: E402
from kdlib.diffusion.param import get_parameterisation  # noqa: E402

FM = get_parameterisation("fm")


def _teacher() -> MLPDenoiser:
    torch.manual_seed(0)
    net = MLPDenoiser(shape=(1, 4, 4), hidden=32, blocks=1, num_classes=3)
    for p in net.parameters():
        p.data.normal_(0, 0.2)  # the zero-initialised output layers too: a teacher with a real function
    return net


def _method(name, **args):
    student = Student(ConsistencyModel(MLPDenoiser(shape=(1, 4, 4), hidden=32, blocks=1, num_classes=3,
                                                   guidance_input=True), FM))
    return METHODS.get(name)(METHODS.get(name).Config(param="fm", num_intervals=8, **args), student,
                             Teacher(_teacher()))


def _batch(n=32):
    g = torch.Generator().manual_seed(1)
    return {"x": torch.rand(n, 1, 4, 4, generator=g) * 2 - 1, "y": torch.randint(0, 3, (n,), generator=g)}


@pytest.mark.parametrize("name", ["consistency_distillation", "multistep_cd"])
def test_student_starts_as_the_teacher_and_learns_w_dependent_outputs(name):
    method = _method(name, guidance_input=[1.0, 4.0])
    net, teacher = method.student.model.net, method.teacher.model
    x, t, y = torch.randn(5, 1, 4, 4), torch.rand(5), torch.tensor([0, 1, 2, -1, 0])
    for w in (1.0, 2.5, 4.0):  # the w embedding's output starts at zero
        torch.testing.assert_close(net(x, t, y=y, guidance=torch.full((5,), w)), teacher(x, t, y=y))
    opt = torch.optim.Adam(method.student.model.parameters(), lr=3e-3)
    for step in range(30):
        method.update_groups(step)
        loss, _ = method.loss(_batch(), "student")
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    low, high = (net(x, t, y=y, guidance=torch.full((5,), w)) for w in (1.0, 4.0))
    assert not torch.allclose(low, high, atol=1e-4)  # w now changes the prediction


def test_each_samples_teacher_step_is_guided_at_the_w_the_student_sees(monkeypatch):
    method = _method("consistency_distillation", guidance_input=[2.0, 3.0])
    seen = {}
    import kdlib.methods.consistency_distillation as cd

    real = cd.solver_step

    def spy(net, param, x_t, t, s, cond, guidance, **kw):
        seen["teacher_w"] = guidance
        return real(net, param, x_t, t, s, cond, guidance, **kw)

    monkeypatch.setattr(cd, "solver_step", spy)
    student_w = []
    forward = method.student.model.net.forward
    def recording(*a, guidance=None, **k):
        student_w.append(guidance)
        return forward(*a, guidance=guidance, **k)

    monkeypatch.setattr(method.student.model.net, "forward", recording)
    method.loss(_batch(8), "student")
    w = seen["teacher_w"]
    assert w.shape == (8,) and bool(((w >= 2.0) & (w <= 3.0)).all()) and w.unique().numel() == 8
    assert all(torch.equal(v, w.float()) for v in student_w) and len(student_w) == 2  # target and online


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match=r"guidance_input must be \[w_lo, w_hi\]"):
        _method("consistency_distillation", guidance_input=[3.0])
    with pytest.raises(ValueError, match="either guidance.*or guidance_input"):
        _method("consistency_distillation", guidance=2.0, guidance_input=[1.0, 3.0])
    with pytest.raises(ValueError, match="supported by consistency_distillation, scott and multistep_cd"):
        _method("tbcm", guidance_input=[1.0, 3.0])
    with pytest.raises(ValueError, match="takes no guidance input"):
        _teacher()(torch.randn(2, 1, 4, 4), torch.rand(2), guidance=torch.ones(2))


def test_image_recipe_with_a_guidance_input_student_samples_at_the_recipes_w(tmp_path, monkeypatch):
    """mnist-mlcm-cfg with the student taking w as an input over [1, 4]: trained, evaluated and
    sampled at model.guidance = 3 through the input (not a fixed-w student)."""
    from kdlib.cli import main

    calls = []
    forward = MLPDenoiser.forward

    def recording(self, x, t, y=None, guidance=None):
        if self.w_embed is not None:
            calls.append(None if guidance is None else float(guidance.float().mean()))
        return forward(self, x, t, y=y, guidance=guidance)

    monkeypatch.setattr(MLPDenoiser, "forward", recording)
    args = ["distill", "image-gen", "--recipe", "mnist-mlcm-cfg", f"runs_dir={tmp_path}", "name=w", "seeds=[0]",
            "baseline=false", "train.steps=3", "method_args.total_steps=3", "train.batch_size=16",
            "train.progress=false", "model.eval_samples=40", "model.teacher_steps=[1]", "model.student_steps=[1]",
            "model.student_guidance_input=true", "method_args.guidance=1.0", "method_args.guidance_input=[1.0,4.0]"]
    assert main(args) == 0
    trained = [w for w in calls[:6] if w is not None]
    assert trained and all(1.0 <= w <= 4.0 for w in trained) and len(set(trained)) > 1  # per-batch draws
    assert calls[-1] == 3.0  # the report's sample grid: the student at model.guidance
