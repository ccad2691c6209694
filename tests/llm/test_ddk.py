"""DDK: the mixture order's weights move toward the domain where the student trails the teacher."""

from __future__ import annotations

import pytest
import torch

from domains.llm import LLMDataConfig, LLMDomain, LLMModelConfig
from kdlib.core.data import TensorDataset
from kdlib.core.mixture import MixtureOrder


def test_mixture_follows_its_weights_and_resumes_exactly():
    domains = torch.tensor([0] * 30 + [1] * 10)
    order = MixtureOrder(domains, batch_size=20, seed=3, weights=[0.1, 0.9])
    drawn = torch.cat([order.next_global() for _ in range(20)])
    assert abs(float((domains[drawn] == 1).float().mean()) - 0.9) < 0.05
    state = order.state()
    expected = [order.next_global() for _ in range(3)]
    resumed = MixtureOrder(domains, batch_size=20, seed=3)
    resumed.load_state(state)
    assert all(torch.equal(a, resumed.next_global()) for a in expected)
    with pytest.raises(ValueError, match="cannot resume"):
        MixtureOrder(domains, batch_size=10, seed=3).load_state(state)


def test_each_domain_hands_out_new_examples_before_repeating():
    domains = torch.tensor([0] * 6 + [1] * 10)
    order = MixtureOrder(domains, batch_size=5, seed=1, weights=[0.0, 1.0])
    first = torch.cat([order.next_global(), order.next_global()])
    assert sorted(first.tolist()) == list(range(6, 16))  # one full epoch of domain 1, no repeats
    assert order.state()["drawn"] == [0, 10]


def test_ddk_update_moves_weight_to_the_larger_gap():
    order = MixtureOrder(torch.tensor([0, 0, 1, 1, 2, 2]), batch_size=2, seed=0)
    weights = order.update_ddk([2.0, 3.0, 2.2], [2.0, 2.0, 2.0])
    assert weights[1] > weights[2] > weights[0] and abs(sum(weights) - 1) < 1e-9
    # factor-smooth: the step is multiplicative on the previous weights, so the same gaps again
    # move further the same way
    again = order.update_ddk([2.0, 3.0, 2.2], [2.0, 2.0, 2.0])
    assert again[1] > weights[1] and again[0] < weights[0]


def test_ddk_update_keeps_a_floor_under_every_domain():
    order = MixtureOrder(torch.tensor([0, 1, 2]), batch_size=3, seed=0)
    for _ in range(20):  # one domain trailing by far, many times over
        weights = order.update_ddk([1.0, 50.0, 1.0], [1.0, 1.0, 1.0], smoothing=0.5)
    # α = 0.5, N = 3: at most α + (1 − α)/N, at least (1 − α)/N
    assert weights == pytest.approx([1 / 6, 2 / 3, 1 / 6])
    with pytest.raises(ValueError, match="smoothing"):
        order.update_ddk([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], smoothing=0.0)


class _Lookup(torch.nn.Module):
    """Next-token logits from the current token: confident and right where ``known``, flat elsewhere."""

    def __init__(self, known: torch.Tensor):
        super().__init__()
        self.register_buffer("table", torch.where(known[:, None], 8.0 * torch.eye(10), torch.zeros(10, 10)))

    def forward(self, x):
        return self.table[x]


def test_domain_reweights_toward_the_domain_the_student_trails_in():
    domain = LLMDomain(LLMDataConfig(mixture="ddk"), LLMModelConfig())
    x0, x1 = torch.randint(0, 5, (4, 6)), torch.randint(5, 10, (4, 6))
    val = [TensorDataset(x=x, y=x, domain=torch.full((4,), d)) for d, x in enumerate((x0, x1))]
    train = TensorDataset(x=torch.cat([x0, x1]), domain=torch.tensor([0] * 4 + [1] * 4))
    order = domain.batch_order(train, batch_size=4, seed=0)
    teacher = _Lookup(torch.ones(10, dtype=torch.bool))
    student = _Lookup(torch.arange(10) < 5)  # knows domain 0's tokens only
    domain._teacher = teacher
    for split in val:
        domain.evaluate(teacher, split)
    assert order.state()["weights"] == [0.5, 0.5]  # the teacher alone changes nothing
    for split in val:
        domain.evaluate(student, split)
    weights = order.state()["weights"]
    assert weights[1] == pytest.approx(0.75, abs=1e-6), weights  # N = 2: the most the floor (1 − α)/N leaves
    assert LLMDomain(LLMDataConfig(), LLMModelConfig()).batch_order(train, 4, 0) is None


def test_domain_steers_by_its_validation_blocks_not_the_reported_ones():
    domain = LLMDomain(LLMDataConfig(mixture="ddk"), LLMModelConfig())
    x0, x1 = torch.randint(0, 5, (4, 6)), torch.randint(5, 10, (4, 6))
    # the reported held-out splits hold domain 0's tokens only, so on them the student equals the
    # teacher; the steering blocks of domain 1 hold tokens the student does not know
    val = [TensorDataset(x=x0, y=x0, domain=torch.full((4,), d)) for d in range(2)]
    domain._steer = {0: TensorDataset(x=x0, y=x0), 1: TensorDataset(x=x1, y=x1)}
    train = TensorDataset(x=torch.cat([x0, x1]), domain=torch.tensor([0] * 4 + [1] * 4))
    order = domain.batch_order(train, batch_size=4, seed=0)
    teacher, student = _Lookup(torch.ones(10, dtype=torch.bool)), _Lookup(torch.arange(10) < 5)
    domain._teacher = teacher
    for split in val:
        domain.evaluate(teacher, split)
    reported = [domain.evaluate(student, split) for split in val]
    assert reported[0]["nll"] == pytest.approx(reported[1]["nll"])  # the reported splits see no gap
    assert reported[1]["ddk_nll"] > reported[0]["ddk_nll"] + 1  # the steering blocks do
    assert order.state()["weights"][1] == pytest.approx(0.75, abs=1e-6)
