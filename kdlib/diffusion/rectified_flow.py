"""Rectified-flow pieces shared by the reflow methods (Liu et al. 2022, "Flow Straight and Fast"):
the straight path between a coupled pair and its velocity, in kdlib's fm convention, and the
U-shaped law of training times of Lee, Lin & Fanti 2024 ("Improving the Training of Rectified
Flows").

Convention (``kdlib.diffusion.param.FlowMatching``): t = 0 is data, t = 1 is noise. For a pair
(z, x) — noise z and the data point x it is coupled with —

    x_t = (1 − t)·x + t·z,      dx_t/dt = z − x   (the same at every t: the path is straight)

The papers run time the other way (X_t = t·X_1 + (1 − t)·X_0, X_0 noise, target X_1 − X_0 = x − z);
flipping the direction of time flips the sign of the velocity and nothing else.

U-shaped time law: the authors' code draws t from the density ∝ exp(a·t) on [0, 1] and mirrors
half of the draws to 1 − t, i.e.

    p(t) = a·cosh(a(t − ½)) / (2·sinh(a/2)),     F(t) = ½ + sinh(a(t − ½)) / (2·sinh(a/2)),

symmetric about ½ with the most mass at both ends (a = 4: p(0) = p(1) ≈ 2.07, p(½) ≈ 0.55). The
reason given by the paper: after one reflow the training loss is largest near t = 0 and t = 1, and the
one-step sampler only queries t = 1. It is sampled exactly by inverting F:
t = ½ + asinh((2u − 1)·sinh(a/2)) / a, u ~ U(0, 1).

Shapes: states [B, ...] of any trailing shape; t [B].
"""

from __future__ import annotations

import math

import torch

from kdlib.diffusion.param import expand


def u_shaped_pdf(t: torch.Tensor, a: float = 4.0) -> torch.Tensor:
    """The density p(t) of the U-shaped law on [0, 1] (zero outside). t: any shape."""
    if a <= 0:
        raise ValueError(f"u_shaped_pdf: a must be > 0, got {a}")
    inside = (t >= 0) & (t <= 1)
    p = a * torch.cosh(a * (t - 0.5)) / (2 * math.sinh(a / 2))
    return torch.where(inside, p, torch.zeros_like(p))


def sample_u_shaped(n: int, a: float = 4.0, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """n times [n] in [0, 1] from the U-shaped law, by inverse CDF (float32)."""
    if a <= 0:
        raise ValueError(f"sample_u_shaped: a must be > 0, got {a}")
    u = torch.rand(n, device=device, generator=generator, dtype=torch.float64)
    t = 0.5 + torch.asinh((2 * u - 1) * math.sinh(a / 2)) / a
    return t.clamp(0.0, 1.0).float()


def straight_path(x: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, velocity target) of the pair (z, x) at times t: x_t = (1 − t)·x + t·z and z − x.
    x, z: [B, ...]; t: [B]."""
    s = expand(t, x)
    return (1 - s) * x + s * z, z - x
