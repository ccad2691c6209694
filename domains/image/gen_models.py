"""Networks of the generative image recipes, sized for CPU: a residual MLP denoiser with
adaLN time/class conditioning (teacher and consistency student share it), and the small CNN whose
features define FD-digits."""

from __future__ import annotations

import torch
from torch import nn

from kdlib.diffusion.guidance import labels_with_null
from kdlib.nn import DiT, DiTConfig
from kdlib.nn.embeddings import TimestepEmbedder


class ResidualBlock(nn.Module):
    """h + MLP(adaLN(h; c)); the output layer starts at zero so each block starts as identity."""

    def __init__(self, hidden: int, expansion: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.ada = nn.Linear(hidden, 2 * hidden)
        wide = expansion * hidden
        self.mlp = nn.Sequential(nn.Linear(hidden, wide), nn.SiLU(), nn.Linear(wide, hidden))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)


class MLPDenoiser(nn.Module):
    """net(x, t, y, guidance=None) -> prediction of x's shape. x: [B, C, H, W]; t: [B]; y: [B]
    labels, -1 (the null condition of ``kdlib.diffusion.guidance``) or None for unconditional.

    ``guidance_input``: the network also takes a CFG scale w [B] (``guidance``; None: w = 1), as
    LCM's w-conditioned student (Luo et al. 2023, §4.2), so that one student samples at any scale
    it was distilled over; its embedding's output layer starts at zero, so a student grown from a
    teacher without it (``grow_from``) starts as that teacher at every w.

    ``parameterisation`` records what it was trained for (checked by the methods)."""

    def __init__(self, shape: tuple[int, int, int] = (1, 28, 28), hidden: int = 384, blocks: int = 3,
                 num_classes: int = 10, parameterisation: str = "fm", time_scale: float = 1000.0,
                 expansion: int = 2, guidance_input: bool = False):
        super().__init__()
        self.shape, self.num_classes, self.parameterisation = tuple(shape), num_classes, parameterisation
        dim = shape[0] * shape[1] * shape[2]
        self.inp = nn.Linear(dim, hidden)
        self.t_embed = TimestepEmbedder(hidden, scale=time_scale)
        self.y_embed = nn.Embedding(num_classes + 1, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden, expansion) for _ in range(blocks))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        # A per-sample, time-dependent multiple of the input: predictions such as the velocity
        # ε − x0 = (x_t − x0)/t carry the full-dimensional noise, which a narrow hidden layer
        # cannot pass through; this skip path can.
        self.skip = nn.Linear(hidden, 1)
        self.w_embed = TimestepEmbedder(hidden, scale=time_scale) if guidance_input else None
        zero = [self.out, self.skip] + ([self.w_embed.mlp[2]] if guidance_input else [])
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"MLPDenoiser: expected images of shape {self.shape}, got {tuple(x.shape[1:])}")
        if guidance is not None and self.w_embed is None:
            raise ValueError("MLPDenoiser: this network takes no guidance input (build it with guidance_input=True, "
                             "e.g. model.student_guidance_input: true)")
        c = self.t_embed(t) + self.y_embed(labels_with_null(y, x.shape[0], self.num_classes, x.device))
        if self.w_embed is not None:
            w = guidance if guidance is not None else torch.ones_like(t)
            c = c + self.w_embed(w.to(t.dtype).expand(x.shape[0]))
        c = torch.nn.functional.silu(c)
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, c)
        skip = self.skip(c).reshape(-1, *([1] * (x.dim() - 1)))
        return self.out(self.out_norm(h)).reshape(x.shape) + skip * x

    def grow_from(self, teacher: MLPDenoiser) -> MLPDenoiser:
        """Start as ``teacher`` (``grow_denoiser``): the hook kdlib's ``init_from_teacher`` calls
        for a student of another shape."""
        return grow_denoiser(self, teacher)


@torch.no_grad()
def grow_denoiser(student: MLPDenoiser, teacher: MLPDenoiser) -> MLPDenoiser:
    """Copy ``teacher`` into a deeper and/or MLP-wider ``student`` so that it computes exactly the
    teacher's function (Net2Net-style growth, Chen et al. 2016), in place; returns ``student``.

    The student must have the teacher's image shape, hidden width and classes, at least its
    blocks and at least its MLP width (``expansion``). Teacher block i becomes student block i;
    the student's extra blocks keep their zero-initialised output layer (each is the identity
    h + 0, while its other layers stay randomly initialised, so it gets gradients); a wider MLP's
    extra units keep their random input weights and get zero output weights. Everything else
    (input, time/class embeddings, output, skip) is copied as it is."""
    t_blocks, s_blocks = len(teacher.blocks), len(student.blocks)
    if student.shape != teacher.shape or student.num_classes != teacher.num_classes:
        raise ValueError(f"grow_denoiser: the student's image shape / classes {student.shape} / {student.num_classes} "
                         f"differ from the teacher's {teacher.shape} / {teacher.num_classes}")
    if student.inp.out_features != teacher.inp.out_features:
        raise ValueError(f"grow_denoiser: the student's hidden width {student.inp.out_features} must be the "
                         f"teacher's ({teacher.inp.out_features}): only depth and MLP width can grow")
    if s_blocks < t_blocks:
        raise ValueError(f"grow_denoiser: the student has {s_blocks} blocks, fewer than the teacher's {t_blocks}")
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("blocks.")}
    student.load_state_dict({**student.state_dict(), **state})
    for mine, theirs in zip(student.blocks, teacher.blocks):
        wide, narrow = mine.mlp[0].out_features, theirs.mlp[0].out_features
        if wide < narrow:
            raise ValueError(f"grow_denoiser: the student's MLP width {wide} is below the teacher's {narrow}")
        mine.ada.load_state_dict(theirs.ada.state_dict())
        mine.mlp[0].weight[:narrow] = theirs.mlp[0].weight
        mine.mlp[0].bias[:narrow] = theirs.mlp[0].bias
        mine.mlp[2].weight.zero_()
        mine.mlp[2].weight[:, :narrow] = theirs.mlp[2].weight
        mine.mlp[2].bias.copy_(theirs.mlp[2].bias)
    for extra in student.blocks[t_blocks:]:
        extra.mlp[2].weight.zero_()
        extra.mlp[2].bias.zero_()
    return student


class DiTDenoiser(nn.Module):
    """``kdlib.nn.DiT`` as an image recipe's denoiser, with ``MLPDenoiser``'s interface: net(x
    [B, C, H, W], t [B], y [B] | None) -> prediction of x's shape; labels < 0 or None are the null
    condition (DiT's label ``num_classes``). Patches of ``patch_size``² pixels are the tokens, so
    H and W must be multiples of it (28×28 digits: 4 → 49 tokens)."""

    def __init__(self, shape: tuple[int, int, int] = (1, 28, 28), hidden: int = 256, depth: int = 4,
                 heads: int = 4, patch_size: int = 4, num_classes: int = 10, parameterisation: str = "fm",
                 time_scale: float = 1000.0):
        super().__init__()
        if any(side % patch_size for side in shape[1:]):
            raise ValueError(f"DiTDenoiser: image size {tuple(shape[1:])} is not a multiple of patch_size {patch_size}")
        self.shape, self.num_classes, self.parameterisation = tuple(shape), num_classes, parameterisation
        self.dit = DiT(DiTConfig(in_channels=shape[0], patch_size=patch_size, hidden=hidden, depth=depth, heads=heads,
                                 num_classes=num_classes, time_scale=time_scale))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"DiTDenoiser: expected images of shape {self.shape}, got {tuple(x.shape[1:])}")
        labels = labels_with_null(y, x.shape[0], self.num_classes, x.device) if self.num_classes else None
        return self.dit(x, t, y=labels)


class DigitFeatureNet(nn.Module):
    """The FD-digits feature extractor: a small CNN classifier. x: [B, 1, 28, 28] in [-1, 1] ->
    logits [B, 10]; ``features(x)`` -> [B, feature_dim], the penultimate activations."""

    def __init__(self, feature_dim: int = 64):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
