import pytest

from domains.image import ImageDomain
from kdlib.core.config import ConfigError, parse_overrides, to_dict
from kdlib.core.run_config import load_run_config

RECIPE = ImageDomain.recipe_path("classifier-kd")


def test_recipe_resolves_with_typed_sections():
    cfg = load_run_config(RECIPE)
    assert cfg.domain == "image" and cfg.method == "logit_kd"
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(0.005)
    assert cfg.method_args.temperature == 4.0
    assert cfg.model.student_hidden == [128]


def test_default_recipe_is_the_generative_one_for_both_image_domains():
    """``kdlib distill image`` runs the image-gen default (domains sharing a recipes folder run each
    other's recipes); ``kdlib distill image-gen`` runs the same one."""
    from domains.image.gen import ImageGenDomain

    cfg = load_run_config(ImageDomain.recipe_path(None), domain="image")
    # mnist-mlcm-dmd2: MLCM with CFG-augmented targets, then DMD2 at the same guidance, at which the
    # teacher is evaluated too
    assert cfg.domain == "image-gen" and cfg.method == "dmd2"
    assert [(s.name, s.method) for s in cfg.stages] == [("mlcm", "multistep_cd"), ("dmd2", "dmd2")]
    assert cfg.stages[0].method_args.guidance == cfg.method_args.guidance == cfg.model.guidance > 1
    same = load_run_config(ImageGenDomain.recipe_path(None), domain="image-gen")
    assert to_dict(cfg) == to_dict(same)
    with pytest.raises(ConfigError, match="is for domain 'image-gen', not 'llm'"):
        load_run_config(ImageDomain.recipe_path(None), domain="llm")


def test_overrides_are_typed_and_nested():
    cfg = load_run_config(RECIPE, ["train.lr=3e-4", "seeds=[7, 8]", "method_args.kind=jsd", "train.steps=12"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.seeds == [7, 8]
    assert cfg.method_args.kind == "jsd" and cfg.train.steps == 12
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_unknown_key_names_key_closest_and_recipe():
    with pytest.raises(ConfigError) as err:
        load_run_config(RECIPE, ["train.lrr=0.1"])
    msg = str(err.value)
    assert "train.lrr" in msg and "'train.lr'" in msg and str(RECIPE) in msg


def test_unknown_top_level_and_method_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'sedes'.*did you mean 'seeds'"):
        load_run_config(RECIPE, ["sedes=[1]"])
    with pytest.raises(ConfigError, match=r"method_args.temprature.*'method_args.temperature'"):
        load_run_config(RECIPE, ["method_args.temprature=2"])


def test_wrong_type_names_key_type_and_value():
    with pytest.raises(ConfigError, match=r"train.steps must be int, got 'many' \(str\)"):
        load_run_config(RECIPE, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"train.precision='fp8' is not one of"):
        load_run_config(RECIPE, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"model.student_hidden must be"):
        load_run_config(RECIPE, ["model.student_hidden=3"])


def test_bad_values_and_unknown_method_stop_before_work():
    with pytest.raises(ConfigError, match="batch_size=10 must be divisible by train.grad_accum=3"):
        load_run_config(RECIPE, ["train.batch_size=10", "train.grad_accum=3"])
    with pytest.raises(ConfigError, match=r"unknown method 'logit_kdd'.*did you mean 'logit_kd'"):
        load_run_config(RECIPE, ["method=logit_kdd"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.steps"])


def test_a_recipe_that_switches_method_starts_its_options_afresh(tmp_path):
    """``extends`` and overrides merge deeply, except that naming another method drops the parent's
    options for the old one (they would be unknown keys of the new method); the same method keeps
    inheriting them."""
    from kdlib.core.config import load_yaml, merge_recipe

    (tmp_path / "base.yaml").write_text("method: a\nmethod_args: {x: 1, y: 2}\nbaseline_method: b\n"
                                        "baseline_args: {z: 3}\ntrain: {steps: 5}\n")
    (tmp_path / "same.yaml").write_text("extends: base.yaml\nmethod: a\nmethod_args: {y: 9}\n")
    (tmp_path / "other.yaml").write_text("extends: base.yaml\nmethod: c\nmethod_args: {w: 4}\n")
    assert load_yaml(tmp_path / "same.yaml")["method_args"] == {"x": 1, "y": 9}
    other = load_yaml(tmp_path / "other.yaml")
    assert other["method_args"] == {"w": 4} and other["baseline_args"] == {"z": 3} and other["train"] == {"steps": 5}
    switched = merge_recipe(other, {"baseline_method": "d"})
    assert "baseline_args" not in switched and switched["method_args"] == {"w": 4}
