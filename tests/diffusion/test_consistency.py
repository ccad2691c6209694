"""The consistency parameterisation's boundary condition and few-step consistency sampling."""

from __future__ import annotations

import pytest
import torch

from kdlib.diffusion.consistency import ConsistencyModel, consistency_sample, default_times
from kdlib.diffusion.param import PARAMETERISATIONS, get_parameterisation
from tests.diffusion.nets import RandomNet


@pytest.mark.parametrize("name", list(PARAMETERISATIONS))
@pytest.mark.parametrize("boundary", [None, "cm"])
def test_boundary_condition_holds_for_any_weights(name, boundary, seeded):
    param = get_parameterisation(name)
    model = ConsistencyModel(RandomNet(), param, boundary=boundary)
    x = torch.randn(5, 6, generator=seeded, dtype=torch.float64)
    t_min = torch.full((5,), param.t_min, dtype=torch.float64)
    torch.testing.assert_close(model(x, t_min), x)
    # away from the boundary the network matters
    t_mid = torch.full((5,), 0.5 * (param.t_min + param.t_max), dtype=torch.float64)
    assert (model(x, t_mid) - x).abs().max() > 1e-3


def test_param_boundary_refused_where_not_exact():
    with pytest.raises(ValueError, match="cm"):
        ConsistencyModel(RandomNet(), get_parameterisation("vp-eps"), boundary="param")


def test_consistency_sampling_steps_and_renoising(seeded):
    param = get_parameterisation("fm")
    calls = []

    def model(x, t):
        calls.append(float(t[0]))
        return torch.full_like(x, 0.25)  # a perfect model of the point mass at 0.25

    noise = torch.randn(8, 3, generator=seeded)
    out = consistency_sample(model, param, noise, default_times(param, 4), generator=seeded)
    assert calls == pytest.approx([1.0, 0.75, 0.5, 0.25])
    torch.testing.assert_close(out, torch.full_like(out, 0.25))
    # one step starts from pure noise at t = 1: x_1 = ε
    seen = []
    consistency_sample(lambda x, t: seen.append(x) or x, param, noise, [1.0])
    torch.testing.assert_close(seen[0], noise)
    with pytest.raises(ValueError, match="decrease"):
        consistency_sample(model, param, noise, [0.5, 1.0])
