"""``kdlib distill image --recipe R --dry-run`` for every shipped recipe of domains/image/recipes:
it exits 0 without creating a run, and every trained parameter group of every stage gets an
activation estimate (none is left "not estimated" because its loss read tensor values)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("mlxtend")

import domains.image.gen as gen  # noqa: E402
import kdlib.core.memory as memory  # noqa: E402
from kdlib.cli import main  # noqa: E402

RECIPES = sorted(p.stem for p in (Path(__file__).parents[2] / "domains" / "image" / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def splits_loaded_once():
    """Parsing MNIST takes longer than a dry run: each data config is loaded once for the module."""
    loaded = {}
    load = gen.load_gen_splits

    def cached(cfg, image_shape):
        key = (repr(cfg), tuple(image_shape))
        if key not in loaded:
            loaded[key] = load(cfg, image_shape)
        return loaded[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gen, "load_gen_splits", cached)
        yield


@pytest.mark.parametrize("recipe", RECIPES)
def test_dry_run_estimates_every_trained_group(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    stages: list[memory.StageMemory] = []
    estimate_run = memory.estimate_run
    monkeypatch.setattr(memory, "estimate_run", lambda cfg: stages.extend(estimate_run(cfg)) or stages)
    assert main(["distill", "image", "--recipe", recipe, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "nothing was allocated or trained" in out and "not estimated" not in out
    assert stages and not (tmp_path / "runs").exists()
    for stage in stages:
        assert not stage.unmeasured, (stage.name, stage.unmeasured)
        # step_temporaries has one entry per group with its own update (joint groups ride along)
        missing = [g for g in stage.step_temporaries if stage.activations.get(g, 0) <= 0]
        assert not missing, (stage.name, missing)
