"""Classifier teacher and student for the digits: a small CNN and a much smaller MLP."""

from __future__ import annotations

from torch import nn


class CNNClassifier(nn.Module):
    """Conv blocks (3×3, ReLU, 2×2 max-pool after each but the first) and a linear head.

    x: [B, 1, 8, 8] -> logits [B, num_classes].
    """

    def __init__(self, channels: list[int], num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c_in, size = 1, 8
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
            if i > 0:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in * size * size, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x):
        return self.head(self.features(x))


class MLPClassifier(nn.Module):
    """Flatten -> hidden layers with ReLU -> logits. x: [B, 1, 8, 8] -> [B, num_classes]."""

    def __init__(self, hidden: list[int], num_classes: int = 10, in_features: int = 64):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
