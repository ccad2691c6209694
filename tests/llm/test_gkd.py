"""gkd (on-policy distillation) and the generation interface of CausalLM, on tiny random Llamas."""

from __future__ import annotations

import copy

import pytest
import torch

from domains.llm.models import CausalLM
from kdlib.core.generation import continuation_targets, step_generator
from kdlib.core.method import METHODS
from kdlib.core.models import Student, Teacher
from kdlib.objectives import divergence
from tests.llm.tiny_models import tiny_llama

ROWS, VOCAB, EOS = 80, 70, 2  # 80 head rows, the last 10 padding


def _lm(hidden=32, layers=2, seed=0, rows=ROWS, vocab=VOCAB, sharpen=1.0):
    lm = tiny_llama(rows, hidden=hidden, layers=layers, seed=seed)
    with torch.no_grad():
        lm.lm_head.weight.mul_(sharpen)  # random init is near-uniform: a sharper teacher is a real target
    return CausalLM(lm, vocab)


def _eos_biased(model: CausalLM, eos_bias=3.0, pad_bias=10.0) -> CausalLM:
    """A head with a bias: EOS likely (rows end early), padding rows most likely of all unless masked."""
    old = model.lm.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[EOS] = eos_bias
        head.bias[VOCAB:] = pad_bias
    model.lm.lm_head = head
    return model


def _gkd(student, teacher, **args):
    cls = METHODS.get("gkd")
    return cls(cls.Config(**args), Student(student), Teacher(teacher))


def _batch(vocab=VOCAB, b=4, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, vocab, (b, length), generator=g)
    y = torch.randint(0, vocab, (b, length), generator=g)
    y[0, :4] = -100
    return {"x": x, "y": y}


def _loss_and_grads(method, batch, seed=0):
    method.student.model.zero_grad()
    torch.manual_seed(seed)
    loss, values = method.loss(batch, "student")
    loss.backward()
    grads = {n: p.grad.clone() for n, p in method.student.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, values


def test_generation_keeps_the_prompt_masks_after_eos_and_is_seeded():
    model = _eos_biased(_lm())
    prompt = torch.randint(3, VOCAB, (8, 5), generator=torch.Generator().manual_seed(1))
    before = torch.get_rng_state()
    ids, mask = model.generate(prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    assert ids.shape == mask.shape == (8, 17)
    assert torch.equal(ids[:, :5], prompt) and bool(mask[:, :5].all())
    assert int(ids.max()) < VOCAB and int(ids.min()) >= 0  # the padding rows (bias +10) were never sampled
    ended = 0
    for row, m in zip(ids[:, 5:], mask[:, 5:]):
        hits = (row == EOS).nonzero()
        if len(hits) == 0:
            assert bool(m.all())
            continue
        first = int(hits[0])
        assert bool(m[: first + 1].all()) and not bool(m[first + 1:].any())  # EOS kept, after it masked
        ended += first < 11
    assert ended >= 2
    again, again_mask = model.generate(prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, ids) and torch.equal(again_mask, mask)
    other, _ = model.generate(prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(other, ids)


def test_greedy_generation_equals_an_uncached_argmax_loop():
    model = _lm(seed=3, sharpen=20.0)
    prompt = torch.randint(3, VOCAB, (3, 4), generator=torch.Generator().manual_seed(2))
    ids, mask = model.generate(prompt, 7, temperature=0.0)
    seq = prompt
    with torch.no_grad():
        for _ in range(7):
            nxt = model(seq)[:, -1, :VOCAB].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    if not bool((seq[:, 4:] == EOS).any()):
        assert bool(mask.all())
    assert torch.equal(ids[mask.bool()], seq[mask.bool()])


def test_on_policy_batch_keeps_only_generated_positions():
    method = _gkd(_eos_biased(_lm()), _lm(hidden=48, layers=3, seed=1), prompt_tokens=5, new_tokens=10)
    sample = method.on_policy_batch(_batch(b=6), torch.Generator().manual_seed(0))
    assert sample["x"].shape == sample["keep"].shape == (6, 14)
    assert not bool(sample["keep"][:, :4].any())  # x[:, 4] is the last prompt token: it predicts token 5
    assert torch.equal(sample["keep"][:, 4:], sample["mask"][:, 5:].bool())
    assert not bool(sample["keep"].all())  # some rows ended early
    kept = sample["keep"]
    assert torch.equal(sample["y"][kept], sample["ids"][:, 1:][kept]) and bool((sample["y"][~kept] == -100).all())


def test_loss_is_the_divergence_over_generated_positions_and_zero_for_the_teacher_itself():
    student, teacher = _eos_biased(_lm()), _eos_biased(_lm(hidden=48, layers=3, seed=1, sharpen=30.0))
    method = _gkd(student, teacher, on_policy_fraction=1.0, prompt_tokens=5, new_tokens=10)
    batch = _batch(b=6)
    loss, _, values = _loss_and_grads(method, batch, seed=4)
    assert values["gkd/on_policy"] == 1.0 and torch.isfinite(loss) and loss > 1e-3
    # The same generation again (same global seed; the method flips its coin first), scored by hand
    # over the kept positions only.
    torch.manual_seed(4)
    generator = step_generator()
    torch.rand((), generator=generator)
    sample = method.on_policy_batch(batch, generator)
    with torch.no_grad():
        rows = divergence(student(sample["x"]), teacher(sample["x"]), "jsd", beta=0.5, vocab_size=VOCAB,
                          reduction="none")
    keep = sample["keep"]
    torch.testing.assert_close(loss, rows[keep].mean(), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(rows[keep].mean(), rows.mean())  # the mask matters
    same = _gkd(copy.deepcopy(teacher).requires_grad_(True), teacher, on_policy_fraction=1.0, prompt_tokens=5,
                new_tokens=10)
    zero, _, _ = _loss_and_grads(same, batch, seed=4)
    assert abs(float(zero)) < 1e-6


@pytest.mark.parametrize("kind", ["jsd", "rkl"])
def test_fused_and_plain_paths_agree(kind):
    student, teacher = _lm(), _lm(hidden=48, layers=3, seed=1, sharpen=10.0)
    args = dict(on_policy_fraction=1.0, prompt_tokens=4, new_tokens=6, kind=kind, temperature=2.0)
    plain, fused = _gkd(student, teacher, **args), _gkd(student, teacher, **args, fused=True, chunk_size=7)
    batch = _batch()
    ref, ref_grads, _ = _loss_and_grads(plain, batch, seed=1)
    loss, grads, _ = _loss_and_grads(fused, batch, seed=1)
    assert ref > 0
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_lambda_zero_is_off_policy_logit_kd_on_the_batch():
    student, teacher = _lm(rows=VOCAB), _lm(hidden=48, layers=3, seed=1, rows=VOCAB, sharpen=10.0)
    gkd = _gkd(student, teacher, on_policy_fraction=0.0, kind="fkl", temperature=2.0)
    cls = METHODS.get("logit_kd")
    kd = cls(cls.Config(temperature=2.0, soft_weight=1.0, hard_weight=0.0, kind="fkl"), Student(student),
             Teacher(teacher))
    batch = _batch()
    for seed in range(3):
        loss, grads, values = _loss_and_grads(gkd, batch, seed=seed)
        ref, ref_grads, _ = _loss_and_grads(kd, batch, seed=seed)
        assert values["gkd/on_policy"] == 0.0
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-8, msg=name)
    on = _gkd(student, teacher, on_policy_fraction=1.0, kind="fkl", temperature=2.0, prompt_tokens=4, new_tokens=6)
    on_loss, _, _ = _loss_and_grads(on, batch)
    assert not torch.allclose(on_loss, ref)


def test_gkd_loss_decreases_with_training():
    student, teacher = _lm(), _lm(hidden=48, layers=3, seed=1, sharpen=30.0)
    method = _gkd(student, teacher, on_policy_fraction=0.5, prompt_tokens=4, new_tokens=8)
    eval_method = _gkd(student, teacher, on_policy_fraction=1.0, prompt_tokens=4, new_tokens=8)
    batch = _batch(b=4, length=12)

    def on_policy_loss():
        with torch.no_grad():
            torch.manual_seed(123)
            return float(eval_method.loss(batch, "student")[0])

    start = on_policy_loss()
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    torch.manual_seed(0)
    flips = []
    for _ in range(40):
        opt.zero_grad()
        loss, values = method.loss(batch, "student")
        loss.backward()
        opt.step()
        flips.append(values["gkd/on_policy"])
    assert 0 < sum(flips) < len(flips)  # both branches ran
    assert on_policy_loss() < 0.7 * start


def test_bad_input_is_a_clear_error():
    student, teacher = _lm(), _lm(hidden=48, layers=3, seed=1)
    with pytest.raises(ValueError, match="on_policy_fraction"):
        _gkd(student, teacher, on_policy_fraction=1.5)
    method = _gkd(student, teacher, on_policy_fraction=1.0, prompt_tokens=20)
    with pytest.raises(ValueError, match="prompt_tokens=20"):
        method.loss(_batch(length=12), "student")

    class NoGenerate(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(*x.shape, VOCAB)

    plain = _gkd(NoGenerate(), teacher, on_policy_fraction=1.0, prompt_tokens=4)
    with pytest.raises(TypeError, match="cannot generate"):
        plain.loss(_batch(), "student")


def test_continuation_targets_shapes():
    ids = torch.tensor([[5, 6, 7, 2, 2], [5, 6, 8, 9, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    out = continuation_targets(ids, mask, prompt_tokens=2)
    assert out["keep"].tolist() == [[False, True, True, False], [False, True, True, True]]
    assert out["y"].tolist() == [[-100, 7, 2, -100], [-100, 8, 9, 4]]


def test_gkd_recipe_runs_end_to_end_on_a_tiny_teacher(tmp_path, tiny_teacher_folder, monkeypatch):
    from domains.llm import LLMDomain
    from kdlib.core.experiment import Experiment, create_run_dir
    from kdlib.core.run_config import load_run_config

    monkeypatch.setenv("KDLIB_CACHE_DIR", str(tmp_path / "cache"))
    text = "\n\n".join(" ".join(f"w{(7 * i + j) % 61}" for j in range(14)) for i in range(40))
    (tmp_path / "one.txt").write_text(text)
    overrides = [f"runs_dir={tmp_path / 'runs'}", "name=tiny", f"data.sources=[{tmp_path / 'one.txt'}]",
                 "data.block_size=12", "data.train_blocks=8", "data.eval_blocks=2", "data.teacher_cache_k=0",
                 f"model.teacher={tiny_teacher_folder}", "model.student_every=2", "model.freeze_embeddings=false",
                 "baseline=false", "train.steps=2", "train.batch_size=4", "train.progress=false",
                 "train.checkpoint_every=2", "train.log_every=1", "method_args.on_policy_fraction=1.0",
                 "method_args.prompt_tokens=4", "method_args.new_tokens=4"]
    cfg = load_run_config(LLMDomain.recipe_path("gkd"), overrides, domain="llm")
    assert cfg.method == "gkd"
    results = Experiment(create_run_dir(cfg, "test"), cfg).run()
    final = results["seeds"]["gkd"]["0"]
    assert 1.0 < final["val_one/student/ppl"] < 1e4
    logged = (tmp_path / "runs" / "tiny").rglob("metrics.jsonl")
    text = "".join(p.read_text() for p in logged)
    assert '"gkd/on_policy": 1.0' in text and "gkd/generated_tokens" in text
