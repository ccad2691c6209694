"""A GAN discriminator on the intermediate features of an existing network, and the
non-saturating GAN losses (Goodfellow et al. 2014, §3): what DMD2 adds to distribution matching
(Yin et al. 2024, "Improved Distribution Matching Distillation", §4.3, eq. 3).

The features are taken by a forward hook on a named submodule (``FeatureTap``), so any network
``net(x, t, **cond)`` serves, whatever its architecture: the recipe names the layer (e.g. a
residual block's output, a UNet's bottleneck) and its channel count. Features [B, C, ...] (channels
second, any trailing positions, e.g. [B, C] or [B, C, H, W]) get one logit per position.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class FeatureTap:
    """The output of ``net.get_submodule(layer)`` (the first element if it returns a tuple) during
    one call of ``features``; at other times the hook keeps nothing (no activation outlives its pass)."""

    def __init__(self, net: nn.Module, layer: str, option: str = "gan_layer",
                 owner: str = "the fake score network"):
        try:
            module = net.get_submodule(layer)
        except AttributeError:
            names = [name for name, _ in net.named_modules() if name]
            raise ValueError(f"{option} {layer!r} is not a submodule of {owner} "
                             f"({type(net).__name__}); its submodules: {', '.join(names)}") from None
        self.layer, self.value, self.recording = layer, None, False
        module.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs, output) -> None:
        if self.recording:
            self.value = output[0] if isinstance(output, tuple) else output

    def features(self, run: Callable[[], object]) -> torch.Tensor:
        """The layer's output while ``run()`` (a forward pass of the network) executes."""
        self.recording, self.value = True, None
        try:
            run()
        finally:
            self.recording = False
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError(f"layer {self.layer!r} did not run in the network's forward pass")
        return value


def tapped_features(taps: list[FeatureTap], run: Callable[[], object]) -> list[torch.Tensor]:
    """The outputs of several taps' layers (of one network) from a single ``run()``: one forward
    pass for every layer, where calling ``features`` per tap would cost one pass each."""
    for tap in taps:
        tap.recording, tap.value = True, None
    try:
        run()
    finally:
        for tap in taps:
            tap.recording = False
    values = []
    for tap in taps:
        value, tap.value = tap.value, None
        if value is None:
            raise RuntimeError(f"layer {tap.layer!r} did not run in the network's forward pass")
        values.append(value)
    return values


class GANHead(nn.Module):
    """features [B, C, ...] -> logits [B, ...]: per position, linear -> LayerNorm -> SiLU -> linear
    over the channels (DMD2's head is conv -> GroupNorm -> SiLU -> conv on the bottleneck; per
    position keeps it shape-agnostic, the norm keeps it independent of the layer's scale: a
    residual stream's features can be large)."""

    def __init__(self, channels: int):
        super().__init__()
        if channels < 1:
            raise ValueError(f"the GAN head needs the feature channel count (gan_channels >= 1); got {channels}")
        self.channels = channels
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.LayerNorm(channels), nn.SiLU(),
                                 nn.Linear(channels, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() < 2 or features.shape[1] != self.channels:
            raise ValueError(f"the GAN head expects features [B, {self.channels}, ...], got {tuple(features.shape)}: "
                             f"set method_args.gan_channels to the layer's channel count")
        return self.mlp(features.movedim(1, -1).float())[..., 0]


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """−log D(real) − log(1 − D(fake)), D = sigmoid(logit), averaged (the critic's side)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """−log D(fake): the non-saturating generator loss; its gradient pushes the logits up, toward
    "real", strongest where the critic is most sure the sample is generated."""
    return F.softplus(-fake_logits).mean()
