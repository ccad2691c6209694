"""image-gen with a diffusers teacher, end to end through the CLI: a tiny random UNet2DModel +
DDPMScheduler folder distilled on a folder of 8×8 PNGs, exported with ``kdlib export`` and loaded
by ``DiffusionPipeline.from_pretrained``; the same with a DiTTransformer2DModel teacher, sampled
from its export by diffusers' components; a shape mismatch with the teacher stops the run."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers", reason="needs `pip install diffusers`")

from diffusers import DDPMScheduler, DiffusionPipeline, DiTTransformer2DModel, UNet2DModel  # noqa: E402

from domains.image.gen_sources import DataError  # noqa: E402
from kdlib.cli import main  # noqa: E402
from kdlib.diffusion.diffusers_export import sample_exported  # noqa: E402


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=2)
    unet.save_pretrained(str(tmp_path / "teacher" / "unet"))
    DDPMScheduler().save_pretrained(str(tmp_path / "teacher" / "scheduler"))
    for c in range(2):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        for i in range(8):
            Image.new("L", (8, 8), color=20 * i + 100 * c).save(tmp_path / "data" / f"c{c}" / f"{i}.png")
    args = [f"runs_dir={tmp_path / 'runs'}", "teacher.path=null", "model.teacher_format=diffusers",
            f"model.diffusers_folder={tmp_path / 'teacher'}", "model.param=ddpm-eps", "method_args.param=ddpm-eps",
            f"data.folder={tmp_path / 'data'}", "data.test_fraction=0.5", "model.num_classes=2", "baseline=false",
            "train.steps=2", "train.batch_size=4", "train.progress=false", "model.eval_samples=8",
            "model.teacher_steps=[2]",
            "model.student_steps=[1,2]", "--recipe", "mnist-cd"]
    return tmp_path, args


def test_distill_from_diffusers_and_export(setup):
    tmp_path, args = setup
    assert main(["distill", "image-gen", "name=run", "model.image_shape=[1,8,8]", *args]) == 0
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "runs" / "run"), "--format", "diffusers", "--out", str(out)]) == 0
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe.unet).__name__ == "UNet2DModel" and type(pipe.scheduler).__name__ == "LCMScheduler"
    assert pipe.scheduler.config["kdlib_student_timesteps"]["2"] == [999.0, 499.0]


def test_resolution_mismatch_with_the_teacher_stops_the_run(setup):
    _, args = setup
    with pytest.raises(DataError, match=r"\(1, 16, 16\).*\(1, 8, 8\)"):
        main(["distill", "image-gen", "name=bad", "model.image_shape=[1,16,16]", *args])


def test_distill_from_a_diffusers_dit_and_export(setup):
    tmp_path, args = setup
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=2)
    dit.save_pretrained(str(tmp_path / "dit" / "transformer"))
    DDPMScheduler().save_pretrained(str(tmp_path / "dit" / "scheduler"))
    args = [a if not a.startswith("model.diffusers_folder=") else f"model.diffusers_folder={tmp_path / 'dit'}"
            for a in args]
    assert main(["distill", "image-gen", "name=dit", "model.image_shape=[1,8,8]", *args]) == 0
    out = tmp_path / "dit-export"
    assert main(["export", str(tmp_path / "runs" / "dit"), "--format", "diffusers", "--out", str(out)]) == 0
    assert (out / "transformer" / "config.json").exists() and (out / "scheduler" / "scheduler_config.json").exists()
    images = sample_exported(out, torch.randn(2, 1, 8, 8), 2, class_labels=torch.tensor([0, 1]))
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
