"""Diffusers interop: a tiny random UNet2DModel + scheduler saved locally loads as a kdlib teacher
whose predictions are the UNet's at the mapped timesteps; a consistency student distilled from it
exports to a diffusers folder that diffusers samples exactly as kdlib does. Nothing is downloaded."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers interop tests need `pip install diffusers`")

from diffusers import (  # noqa: E402
    DDPMScheduler,
    DiffusionPipeline,
    DiTTransformer2DModel,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    UNet2DModel,
)

from kdlib.core.models import Student, Teacher  # noqa: E402
from kdlib.diffusion.consistency import ConsistencyModel, consistency_sample, default_times  # noqa: E402
from kdlib.diffusion.diffusers_export import export_diffusers, sample_exported  # noqa: E402
from kdlib.diffusion.diffusers_io import (  # noqa: E402
    UnsupportedScheduler,
    diffusers_consistency_student,
    load_diffusers_teacher,
    parameterisation_from_scheduler,
)
from kdlib.methods.consistency_distillation import (  # noqa: E402
    ConsistencyDistillation,
    ConsistencyDistillationConfig,
)


def tiny_unet(num_class_embeds: int | None = None) -> UNet2DModel:
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=num_class_embeds)


def tiny_dit(learned_sigma: bool = True) -> DiTTransformer2DModel:
    """A class-conditional DiT on 1×8×8 pixels (10 classes, + its CFG row), optionally predicting
    the variance too (out_channels 2, as DiT checkpoints do)."""
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1,
                                 out_channels=2 if learned_sigma else 1, num_layers=1, sample_size=8, patch_size=2,
                                 num_embeds_ada_norm=10)


def save(folder, unet, scheduler):
    sub = "transformer" if isinstance(unet, DiTTransformer2DModel) else "unet"
    unet.save_pretrained(str(folder / sub))
    scheduler.save_pretrained(str(folder / "scheduler"))
    return folder


@pytest.fixture
def ddpm_folder(tmp_path):
    torch.manual_seed(0)
    return save(tmp_path / "teacher", tiny_unet(num_class_embeds=11), DDPMScheduler())


def test_discrete_schedule_matches_the_scheduler_exactly():
    for scheduler in (DDPMScheduler(), DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                      DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")):
        param, _ = parameterisation_from_scheduler(dict(scheduler.config, _class_name="DDPMScheduler"))
        k = torch.arange(1000, dtype=torch.float64)
        alpha, sigma = param.alpha_sigma(k / 999)
        # ᾱ_k bit for bit; α = √ᾱ to float32 rounding (diffusers takes the root in float32)
        assert torch.equal((alpha**2).float(), scheduler.alphas_cumprod)
        torch.testing.assert_close(alpha.float(), scheduler.alphas_cumprod.sqrt(), rtol=2.5e-7, atol=0)
        torch.testing.assert_close(sigma, (1 - scheduler.alphas_cumprod.double()).sqrt(), rtol=1e-6, atol=1e-7)
    # kdlib's n-step grid is LCMScheduler's own grid when original_inference_steps = T
    lcm = LCMScheduler(original_inference_steps=1000)
    for n in (1, 2, 3, 4, 7):
        lcm.set_timesteps(n)
        assert (param.timesteps(n)[:-1] * 999).round().long().tolist() == lcm.timesteps.tolist()


def test_scheduler_mapping_and_unsupported_configs():
    fm, time_map = parameterisation_from_scheduler(dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config,
                                                        _class_name="FlowMatchEulerDiscreteScheduler"))
    assert (fm.name, time_map) == ("fm", "flow")
    edm, _ = parameterisation_from_scheduler(dict(EDMEulerScheduler().config, _class_name="EDMEulerScheduler"))
    assert edm.name == "edm"
    with pytest.raises(UnsupportedScheduler, match="sample"):
        parameterisation_from_scheduler({"_class_name": "DDPMScheduler", "prediction_type": "sample"})
    with pytest.raises(UnsupportedScheduler, match="zero_snr"):
        parameterisation_from_scheduler({"_class_name": "DDIMScheduler", "rescale_betas_zero_snr": True})
    with pytest.raises(UnsupportedScheduler, match="no kdlib parameterisation"):
        parameterisation_from_scheduler({"_class_name": "KarrasVeScheduler"})


def test_teacher_prediction_is_the_unet_at_the_mapped_timestep(ddpm_folder):
    net = load_diffusers_teacher(ddpm_folder, expected_param="ddpm-eps", null_class=10)
    unet = UNet2DModel.from_pretrained(str(ddpm_folder / "unet"), local_files_only=True)
    x = torch.randn(4, 1, 8, 8)
    # float32 kdlib times of diffusers timesteps 0, 250, 999 and an in-between one
    t = torch.tensor([0.0, 250 / 999, 1.0, 0.6], dtype=torch.float32)
    y = torch.tensor([3, 7, -1, 0])
    expected = unet(x, torch.tensor([0.0, 250.0, 999.0, 0.6 * 999]), class_labels=torch.tensor([3, 7, 10, 0])).sample
    torch.testing.assert_close(net(x, t, y=y), expected, rtol=0, atol=0)
    assert net.image_shape == (1, 8, 8) and net.parameterisation == "ddpm-eps"


def test_recipe_param_mismatch_is_a_clear_error(ddpm_folder):
    with pytest.raises(ValueError, match="scheduler.*'ddpm-eps'.*param='vp-eps'"):
        load_diffusers_teacher(ddpm_folder, expected_param="vp-eps")


def distill_a_few_steps(teacher_net):
    """A consistency student of ``teacher_net`` after 3 CD steps (ddpm-eps), in eval mode; its
    weights must have moved and the loss stayed finite."""
    student = Student(diffusers_consistency_student(teacher_net))
    method = ConsistencyDistillation(ConsistencyDistillationConfig(param="ddpm-eps", num_intervals=10), student,
                                     Teacher(teacher_net))
    optimiser = torch.optim.Adam(student.model.parameters(), lr=1e-3)
    batch = {"x": torch.rand(8, 1, 8, 8) * 2 - 1, "y": torch.arange(8) % 10}
    before = {k: v.clone() for k, v in student.model.state_dict().items()}
    for _ in range(3):
        loss, _ = method.loss(batch, "student")
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in student.model.state_dict().items())
    return student.model.eval()


def assert_diffusers_samples_as_kdlib(model, out, step_counts, labels, seed):
    """The exported folder's diffusers loop and kdlib's consistency sampler draw the same images."""
    for steps in step_counts:
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(labels), 1, 8, 8, generator=g)
        diffusers_loop = sample_exported(out, noise, steps, generator=g, class_labels=labels)
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(labels), 1, 8, 8, generator=g)
        times = default_times(model.param, steps)
        # kdlib starts at σ(t_max)·noise, diffusers at noise: give kdlib the same initial state
        sigma_max = model.param.alpha_sigma(torch.tensor([times[0]]))[1]
        ours = consistency_sample(model, model.param, noise / sigma_max, times, generator=g, y=labels)
        assert diffusers_loop.shape == (len(labels), 1, 8, 8)
        torch.testing.assert_close(diffusers_loop, ours, rtol=1e-5, atol=1e-5)


def test_distill_export_and_sample_with_diffusers(ddpm_folder, tmp_path):
    torch.manual_seed(1)
    model = distill_a_few_steps(load_diffusers_teacher(ddpm_folder, "ddpm-eps", null_class=10))
    out = export_diffusers(model, tmp_path / "export", steps=[1, 2, 4])
    assert {p.name for p in out.iterdir()} >= {"model_index.json", "unet", "scheduler"}
    assert_diffusers_samples_as_kdlib(model, out, (1, 2, 4), torch.tensor([1, 5, 9]), seed=5)


def test_unconditional_export_samples_through_diffusion_pipeline(tmp_path):
    torch.manual_seed(2)
    folder = save(tmp_path / "teacher", tiny_unet(), DDPMScheduler(prediction_type="v_prediction"))
    model = diffusers_consistency_student(load_diffusers_teacher(folder, "ddpm-v"))
    out = export_diffusers(model.eval(), tmp_path / "export", steps=[2])
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    g = torch.Generator().manual_seed(3)
    images = pipe(batch_size=2, generator=g, num_inference_steps=2, output_type="pt").images
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 1, 8, 8, generator=g)
    times = default_times(model.param, 2)
    sigma_max = model.param.alpha_sigma(torch.tensor([times[0]]))[1]
    ours = consistency_sample(model, model.param, noise / sigma_max, times, generator=g)
    assert images.shape == (2, 1, 8, 8)
    torch.testing.assert_close(images, (ours / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_flow_student_exports_and_non_diffusers_student_is_refused(tmp_path):
    torch.manual_seed(3)
    folder = save(tmp_path / "fm", tiny_unet(), FlowMatchEulerDiscreteScheduler())
    model = diffusers_consistency_student(load_diffusers_teacher(folder, "fm")).eval()
    out = export_diffusers(model, tmp_path / "fm-export", steps=[1, 2])
    noise = torch.randn(2, 1, 8, 8)
    one_step = sample_exported(out, noise, 1)
    # one step from pure noise at t = 1 is the consistency function itself
    torch.testing.assert_close(one_step, model(noise, torch.ones(2)), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="diffusers UNet2DModel or DiTTransformer2DModel.*Linear"):
        from kdlib.diffusion.param import get_parameterisation

        export_diffusers(ConsistencyModel(torch.nn.Linear(2, 2), get_parameterisation("fm")), tmp_path / "no")


def test_dit_teacher_prediction_is_the_transformer_at_the_mapped_timestep(tmp_path):
    torch.manual_seed(4)
    folder = save(tmp_path / "dit", tiny_dit(), DDPMScheduler())
    net = load_diffusers_teacher(folder, expected_param="ddpm-eps")
    dit = DiTTransformer2DModel.from_pretrained(str(folder / "transformer"), local_files_only=True)
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([0.0, 250 / 999, 1.0])
    y = torch.tensor([3, -1, 9])  # -1: kdlib's null condition -> the DiT's CFG row, class 10
    full = dit(x, torch.tensor([0.0, 250.0, 999.0]), class_labels=torch.tensor([3, 10, 9])).sample
    assert full.shape == (3, 2, 8, 8)  # ε and the learned variance
    torch.testing.assert_close(net(x, t, y=y), full[:, :1], rtol=0, atol=0)
    assert net.image_shape == (1, 8, 8) and net.num_classes == 10 and net.null_class == 10


@pytest.mark.parametrize("learned_sigma", [True, False])
def test_dit_distill_export_reload_and_sample_with_diffusers(tmp_path, learned_sigma):
    torch.manual_seed(5)
    folder = save(tmp_path / "dit", tiny_dit(learned_sigma), DDPMScheduler())
    model = distill_a_few_steps(load_diffusers_teacher(folder, "ddpm-eps"))
    out = export_diffusers(model, tmp_path / "export", steps=[1, 2])
    assert {p.name for p in out.iterdir()} == {"transformer", "scheduler"}
    assert load_diffusers_teacher(out, "ddpm-eps").num_classes == 10  # the export loads back
    assert_diffusers_samples_as_kdlib(model, out, (1, 2), torch.tensor([1, 5, 9]), seed=6)
