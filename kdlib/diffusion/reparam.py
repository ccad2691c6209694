"""A network trained in one parameterisation, seen through another.

sCM distils in TrigFlow, but teachers come as flow-matching, EDM or VP networks. Two
parameterisations describe the same noisy state when their noise-to-signal ratios σ/α agree
(``kdlib.diffusion.param``), so any network converts exactly: map the state and time into the
source parameterisation, ask the network, turn its prediction into (x̂0, ε̂), and express those as
the destination's prediction. Every step is differentiable in x and t, so ``torch.func.jvp``
through the wrapper gives the time derivative in the destination parameterisation (what sCM needs).
"""

from __future__ import annotations

import torch
from torch import nn

from kdlib.diffusion.param import Parameterisation, convert_state


class ReparameterisedNet(nn.Module):
    """``net`` (trained in ``src``) as a network of ``dst``.

    forward(x_in, t_in, **cond): ``dst``'s model input (what ``dst.predict`` feeds a network,
    e.g. TrigFlow's x_t/σ_d) -> ``dst``'s prediction [B, ...]. The conversion runs in float64
    (σ/α spans many orders of magnitude near pure noise) and returns the input's dtype; times at
    ``dst.t_max`` are pulled in by ``edge`` where α = 0 would make σ/α infinite.
    """

    def __init__(self, net: nn.Module, src: Parameterisation, dst: Parameterisation, edge: float = 1e-6):
        super().__init__()
        if not hasattr(dst, "state_from_model_input"):
            raise TypeError(f"ReparameterisedNet: {dst.name!r} cannot invert its model input")
        self.net, self.src, self.dst, self.edge = net, src, dst, edge
        # What the methods check: the wrapper now speaks ``dst``.
        self.parameterisation = dst.name

    def forward(self, x_in: torch.Tensor, t_in: torch.Tensor, **cond) -> torch.Tensor:
        dtype = x_in.dtype
        x_t, t = self.dst.state_from_model_input(x_in.double(), t_in.double())
        t = t.clamp(max=self.dst.t_max - self.edge)
        x_src, t_src = convert_state(x_t, t, self.dst, self.src)
        pred_src = self.src.predict(self.net, x_src.to(dtype), t_src.to(dtype), **cond)
        x0, eps = self.src.to_x0_eps(x_src, pred_src.double(), t_src)
        return self.dst.from_x0_eps(x_t, x0, eps, t).to(dtype)
