"""Feature and relation losses for classic KD (classifiers, dense prediction, heterogeneous pairs),
and ``FeatureTap``, which captures any submodule's output by its module path.

All losses compute in float32 (float64 stays float64) and return a scalar.
"""

from __future__ import annotations

import difflib

import torch
import torch.nn.functional as F
from torch import nn


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


class HintLoss(nn.Module):
    """FitNets hint: MSE between a learned projection of the student feature and the teacher's.

    Feature maps [B, C_s, H, W] are projected by a 1×1 convolution to C_t channels and resized
    (bilinear) to the teacher's H×W when they differ; token/vector features [B, ..., C_s] by a linear
    layer. The projector is trainable and belongs to the method's trainable parts.
    """

    def __init__(self, student_dim: int, teacher_dim: int, *, spatial: bool = True):
        super().__init__()
        self.spatial = spatial
        self.proj = (nn.Conv2d(student_dim, teacher_dim, kernel_size=1, bias=False) if spatial
                     else nn.Linear(student_dim, teacher_dim, bias=False))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.spatial:
            if student.dim() != 4 or teacher.dim() != 4:
                raise ValueError(f"HintLoss(spatial): expected [B, C, H, W] features, got student "
                                 f"{tuple(student.shape)}, teacher {tuple(teacher.shape)}")
            out = self.proj(student)
            if out.shape[-2:] != teacher.shape[-2:]:
                out = F.interpolate(out, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
        else:
            out = self.proj(student)
        if out.shape != teacher.shape:
            raise ValueError(f"HintLoss: projected student {tuple(out.shape)} != teacher "
                             f"{tuple(teacher.shape)}")
        return F.mse_loss(_f32(out), _f32(teacher.detach()))


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """1 − cos(student, teacher) along ``dim``, averaged over the other positions."""
    return (1 - F.cosine_similarity(_f32(student), _f32(teacher), dim=dim, eps=1e-8)).mean()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA between representations x: [N, D1] and y: [N, D2] of the same N examples:

        CKA = ‖Ỹᵀ X̃‖_F² / (‖X̃ᵀ X̃‖_F · ‖Ỹᵀ Ỹ‖_F),   X̃, Ỹ column-centred.

    In [0, 1]; invariant to orthogonal transforms and isotropic scaling; dims may differ.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: expected [N, D1] and [N, D2], got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    x, y = _f32(x), _f32(y)
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    cross = (y.T @ x).pow(2).sum()
    return cross / ((x.T @ x).norm() * (y.T @ y).norm()).clamp_min(1e-12)


def cka_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 − linear CKA of the features flattened to [N, −1]."""
    return 1 - linear_cka(student.flatten(1), teacher.flatten(1))


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis spatial attention: mean_c |F|^p, flattened and L2-normalised.

    feature: [B, C, H, W] -> [B, H·W].
    """
    return F.normalize(_f32(feature).abs().pow(p).mean(1).flatten(1), dim=1)


def attention_transfer(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean over the batch of ‖a_s − a_t‖² of the normalised attention maps (same H×W needed;
    channel counts may differ)."""
    if student.shape[0] != teacher.shape[0] or student.shape[-2:] != teacher.shape[-2:]:
        raise ValueError(f"attention_transfer: batch and H×W must match, got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).sum(1).mean()


def _pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 1.0,
              gamma: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """DIST (Huang et al., 2022): relation matching with Pearson correlation.

    logits [B, C]; p = softmax(logits / T).
    inter = 1 − mean_b ρ(p_s[b, :], p_t[b, :])   (each sample's class ranking)
    intra = 1 − mean_c ρ(p_s[:, c], p_t[:, c])   (each class's spread over the batch)
    loss  = T² (β · inter + γ · intra)
    """
    ps = torch.softmax(_f32(student_logits) / temperature, -1)
    pt = torch.softmax(_f32(teacher_logits) / temperature, -1)
    inter = 1 - _pearson_rows(ps, pt).mean()
    intra = 1 - _pearson_rows(ps.T, pt.T).mean()
    return temperature**2 * (beta * inter + gamma * intra)


class OFAProjector(nn.Module):
    """OFA-KD (Hao et al., 2023) branch: maps an intermediate student feature into logit space, so a
    heterogeneous student (CNN vs ViT vs MLP) can be distilled at any stage.

    Accepts [B, C, H, W] maps (1×1 conv, BN, ReLU, global average pool) or [B, N, C] tokens
    (LayerNorm, mean over tokens), then a linear layer to ``num_classes`` logits [B, num_classes].
    """

    def __init__(self, in_dim: int, num_classes: int, *, hidden: int = 256, spatial: bool = True):
        super().__init__()
        self.spatial = spatial
        if spatial:
            self.body = nn.Sequential(nn.Conv2d(in_dim, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                      nn.ReLU())
        else:
            self.body = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if self.spatial:
            return self.head(self.body(feature).mean((-2, -1)))
        return self.head(self.body(feature).mean(1))


def ofa_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
             eps: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """OFA's target-enhanced loss, mean over the batch: with one-hot y and p = softmax(logits / T),

        loss = −Σ_c ((p_t,c + y_c)^ε − y_c) · log p_s,c

    ε = 1 is soft-label cross-entropy with the teacher; ε > 1 up-weights the true class more when the
    teacher is confident in it. logits [B, C], labels [B].
    """
    log_ps = torch.log_softmax(_f32(student_logits) / temperature, -1)
    pt = torch.softmax(_f32(teacher_logits) / temperature, -1)
    onehot = F.one_hot(labels, pt.shape[-1]).to(pt.dtype)
    weight = (pt + onehot).pow(eps) - onehot
    return -(weight.detach() * log_ps).sum(-1).mean()


class FeatureTap:
    """Captures submodule outputs by module path (``"layer3.1.conv2"``, ``"blocks.5"``) with forward hooks.

        tap = FeatureTap(teacher, ["layer2", "layer3"], detach=True)
        teacher(x)
        f2 = tap["layer2"]

    A tuple/list output keeps its first element. ``detach=True`` (use it for the teacher) stores
    detached tensors. Use as a context manager or call ``remove()`` to unhook.
    """

    def __init__(self, model: nn.Module, paths: list[str] | tuple[str, ...], *, detach: bool = False):
        names = dict(model.named_modules())
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []
        for path in paths:
            if path not in names:
                close = difflib.get_close_matches(path, list(names), n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise KeyError(f"FeatureTap: {type(model).__name__} has no submodule {path!r}{hint}")
            self._handles.append(names[path].register_forward_hook(self._hook(path, detach)))

    def _hook(self, path: str, detach: bool):
        def hook(module, inputs, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            self.features[path] = output.detach() if detach else output
        return hook

    def __getitem__(self, path: str) -> torch.Tensor:
        if path not in self.features:
            raise KeyError(f"FeatureTap: nothing captured for {path!r} yet (run the model first)")
        return self.features[path]

    def clear(self) -> None:
        self.features.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
