"""DMD in the generative image domain: the domain attaches the teacher's ODE pairs when the method
asks (``needs_ode_pairs``), the pairs are the teacher's ODE solutions from their noise under each
row's label, they are cached on disk (reused, stale or broken files recomputed, written
atomically), and the mnist-dmd recipe runs end to end through the CLI on them."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("mlxtend")

import domains.image.gen_pairs as gen_pairs  # noqa: E402
from domains.image.gen import ImageGenDataConfig, ImageGenDomain, ImageGenModelConfig  # noqa: E402
from kdlib.cli import main  # noqa: E402
from kdlib.core.data import TensorDataset  # noqa: E402
from kdlib.core.method import METHODS  # noqa: E402
from kdlib.core.models import Student, Teacher  # noqa: E402
from kdlib.diffusion.samplers import sample  # noqa: E402

TEACHER = "assets/mnist_fm_teacher.safetensors"
STEPS = 3


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("KDLIB_CACHE_DIR", str(folder))
    return folder / "image-gen" / "ode-pairs"


@pytest.fixture(scope="module")
def setup():
    domain = ImageGenDomain(ImageGenDataConfig(ode_pairs=30, ode_pair_steps=STEPS),
                            ImageGenModelConfig(eval_samples=40))
    train = domain.datasets()["train"]
    teacher = Teacher(domain.load_teacher_weights(domain.build_teacher(), TEACHER))
    return domain, train, teacher


def _method(name, domain, teacher, **args):
    cls = METHODS.get(name)
    return cls(cls.Config(param="fm", **args), Student(domain.build_student()), teacher)


def _no_solving(*args, **kwargs):
    raise AssertionError("the teacher was run: the cached pairs were not reused")


def test_pairs_are_the_teachers_ode_solutions_of_their_noise(setup):
    domain, train, teacher = setup
    data = domain.stage_data(train, _method("dmd", domain, teacher))
    t = data.tensors
    assert set(t) == {"x", "y", "ode_noise", "ode_x"} and len(data) == len(train)
    assert torch.equal(t["x"], train.tensors["x"]) and torch.equal(t["y"], train.tensors["y"])
    # 30 pairs stratified by label (3 per digit), each row carrying one of its own label's in turn
    noise = t["ode_noise"].flatten(1)
    distinct = noise.unique(dim=0)
    assert len(distinct) == 30
    for c in range(10):
        rows = (t["y"] == c).nonzero().flatten()
        assert len(noise[rows].unique(dim=0)) == 3
        assert torch.equal(noise[rows[0]], noise[rows[3]]) and not torch.equal(noise[rows[0]], noise[rows[1]])
    # the pair set's noise is N(0, I) drawn with the pair seed
    expected = torch.randn((30, 1, 28, 28), generator=torch.Generator().manual_seed(0)).flatten(1)
    assert all((noise == expected[i]).all(1).any() for i in range(30))
    # ode_x is the teacher's Euler solution (model.teacher_sampler, ode_pair_steps) of that noise
    # under the row's label, solved here row by row
    for i in [0, 1, 17, 1234, 3999]:
        solved = sample(teacher, domain.param, t["ode_noise"][i:i + 1], STEPS, "euler", cond={"y": t["y"][i:i + 1]})
        torch.testing.assert_close(t["ode_x"][i:i + 1], solved, atol=1e-4, rtol=1e-4)
    # and not the unconditional or another label's solution
    wrong = sample(teacher, domain.param, t["ode_noise"][:1], STEPS, "euler", cond={"y": (t["y"][:1] + 1) % 10})
    assert (t["ode_x"][:1] - wrong).abs().max() > 0.1


def test_methods_that_do_not_ask_get_the_split_unchanged(setup):
    domain, train, teacher = setup
    assert domain.stage_data(train, _method("dmd", domain, teacher, regression_weight=0.0)) is train
    assert domain.stage_data(train, _method("dmd2", domain, teacher)) is train
    with pytest.raises(ValueError, match="stage_data"):  # DMD's own error names the way to get them
        _method("dmd", domain, teacher).loss({"x": train.tensors["x"][:4], "y": train.tensors["y"][:4]},
                                             "student")


def test_pairs_are_cached_reused_and_recomputed_when_stale_or_broken(setup, cache, monkeypatch):
    domain, train, teacher = setup
    subset = TensorDataset(x=train.tensors["x"][::40], y=train.tensors["y"][::40])  # 100 rows
    options = dict(count=20, steps=2, sampler="euler", guidance=1.0, seed=0)
    made = gen_pairs.ode_pairs(subset, teacher, domain.param, **options)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # no temporary file left behind
    assert len(made["rows"]) == 20

    real_solver = gen_pairs.add_ode_pairs
    monkeypatch.setattr(gen_pairs, "add_ode_pairs", _no_solving)
    again = gen_pairs.ode_pairs(subset, teacher, domain.param, **options)
    assert all(torch.equal(again[k], made[k]) for k in made)

    # another key in the same slot: a guided teacher, another teacher's weights
    monkeypatch.setattr(gen_pairs, "add_ode_pairs", real_solver)
    with pytest.warns(UserWarning, match="stale .*guidance"):
        guided = gen_pairs.ode_pairs(subset, teacher, domain.param, **{**options, "guidance": 2.0})
    assert not torch.equal(guided["ode_x"], made["ode_x"])
    other = Teacher(domain.build_teacher())  # untrained weights
    with pytest.warns(UserWarning, match="stale .*teacher"):
        gen_pairs.ode_pairs(subset, other, domain.param, **options)
    # other steps, counts or teacher dtypes are other slots
    gen_pairs.ode_pairs(subset, teacher, domain.param, **{**options, "steps": 3})
    bf16 = Teacher(domain.load_teacher_weights(domain.build_teacher(), TEACHER), dtype=torch.bfloat16)
    low = gen_pairs.ode_pairs(subset, bf16, domain.param, **options)
    assert low["ode_x"].dtype == torch.float32 and (low["ode_x"] - made["ode_x"]).abs().max() < 0.1
    assert len(list(cache.iterdir())) == 3

    # a truncated file (a run killed while another wrote it by hand) is recomputed, not fatal
    files[0].write_bytes(files[0].read_bytes()[:100])
    with pytest.warns(UserWarning, match="unreadable"):
        fixed = gen_pairs.ode_pairs(subset, teacher, domain.param, **options)
    assert all(torch.equal(fixed[k], made[k]) for k in made)
    assert not [f for f in cache.iterdir() if f.name.endswith(".tmp")]


def test_recipe_runs_end_to_end_and_reuses_its_cached_pairs(tmp_path, cache, monkeypatch):
    args = ["distill", "image", "--recipe", "mnist-dmd", f"runs_dir={tmp_path}", "seeds=[0]", "baseline=false",
            "train.steps=3", "train.batch_size=16", "train.progress=false", "model.eval_samples=40",
            "model.teacher_steps=[1]", "model.student_steps=[1,2]", "data.ode_pairs=40", f"data.ode_pair_steps={STEPS}"]
    assert main([*args, "name=first"]) == 0
    run = tmp_path / "first"
    final = json.loads((run / "results.json").read_text())["seeds"]["dmd"]["0"]
    assert 0 < final["test/student/fd_digits_1step"] < float("inf")
    assert final["test/student/class_acc_2step"] > 0.3  # initialised from the teacher: still digits
    assert "student (dmd)" in (run / "report.md").read_text()
    logged = [json.loads(line) for line in (run / "stages" / "seed0-dmd" / "metrics.jsonl").read_text().splitlines()]
    regression = [r["dmd/regression"] for r in logged if "dmd/regression" in r]
    assert regression and all(0 <= v < float("inf") for v in regression)
    files = list(cache.iterdir())
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns

    # a second run of the recipe loads the pairs: the teacher never solves them again
    monkeypatch.setattr(gen_pairs, "add_ode_pairs", _no_solving)
    assert main([*args, "name=second"]) == 0
    assert list(cache.iterdir()) == files and files[0].stat().st_mtime_ns == stamp
    first = json.loads((run / "results.json").read_text())["seeds"]["dmd"]["0"]
    second = json.loads((tmp_path / "second" / "results.json").read_text())["seeds"]["dmd"]["0"]
    assert second["test/student/fd_digits_1step"] == pytest.approx(first["test/student/fd_digits_1step"])


def test_dry_run_measures_the_pairs_without_solving_them(cache, capsys, monkeypatch):
    monkeypatch.setattr(gen_pairs, "add_ode_pairs", _no_solving)
    assert main(["distill", "image", "--recipe", "mnist-dmd", "--dry-run", "baseline=false"]) == 0
    out = capsys.readouterr().out
    assert "stage seed0-dmd: dmd" in out and "35.9 MiB" in out  # x, ode_noise, ode_x of 4,000 digits (+ y)
    assert not cache.exists()
