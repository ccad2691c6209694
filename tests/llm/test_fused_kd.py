"""fused_logit_kd (LM-head kernel, logits never materialised) against the plain logit_kd path."""

from __future__ import annotations

import pytest
import torch

from domains.llm.models import CausalLM
from kdlib.core.method import METHODS
from kdlib.core.models import Student, Teacher
from tests.llm.tiny_models import tiny_llama


def _pair(vocab_rows, real_vocab):
    student = CausalLM(tiny_llama(vocab_rows, hidden=32, layers=2, seed=0), real_vocab)
    teacher = CausalLM(tiny_llama(vocab_rows, hidden=48, layers=3, seed=1), real_vocab)
    return Student(student), Teacher(teacher)


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (2, 9), generator=g)
    y = torch.randint(0, vocab, (2, 9), generator=g)
    y[0, :3] = -100
    return {"x": x, "y": y}


def _loss_and_grads(method, batch):
    method.student.model.zero_grad()
    loss, _ = method.loss(batch, "student")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in method.student.model.named_parameters()}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["fkl", "jsd"])
def test_fused_matches_plain_loss_and_gradients(backend, kind):
    student, teacher = _pair(101, 101)
    args = dict(temperature=2.0, soft_weight=0.7, hard_weight=0.3, kind=kind)
    plain = METHODS.get("logit_kd")(METHODS.get("logit_kd").Config(**args), student, teacher)
    fused = METHODS.get("fused_logit_kd")(
        METHODS.get("fused_logit_kd").Config(**args, chunk_size=7, backend=backend), student, teacher)
    batch = _batch(101)
    ref_loss, ref_grads = _loss_and_grads(plain, batch)
    loss, grads = _loss_and_grads(fused, batch)
    assert ref_loss > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in ref_grads.items():
        assert g.abs().max() > 0 or "teacher" in name
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_padded_vocab_rows_are_masked():
    # 112 head rows, 100 real tokens: the fused loss must equal the plain loss on the real columns,
    # and the padding rows of the head must get no gradient.
    student, teacher = _pair(112, 100)
    batch = _batch(100, seed=1)
    fused = METHODS.get("fused_logit_kd")(METHODS.get("fused_logit_kd").Config(), student, teacher)
    loss, grads = _loss_and_grads(fused, batch)

    class RealColumns(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, x):
            return self.lm(x)[..., :100]

    plain = METHODS.get("logit_kd")(METHODS.get("logit_kd").Config(), Student(RealColumns(student.model)),
                                    Teacher(RealColumns(teacher.model)))
    ref_loss, _ = _loss_and_grads(plain, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    head = grads["lm.lm_head.weight"]
    assert head[:100].abs().max() > 0
    assert torch.equal(head[100:], torch.zeros_like(head[100:]))


def test_mismatched_real_vocab_is_an_error():
    student, teacher = _pair(101, 101)
    teacher.model.vocab_size = 99
    fused = METHODS.get("fused_logit_kd")(METHODS.get("fused_logit_kd").Config(), student, teacher)
    with pytest.raises(ValueError, match="student has 101 real tokens, teacher 99"):
        fused.loss(_batch(99), "student")
