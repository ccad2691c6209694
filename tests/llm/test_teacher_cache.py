"""The teacher top-k cache: exact at k = V, stale detection, and the cached_kd method on it."""

from __future__ import annotations

import warnings

import pytest
import torch

from kdlib.core.method import METHODS
from kdlib.core.models import Student, Teacher
from kdlib.core.teacher_cache import cached_divergence, load_signal, save_signal, topk_signal
from kdlib.objectives import divergence


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_full_topk_equals_the_plain_divergence(kind):
    s, t = torch.randn(3, 5, 40), 3 * torch.randn(3, 5, 40)
    signal = topk_signal(lambda x: x, t, k=40, batch_size=2)
    torch.testing.assert_close(cached_divergence(s, signal, kind), divergence(s, t, kind))


def test_topk_keeps_the_tail_mass_and_lower_bounds_the_kl():
    s, t = torch.randn(4, 30), 2 * torch.randn(4, 30)
    signal = topk_signal(lambda x: x, t, k=5)
    p = torch.softmax(t, -1)
    top = p.topk(5, -1).values
    torch.testing.assert_close(signal["logp"].exp(), top)
    torch.testing.assert_close(signal["tail"].exp(), 1 - top.sum(-1))
    coarse, full = cached_divergence(s, signal), divergence(s, t, "fkl")
    assert 0 < coarse < full


def test_padded_vocab_columns_are_dropped():
    t = torch.randn(2, 12)
    t[:, 10:] = 50.0  # padding columns with huge logits must not enter the signal
    signal = topk_signal(lambda x: x, t, k=3, vocab_size=10)
    assert int(signal["ids"].max()) < 10
    torch.testing.assert_close(signal["logp"].exp(), torch.softmax(t[:, :10], -1).topk(3).values)


def test_stale_cache_is_detected(tmp_path):
    path = tmp_path / "signal.safetensors"
    signal = topk_signal(lambda x: x, torch.randn(2, 8), k=2)
    key = {"teacher": "a", "tokenizer": "b", "data": "c", "k": "2"}
    assert load_signal(path, key) is None  # missing: no warning, just absent
    save_signal(path, signal, key)
    loaded = load_signal(path, key)
    assert torch.equal(loaded["ids"], signal["ids"])
    with pytest.warns(UserWarning, match="stale.*teacher"):
        assert load_signal(path, {**key, "teacher": "other"}) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_signal(path, key) is not None


def test_cached_kd_equals_logit_kd_on_a_full_cache():
    torch.manual_seed(0)
    student, teacher = torch.nn.Embedding(20, 20), torch.nn.Embedding(20, 20)
    x = torch.randint(0, 20, (3, 6))
    y = torch.randint(0, 20, (3, 6))
    y[:, 0] = -100
    signal = topk_signal(teacher, x, k=20)
    batch = {"x": x, "y": y, **{f"teacher_{k}": v for k, v in signal.items()}}
    cfg = dict(temperature=1.0, soft_weight=0.8, hard_weight=0.2)
    cached, _ = METHODS.get("cached_kd")(METHODS.get("cached_kd").Config(**cfg), Student(student), None).loss(
        batch, "student")
    plain, _ = METHODS.get("logit_kd")(METHODS.get("logit_kd").Config(**cfg), Student(student),
                                       Teacher(teacher)).loss(batch, "student")
    torch.testing.assert_close(cached, plain)
    with pytest.raises(KeyError, match="teacher_cache_k"):
        METHODS.get("cached_kd")(METHODS.get("cached_kd").Config(), Student(student), None).loss(
            {"x": x, "y": y}, "student")
