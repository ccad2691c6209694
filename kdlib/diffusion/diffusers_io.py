"""Diffusers models as kdlib networks: a local ``UNet2DModel`` or ``DiTTransformer2DModel``
folder and its scheduler become a ``net(x, t, y=None) -> prediction`` in the matching kdlib
parameterisation, and a few-step consistency student built on the same network. Export back to
diffusers: ``kdlib.diffusion.diffusers_export``.

Schedulers and the parameterisation they imply (the noise levels agree exactly):

| scheduler                                              | kdlib param                       | net timestep  |
|--------------------------------------------------------|-----------------------------------|---------------|
| DDPM, DDIM, LCM, Euler (discrete), ...: epsilon / v    | ``ddpm-eps`` / ``ddpm-v`` (their ᾱ) | k = t·(T−1)   |
| FlowMatchEulerDiscreteScheduler                         | ``fm``                            | t·T           |
| EDMEulerScheduler, epsilon, σ_d = 0.5, karras            | ``edm``                           | ¼·log σ       |

Nothing is downloaded: folders are read with ``local_files_only``. Needs ``pip install diffusers``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlib.diffusion.consistency import ConsistencyModel
from kdlib.diffusion.guidance import labels_with_null
from kdlib.diffusion.param import DiscreteVP, Parameterisation, get_parameterisation

# Schedulers whose training path is the discrete DDPM one (they differ only in how they sample).
DISCRETE_VP_SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "LCMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler", "PNDMScheduler", "HeunDiscreteScheduler", "UniPCMultistepScheduler",
)
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}
# The denoisers kdlib loads, and the folder a diffusers pipeline keeps each in.
MODEL_FOLDERS = {"UNet2DModel": "unet", "DiTTransformer2DModel": "transformer"}


def require_diffusers():
    try:
        import diffusers
    except ModuleNotFoundError:
        raise ModuleNotFoundError("diffusers interop needs the diffusers package: pip install diffusers "
                                  "(or pip install 'kdlib[image]')") from None
    return diffusers


class UnsupportedScheduler(ValueError):
    """A scheduler config with no exact kdlib parameterisation."""


def parameterisation_from_scheduler(config: dict[str, Any]) -> tuple[Parameterisation, str]:
    """(parameterisation, time map) of a diffusers scheduler config; the time map ("discrete",
    "flow" or "edm") says how a kdlib network time becomes the diffusers network's timestep."""
    name = config.get("_class_name", "?")
    prediction = config.get("prediction_type", "epsilon")
    if name in DISCRETE_VP_SCHEDULERS:
        if prediction not in PREDICTIONS:
            raise UnsupportedScheduler(f"{name}: prediction_type {prediction!r} is not supported "
                                       f"(kdlib maps {', '.join(PREDICTIONS)})")
        for key in ("trained_betas",):
            if config.get(key) is not None:
                raise UnsupportedScheduler(f"{name}: {key} is not supported; use a named beta_schedule")
        if config.get("rescale_betas_zero_snr"):
            raise UnsupportedScheduler(f"{name}: rescale_betas_zero_snr (α_T = 0) is not supported")
        if config.get("timestep_type", "discrete") != "discrete":
            raise UnsupportedScheduler(f"{name}: timestep_type {config['timestep_type']!r} is not supported")
        param = DiscreteVP.from_schedule(PREDICTIONS[prediction], config.get("beta_schedule", "linear"),
                                         float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02)),
                                         int(config.get("num_train_timesteps", 1000)))
        return param, "discrete"
    if name == "FlowMatchEulerDiscreteScheduler":
        # shift and the other options change only the sampling grid, not the path.
        return get_parameterisation("fm"), "flow"
    if name == "EDMEulerScheduler":
        edm = get_parameterisation("edm")
        found = (prediction, config.get("sigma_data", 0.5), config.get("sigma_schedule", "karras"))
        if found != ("epsilon", edm.sigma_data, "karras"):
            raise UnsupportedScheduler(f"{name}: only prediction_type='epsilon', sigma_data={edm.sigma_data}, "
                                       f"sigma_schedule='karras' map exactly to kdlib's edm; found {found}")
        return edm, "edm"
    supported = ", ".join((*DISCRETE_VP_SCHEDULERS, "FlowMatchEulerDiscreteScheduler", "EDMEulerScheduler"))
    raise UnsupportedScheduler(f"scheduler {name!r} has no kdlib parameterisation; supported: {supported}")


class DiffusersNet(nn.Module):
    """A diffusers ``UNet2DModel`` or ``DiTTransformer2DModel`` as a kdlib network: forward(x [B, C,
    H, W], t [B], y [B] | None) -> prediction [B, C, H, W] in ``parameterisation`` (ε, v, velocity
    or EDM's F).

    t is what kdlib feeds networks (``param.model_input``); ``time_map`` turns it into the
    diffusers timestep. y goes to ``class_labels`` when the network is class-conditional (a UNet
    with class embeddings; a DiT always); labels < 0 (kdlib's null condition) or None become
    ``null_class`` (an error when it is None; a DiT's default is its classifier-free-guidance row,
    index num_classes); an unconditional UNet ignores y. A DiT that also predicts the variance
    (out_channels = 2·in_channels, "learned sigma") gives its first in_channels channels, as
    diffusers' DiTPipeline uses them. ``scheduler_config`` is kept for the export. The network is
    the attribute ``unet`` whatever its kind (the checkpoints' key names)."""

    def __init__(self, unet: nn.Module, scheduler_config: dict[str, Any], null_class: int | None = None):
        super().__init__()
        param, self.time_map = parameterisation_from_scheduler(scheduler_config)
        self.unet, self.scheduler_config, self.null_class = unet, dict(scheduler_config), null_class
        self.parameterisation = param.name  # checked by the methods against the recipe
        self.param = param
        self.num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.image_shape = (unet.config.in_channels, *size)
        self.is_transformer = type(unet).__name__ == "DiTTransformer2DModel"
        self.num_classes, own_null, self.learned_sigma = denoiser_traits(unet)
        if self.null_class is None:
            self.null_class = own_null

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The diffusers timestep [B] (float32) for kdlib network times t [B]."""
        if self.time_map == "discrete":
            return self.param.timestep(t).float()
        if self.time_map == "flow":
            return (t * self.num_train_timesteps).float()
        return t.float()  # edm: model_input already gives c_noise = ¼·log σ

    def class_labels(self, y: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        if self.null_class is not None:
            return labels_with_null(y, batch, self.null_class, device)
        # Only a network without a null class looks at the labels (a host sync), to refuse null ones.
        if y is None or bool((y < 0).any()):
            raise ValueError("this diffusers network has no null class (null_class=None): it cannot run "
                             "unconditionally or with classifier-free guidance")
        return y.long()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"diffusers {type(self.unet).__name__}: expected images of shape {self.image_shape}, "
                             f"got {tuple(x.shape[1:])}")
        t = t.expand(x.shape[0]) if t.dim() == 1 and t.shape[0] == 1 else t
        labels = self.class_labels(y, x.shape[0], x.device)
        out = self.unet(x, self.timestep(t).to(x.device), class_labels=labels).sample
        return denoiser_output(out, x.shape[1], self.learned_sigma).to(x.dtype)


def denoiser_traits(network: nn.Module) -> tuple[int, int | None, bool]:
    """(classes, its own null class or None, learned variance) of a diffusers UNet2DModel /
    DiTTransformer2DModel: a DiT's label table ends with its classifier-free-guidance row (index
    num_classes), and a DiT with out_channels = 2·in_channels also predicts the variance."""
    config = network.config
    if type(network).__name__ != "DiTTransformer2DModel":
        return config.num_class_embeds or 0, None, False
    classes = config.num_embeds_ada_norm or 0
    learned_sigma = (config.out_channels or config.in_channels) == 2 * config.in_channels
    return classes, (classes if classes else None), learned_sigma


def denoiser_output(out: torch.Tensor, channels: int, learned_sigma: bool) -> torch.Tensor:
    """The prediction [B, C, ...] of a diffusers denoiser's output: without a learned-variance half."""
    return out[:, :channels] if learned_sigma else out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None


def locate(folder: str | Path) -> tuple[Path, Path]:
    """(model folder, scheduler config file) of a pipeline folder (``unet/`` or ``transformer/``,
    ``scheduler/``) or of a model folder holding ``config.json`` and ``scheduler_config.json``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"diffusers folder {folder} does not exist")
    unet_dir = next((folder / sub for sub in MODEL_FOLDERS.values() if (folder / sub / "config.json").exists()),
                    folder)
    if not (unet_dir / "config.json").exists():
        raise FileNotFoundError(f"{folder} holds no diffusers denoiser (no unet/config.json, transformer/config.json "
                                "or config.json)")
    for candidate in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json",
                      unet_dir.parent / "scheduler" / "scheduler_config.json"):
        if candidate.exists():
            return unet_dir, candidate
    raise FileNotFoundError(f"{folder} holds no scheduler config (scheduler/scheduler_config.json or "
                            "scheduler_config.json): kdlib needs it to know the noise schedule")


def load_diffusers_teacher(folder: str | Path, expected_param: str | None = None,
                           null_class: int | None = None) -> DiffusersNet:
    """A local diffusers folder as a kdlib network. ``expected_param``: the recipe's
    parameterisation; a different one implied by the scheduler stops here, before any training."""
    require_diffusers()
    import diffusers

    unet_dir, scheduler_file = locate(folder)
    config = _read_json(unet_dir / "config.json")
    class_name = config.get("_class_name")
    if class_name not in MODEL_FOLDERS:
        raise ValueError(f"{unet_dir}: kdlib loads {' or '.join(MODEL_FOLDERS)} teachers, found {class_name!r}")
    scheduler_config = _read_json(scheduler_file)
    param, _ = parameterisation_from_scheduler(scheduler_config)
    if expected_param is not None and expected_param != param.name:
        raise ValueError(
            f"parameterisation mismatch: the diffusers teacher's scheduler ({scheduler_config.get('_class_name')}, "
            f"prediction_type={scheduler_config.get('prediction_type', 'epsilon')!r}) is kdlib param {param.name!r}, "
            f"but the recipe says param={expected_param!r}; set model.param and method_args.param to {param.name!r}")
    unet = getattr(diffusers, class_name).from_pretrained(str(unet_dir), local_files_only=True)
    return DiffusersNet(unet, scheduler_config, null_class=null_class)


class LCMConsistencyModel(ConsistencyModel):
    """A consistency model on a discrete VP schedule with the boundary of diffusers'
    ``LCMScheduler`` (Luo et al. 2023): f = c_skip·x_t + c_out·x̂0 with u = k·``timestep_scaling``,
    c_skip = σ_d²/(u² + σ_d²), c_out = u/√(u² + σ_d²), k the integer timestep. f(x, t_min) = x
    (k = 0), and an exported student samples in diffusers exactly as in kdlib."""

    def __init__(self, net: nn.Module, param: DiscreteVP, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
        super().__init__(net, param, boundary="cm", sigma_data=sigma_data)
        self.timestep_scaling = timestep_scaling

    def scalings(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.param.timestep(t) * self.timestep_scaling
        c_skip = self.sigma_data**2 / (u**2 + self.sigma_data**2)
        return c_skip, u / torch.sqrt(u**2 + self.sigma_data**2)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        x0, _ = self.param.to_x0_eps(x_t, self.param.predict(self.net, x_t, t, **cond), t)
        c_skip, c_out = (v.to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1))) for v in self.scalings(t))
        return c_skip * x_t + c_out * x0


def copy_architecture(net: DiffusersNet) -> DiffusersNet:
    """A freshly initialised network of the same class and config (the student starts from the
    teacher's weights through the method's ``init_from_teacher``)."""
    return DiffusersNet(type(net.unet).from_config(net.unet.config), net.scheduler_config, net.null_class)


def diffusers_consistency_student(teacher: DiffusersNet) -> ConsistencyModel:
    """The consistency student of a diffusers teacher: same architecture; LCM's boundary on
    a discrete VP schedule (so it exports to ``LCMScheduler``), fm's exact boundary for flows."""
    net = copy_architecture(teacher)
    if isinstance(net.param, DiscreteVP):
        return LCMConsistencyModel(net, net.param)
    return ConsistencyModel(net, net.param)
