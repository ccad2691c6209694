"""Export a diffusers-backed consistency student as a diffusers pipeline folder, and sample it
with diffusers alone.

    out/
        model_index.json                 DDPMPipeline (unconditional UNets sample with its __call__);
                                         none for a DiT: diffusers' only DiT pipeline needs a VAE,
                                         this one works on pixels (``sample_exported`` samples it)
        unet/ or transformer/            UNet2DModel / DiTTransformer2DModel config + safetensors weights
        scheduler/scheduler_config.json  LCMScheduler (discrete VP) or FlowMatchEulerDiscreteScheduler
                                         (fm, stochastic_sampling: consistency re-noising), plus
                                         kdlib_student_timesteps: {"<n>": [timesteps of n-step sampling]},
                                         kdlib_parameterisation, kdlib_null_class

LCMScheduler gets ``original_inference_steps = T``: its own n-step grid is then the kdlib grid
(``DiscreteVP.timesteps``), so ``pipe(num_inference_steps=n)`` samples as kdlib does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kdlib.diffusion.consistency import ConsistencyModel, default_times
from kdlib.diffusion.diffusers_io import (
    MODEL_FOLDERS,
    DiffusersNet,
    LCMConsistencyModel,
    denoiser_output,
    denoiser_traits,
    locate,
    require_diffusers,
)
from kdlib.diffusion.param import DiscreteVP

KDLIB_KEYS = ("kdlib_student_timesteps", "kdlib_parameterisation", "kdlib_null_class")


def student_timesteps(model: ConsistencyModel, steps: list[int]) -> dict[str, list[float]]:
    """The diffusers timesteps of kdlib's n-step consistency sampling, per n."""
    net = model.net
    return {str(n): [float(net.timestep(torch.tensor([t], dtype=torch.float64))) for t in
                     default_times(model.param, n)] for n in steps}


def _scheduler(model: ConsistencyModel):
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    net: DiffusersNet = model.net
    base = {k: v for k, v in net.scheduler_config.items() if not k.startswith("_") and k not in KDLIB_KEYS}
    if isinstance(model.param, DiscreteVP):
        if not isinstance(model, LCMConsistencyModel):
            raise TypeError("export: a discrete-VP student must be an LCMConsistencyModel (its boundary is the "
                            "one LCMScheduler applies); build it with diffusers_consistency_student")
        keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
        return LCMScheduler(**{k: base[k] for k in keep if k in base}, original_inference_steps=net.num_train_timesteps,
                            timestep_scaling=model.timestep_scaling, clip_sample=False, set_alpha_to_one=True)
    if net.time_map == "flow":
        if model.boundary != "param":
            raise TypeError("export: a flow student must use the exact boundary f = x̂0 (boundary='param')")
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=net.num_train_timesteps, shift=1.0,
                                               stochastic_sampling=True)
    raise NotImplementedError(f"export to diffusers: no diffusers scheduler reproduces a {model.param.name!r} "
                              "consistency student (supported: discrete VP via LCMScheduler, fm)")


def export_diffusers(model: torch.nn.Module, out_dir: str | Path,
                     steps: list[int] | tuple[int, ...] = (1, 2, 4)) -> Path:
    """Write ``model`` (a ConsistencyModel whose network is a ``DiffusersNet``) as a diffusers
    folder; ``steps``: the step counts whose timesteps go into the scheduler config."""
    require_diffusers()
    from diffusers import DDPMPipeline

    if not isinstance(model, ConsistencyModel) or not isinstance(model.net, DiffusersNet):
        inner = type(getattr(model, "net", model)).__name__
        raise TypeError(f"export to diffusers needs a consistency student built on a diffusers UNet2DModel or "
                        f"DiTTransformer2DModel (model.teacher_format: diffusers); this student's network is a {inner}")
    scheduler = _scheduler(model)
    out = Path(out_dir)
    network = model.net.unet
    if model.net.is_transformer:
        network.save_pretrained(str(out / MODEL_FOLDERS[type(network).__name__]), safe_serialization=True)
        scheduler.save_pretrained(str(out / "scheduler"))
    else:
        DDPMPipeline(unet=network, scheduler=scheduler).save_pretrained(str(out), safe_serialization=True)
    config_path = out / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(kdlib_student_timesteps=student_timesteps(model, list(steps)),
                  kdlib_parameterisation=model.param.name, kdlib_null_class=model.net.null_class)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


@torch.no_grad()
def sample_exported(folder: str | Path, noise: torch.Tensor, steps: int, generator: torch.Generator | None = None,
                    class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Samples [B, C, H, W] of an exported student with diffusers only (its UNet2DModel or
    DiTTransformer2DModel and scheduler, the n-step timesteps from ``kdlib_student_timesteps``):
    the loop of DDPMPipeline, plus class labels. noise: [B, C, H, W], the initial state as the
    scheduler expects it. A DiT takes its classifier-free-guidance row where labels are None."""
    require_diffusers()
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    folder = Path(folder)
    model_dir, _ = locate(folder)
    class_name = json.loads((model_dir / "config.json").read_text())["_class_name"]
    network = getattr(diffusers, class_name).from_pretrained(str(model_dir), local_files_only=True).eval()
    _, own_null, learned_sigma = denoiser_traits(network)
    if class_labels is None and own_null is not None:  # a DiT needs labels: its CFG row
        class_labels = torch.full((noise.shape[0],), own_null, dtype=torch.long)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    grid = config["kdlib_student_timesteps"].get(str(steps))
    if grid is None:
        have = sorted(config["kdlib_student_timesteps"])
        raise KeyError(f"{folder}: no {steps}-step timesteps exported (have {have})")
    if config["_class_name"] == "LCMScheduler":
        scheduler = LCMScheduler.from_pretrained(str(folder / "scheduler"))
        scheduler.set_timesteps(timesteps=[int(round(k)) for k in grid], device=noise.device)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder / "scheduler"))
        scheduler.set_timesteps(sigmas=[k / scheduler.config.num_train_timesteps for k in grid], device=noise.device)
    x = noise
    for t in scheduler.timesteps:
        step_t = t.expand(x.shape[0])  # a DiT's timestep embedding wants one per sample
        pred = denoiser_output(network(x, step_t, class_labels=class_labels).sample, x.shape[1], learned_sigma)
        x = scheduler.step(pred, t, x, generator=generator).prev_sample
    return x
