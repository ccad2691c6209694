"""The generative image domain: real MNIST splits, FD-digits separating real from bad samples,
the shipped teacher, a tiny end-to-end consistency-distillation run with its report and
``kdlib sample``, and clear errors for mismatched set-ups."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("mlxtend")

from domains.image.gen import ASSET_DIR, ImageGenDataConfig, ImageGenDomain, ImageGenModelConfig  # noqa: E402
from domains.image.gen_metrics import DigitsScorer  # noqa: E402
from kdlib.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def domain():
    return ImageGenDomain(ImageGenDataConfig(), ImageGenModelConfig(eval_samples=200, teacher_steps=[10, 1]))


@pytest.fixture(scope="module")
def splits(domain):
    return domain.datasets()


def test_splits_are_real_disjoint_and_stratified(splits):
    train, test = splits["train"].tensors, splits["test"].tensors
    assert train["x"].shape == (4000, 1, 28, 28) and test["x"].shape == (1000, 1, 28, 28)
    assert train["x"].min() == -1 and train["x"].max() == 1
    assert torch.bincount(test["y"]).tolist() == [100] * 10
    # no test image appears in the training split
    flat_train = {tuple(v) for v in train["x"].flatten(1).tolist()}
    assert not any(tuple(v) in flat_train for v in test["x"].flatten(1).tolist())


def test_fd_digits_separates_real_from_bad_samples(splits):
    test = splits["test"].tensors
    # the test split is ordered by class: interleave to get two halves with every digit
    scorer = DigitsScorer(ASSET_DIR / "fd_digits_classifier.safetensors", test["x"][::2])
    real = scorer.score(test["x"][1::2], test["y"][1::2])
    blurred = scorer.score(torch.nn.functional.avg_pool2d(test["x"][1::2], 3, 1, 1), test["y"][1::2])
    noise = scorer.score(torch.rand(500, 1, 28, 28) * 2 - 1)
    assert real["fd_digits"] < blurred["fd_digits"] < noise["fd_digits"]
    assert real["class_acc"] > 0.95 and real["precision"] > 0.7 and noise["precision"] < 0.05


def test_shipped_teacher_generates_digits(domain, splits):
    teacher = domain.load_teacher_weights(domain.build_teacher(), "assets/mnist_fm_teacher.safetensors").eval()
    metrics = domain.evaluate(teacher, splits["test"])
    assert metrics["class_acc_10step"] > 0.8
    # more steps, better samples; one Euler step of a flow-matching teacher is a blur
    assert metrics["fd_digits_10step"] < 0.7 * metrics["fd_digits_1step"]


def test_tiny_distillation_run_report_and_sample(tmp_path):
    rc = main(["distill", "image-gen", f"runs_dir={tmp_path}", "name=tiny", "seeds=[0]",
               "train.steps=3", "train.batch_size=16", "train.progress=false", "model.eval_samples=40",
               "model.teacher_steps=[2,1]", "model.student_steps=[1,2]", "--recipe", "mnist-cd"])
    assert rc == 0
    run = tmp_path / "tiny"
    report = (run / "report.md").read_text()
    assert "Teacher vs student, paired by step count" in report and "student (ict)" in report
    assert (run / "plots" / "samples.png").stat().st_size > 1000
    assert main(["sample", str(run), "--count", "20", "--steps", "2"]) == 0
    images = torch.load(run / "samples" / "seed0-consistency_distillation-2step" / "samples.pt")
    assert images.shape == (20, 1, 28, 28) and images.abs().max() <= 1


def test_wrong_parameterisation_stops_before_training(tmp_path):
    with pytest.raises(ValueError, match="param"):
        main(["distill", "image-gen", f"runs_dir={tmp_path}", "method_args.param=edm", "train.steps=1",
              "model.eval_samples=20", "--recipe", "mnist-cd"])


def test_train_teacher_reproduces_a_loadable_teacher(tmp_path, domain):
    """``kdlib train-teacher image`` runs the shipped teacher's recipe (a few steps here): the file
    it writes records its parameterisation and loads, tensor for tensor, into the domain's teacher."""
    from safetensors import safe_open

    out = tmp_path / "teacher.safetensors"
    assert main(["train-teacher", "image", "--steps", "3", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["param"] == "fm"
        saved = {k: f.get_tensor(k) for k in f.keys()}
    loaded = domain.load_teacher_weights(domain.build_teacher(), str(out)).state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k].float(), loaded[k].float()) for k in saved)
    assert main(["train-teacher", "llm"]) == 2
