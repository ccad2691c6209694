"""seq_kd (sequence-level KD): cross-entropy on the teacher's own continuations, generated positions only."""

from __future__ import annotations

import pytest
import torch

from kdlib.core.method import METHODS
from kdlib.core.models import Student, Teacher
from kdlib.objectives import cross_entropy
from tests.llm.test_gkd import EOS, VOCAB, _batch, _eos_biased, _lm


def _seq_kd(student, teacher, **args):
    cls = METHODS.get("seq_kd")
    return cls(cls.Config(**args), Student(student), Teacher(teacher))


def _greedy(model, prompt, steps):
    """Greedy decoding without a KV cache: the reference for the batched, cached generate."""
    seq = prompt
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, model(seq)[:, -1, :VOCAB].argmax(-1, keepdim=True)], 1)
    return seq


def test_targets_are_the_teachers_greedy_continuation():
    student, teacher = _lm(), _lm(hidden=48, layers=3, seed=1, sharpen=30.0)
    method = _seq_kd(student, teacher, prompt_tokens=5, new_tokens=7)
    batch = _batch(length=12)
    targets = method.teacher_targets(batch)
    expected = _greedy(teacher, batch["x"][:, :5], 7)
    ended = bool((expected[:, 5:-1] == EOS).any())
    assert not ended  # (the check below covers every position only while no row stops)
    assert torch.equal(targets["ids"], expected)
    assert torch.equal(targets["x"], expected[:, :-1])
    assert bool((targets["y"][:, :4] == -100).all())  # prompt positions are not trained on
    assert torch.equal(targets["y"][:, 4:], expected[:, 5:])
    # The loss is the student's cross-entropy on exactly those targets, and trains the student only.
    loss, values = method.loss(batch, "student")
    torch.testing.assert_close(loss, cross_entropy(student(expected[:, :-1]), targets["y"]))
    assert values["seq_kd/generated_tokens"] == 7.0
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.lm.lm_head.weight.grad.abs().max() > 0


def test_sampled_targets_mask_after_eos_and_follow_the_seed():
    teacher = _eos_biased(_lm(hidden=48, layers=3, seed=1))
    method = _seq_kd(_lm(), teacher, prompt_tokens=4, new_tokens=10, temperature=1.0)
    batch = _batch(b=8)
    torch.manual_seed(0)
    first = method.teacher_targets(batch, torch.Generator().manual_seed(3))
    again = method.teacher_targets(batch, torch.Generator().manual_seed(3))
    assert torch.equal(first["ids"], again["ids"])
    y = first["y"][:, 3:]  # the generated positions
    stopped = 0
    for row in y:
        hits = (row == EOS).nonzero()
        if len(hits):
            first_eos = int(hits[0])
            assert bool((row[first_eos + 1:] == -100).all()) and bool((row[: first_eos + 1] >= 0).all())
            stopped += first_eos < len(row) - 1
    assert stopped >= 2
    assert int(first["ids"].max()) < VOCAB  # the padded head rows (bias +10) are never generated


def test_seq_kd_makes_the_student_reproduce_the_teacher():
    student, teacher = _lm(), _lm(hidden=48, layers=3, seed=1, sharpen=30.0)
    method = _seq_kd(student, teacher, prompt_tokens=4, new_tokens=8)
    batch = _batch(b=4)
    expected = _greedy(teacher, batch["x"][:, :4], 8)[:, 4:]

    def agreement():
        return float((_greedy(student, batch["x"][:, :4], 8)[:, 4:] == expected).float().mean())

    start_agree = agreement()
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss, _ = method.loss(batch, "student")
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]
    assert agreement() > max(0.8, start_agree)


def test_bad_config_is_a_clear_error():
    student, teacher = _lm(), _lm(hidden=48, layers=3, seed=1)
    with pytest.raises(ValueError, match="temperature"):
        _seq_kd(student, teacher, temperature=-1.0)
    with pytest.raises(ValueError, match="new_tokens"):
        _seq_kd(student, teacher, new_tokens=0)


def test_seq_kd_recipe_with_a_lora_student_runs_end_to_end(tmp_path, tiny_teacher_folder, monkeypatch):
    """The seq-kd recipe on the tiny teacher with a LoRA student; the saved student is the merged model."""
    from transformers import AutoModelForCausalLM

    from domains.llm import LLMDomain
    from kdlib.core.experiment import Experiment, create_run_dir
    from kdlib.core.run_config import load_run_config

    monkeypatch.setenv("KDLIB_CACHE_DIR", str(tmp_path / "cache"))
    text = "\n\n".join(" ".join(f"w{(5 * i + j) % 61}" for j in range(14)) for i in range(40))
    (tmp_path / "one.txt").write_text(text)
    overrides = [f"runs_dir={tmp_path / 'runs'}", "name=tiny", f"data.sources=[{tmp_path / 'one.txt'}]",
                 "data.block_size=12", "data.train_blocks=8", "data.eval_blocks=2",
                 f"model.teacher={tiny_teacher_folder}", "model.student=lora", "model.lora_rank=2",
                 "baseline=false", "train.steps=2", "train.batch_size=4", "train.progress=false",
                 "train.checkpoint_every=2", "train.lr=1e-2", "method_args.prompt_tokens=4",
                 "method_args.new_tokens=4"]
    cfg = load_run_config(LLMDomain.recipe_path("seq-kd"), overrides, domain="llm")
    assert cfg.method == "seq_kd" and cfg.model.student == "lora"
    results = Experiment(create_run_dir(cfg, "test"), cfg).run()
    assert 1.0 < results["seeds"]["seq_kd"]["0"]["val_one/student/ppl"] < 1e4
    folder = tmp_path / "runs" / "tiny" / "students" / "seq_kd"
    assert not list(folder.glob("adapter_*"))  # a plain transformers folder, adapters merged
    saved = AutoModelForCausalLM.from_pretrained(folder)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_folder)
    assert saved.config.num_hidden_layers == teacher.config.num_hidden_layers
    # Two steps at lr 1e-2 moved the merged attention weights away from the teacher's.
    q_saved, q_teacher = saved.model.layers[0].self_attn.q_proj.weight, teacher.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q_saved, q_teacher)
    torch.testing.assert_close(saved.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)


def test_every_new_recipe_resolves():
    from domains.llm import LLMDomain
    from kdlib.core.run_config import load_run_config

    gkd = load_run_config(LLMDomain.recipe_path("gkd"), domain="llm")
    assert gkd.method == "gkd" and gkd.method_args.kind == "jsd" and gkd.data.teacher_cache_k == 0
    seq = load_run_config(LLMDomain.recipe_path("seq-kd"), domain="llm")
    assert seq.method == "seq_kd" and seq.method_args.temperature == 0.0
    # Same student, data and steps as the default recipe: comparable runs.
    default = load_run_config(LLMDomain.recipe_path("default"), domain="llm")
    for cfg in (gkd, seq):
        assert cfg.model == default.model and cfg.train == default.train
        assert cfg.data.sources == default.data.sources and cfg.data.block_size == default.data.block_size
