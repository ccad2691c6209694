"""The LoRA fake score (``kdlib.methods.lora_score``) on tiny networks: it starts as the teacher
exactly, the teacher never changes while it trains, only its adapters (and a GAN head) reach the
optimizer, it shares the teacher's tensors, it is selectable in every distribution-matching
method, and DMD2 with it trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdlib.core.data import TensorDataset
from kdlib.core.method import METHODS
from kdlib.core.models import Student, Teacher
from kdlib.core.run_config import TrainConfig
from kdlib.core.trainer import Trainer
from kdlib.diffusion.consistency import ConsistencyModel
from kdlib.diffusion.param import get_parameterisation
from kdlib.diffusion.reparam import ReparameterisedNet
from kdlib.methods.lora_score import LoRAFakeScore
from tests.methods.nets import C, PointMassResidual, TinyNet

FM, TRIG = get_parameterisation("fm"), get_parameterisation("trigflow")
LORA = {"fake_score": "lora", "lora_rank": 4}


def _method(name, teacher_net=None, teacher_dtype=None, **args):
    cls = METHODS.get(name)
    if name == "rcm":  # sCM's TrigFlow student, seeing the fm network through the exact conversion
        student = Student(ConsistencyModel(ReparameterisedNet(TinyNet(), FM, TRIG), TRIG))
    else:
        student = Student(ConsistencyModel(TinyNet(), FM))
    return cls(cls.Config(**args), student, Teacher(teacher_net or TinyNet(), dtype=teacher_dtype))


def _inputs(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.rand(n, generator=g), torch.randint(0, 3, (n,), generator=g)


def _lora_params(net: nn.Module, rank: int) -> int:
    """r·(in + out) per Linear layer: LoRA's A [r, in] and B [out, r]."""
    return sum(rank * (m.in_features + m.out_features) for m in net.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("name,args", [("dmd", {"regression_weight": 0.0}), ("dmd2", {}), ("decoupled_dmd", {}),
                                       ("rcm", {"teacher_param": "fm"}), ("vsd", {})])
def test_every_distribution_matching_method_takes_a_lora_fake_score(name, args):
    """One option, the same in all of them; at the start its outputs equal the teacher's exactly."""
    torch.manual_seed(0)
    method = _method(name, **args, **LORA)
    fake = method.critic.net
    assert isinstance(fake, LoRAFakeScore)
    x, t, y = _inputs()
    assert torch.equal(fake(x, t, y), method.teacher(x, t, y))


def test_lora_shares_the_teachers_tensors_and_trains_only_its_adapters(tmp_path):
    torch.manual_seed(0)
    method = _method("dmd2", gan_layer="net.1", gan_channels=64, **LORA)
    teacher, critic = method.teacher.model, method.critic
    shared = {id(p) for p in teacher.parameters()}
    base = [p for p in critic.net.parameters() if id(p) in shared]
    assert len(base) == len(list(teacher.parameters()))  # every teacher weight is in the fake score: shared, not copied
    trainable = [p for p in critic.parameters() if p.requires_grad]
    head = sum(p.numel() for p in critic.head.parameters())
    assert sum(p.numel() for p in trainable) == _lora_params(teacher, 4) + head
    assert not any(id(p) in shared for p in trainable)
    # the Trainer's critic optimizer holds exactly those
    data = TensorDataset(x=torch.randn(64, 4), y=torch.randint(0, 3, (64,)))
    trainer = Trainer(method, data, TrainConfig(steps=1, batch_size=16, progress=False, device="cpu"),
                      stage_dir=tmp_path, seed=0)
    held = [p for group in trainer.optimizers["critic"].param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in trainable}
    # the checkpoint entry: adapters and head only
    assert all(".lora_" in k or k.startswith("head.") for k in critic.state_dict())


def test_teacher_is_unchanged_while_the_lora_critic_trains():
    """AdamW with weight decay on the critic for a few updates: the fake score moves, the teacher
    (its shared weights, its outputs, its eval mode) does not."""
    torch.manual_seed(0)
    method = _method("dmd2", **LORA)
    x, t, y = _inputs()
    before = method.teacher(x, t, y).clone()
    weights = [p.detach().clone() for p in method.teacher.parameters()]
    optimizer = torch.optim.AdamW([p for p in method.critic.parameters() if p.requires_grad], lr=1e-2,
                                  weight_decay=0.1)
    method.critic.train()
    for _ in range(5):
        optimizer.zero_grad()
        loss, _ = method.loss({"x": 0.5 * torch.randn(32, 4) + 1.0, "y": torch.randint(0, 3, (32,))}, "critic")
        loss.backward()
        optimizer.step()
    assert torch.equal(method.teacher(x, t, y), before)
    assert all(torch.equal(p, w) for p, w in zip(method.teacher.parameters(), weights))
    assert not torch.equal(method.critic.net(x, t, y), before)
    assert not any(m.training for m in method.teacher.model.modules())
    assert not any(m.training for m in method.critic.net.network.modules())


def test_lora_dm_gradient_moves_when_the_adapter_moves():
    """Zero at the start; non-zero once the adapter's B is non-zero (the DM gradient sees it)."""
    torch.manual_seed(0)
    method = _method("dmd2", **LORA)
    cond = {"y": torch.randint(0, 3, (32,))}
    x = method.generator.sample(torch.zeros(32, 4), cond)
    assert method.dm.loss(x, cond)[0].item() == 0.0
    with torch.no_grad():
        for name, p in method.critic.net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    assert method.dm.loss(x, cond)[0].item() > 0.0


def test_lora_fake_score_of_a_bf16_teacher_keeps_fp32_adapters():
    torch.manual_seed(0)
    method = _method("dmd2", teacher_dtype=torch.bfloat16, **LORA)
    fake = method.critic.net
    assert {p.dtype for p in fake.adapter_parameters()} == {torch.float32}
    assert {p.dtype for p in method.teacher.parameters()} == {torch.bfloat16}
    x, t, y = _inputs()
    out = fake(x, t, y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, method.teacher(x, t, y).float())
    loss, _ = method.loss({"x": torch.randn(16, 4), "y": y}, "critic")
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fake.adapter_parameters())


def test_lora_targets_and_rank_are_configurable():
    torch.manual_seed(0)
    method = _method("dmd2", fake_score="lora", lora_rank=2, lora_targets=["net.2"])
    adapted = [n for n, _ in method.critic.net.named_parameters() if "lora_" in n]
    assert adapted == ["network.net.2.lora_A.fake_score.weight", "network.net.2.lora_B.fake_score.weight"]
    assert sum(p.numel() for p in method.critic.net.adapter_parameters()) == 2 * (64 + 4)
    with pytest.raises(ValueError, match="net.0, net.2"):
        _method("dmd2", fake_score="lora", lora_targets=["blocks.qkv"])
    with pytest.raises(ValueError, match="fake_score must be one of copy, lora"):
        _method("dmd2", fake_score="adapter")
    with pytest.raises(ValueError, match="lora_rank must be >= 1"):
        _method("dmd2", fake_score="lora", lora_rank=0)


def test_dmd2_with_a_lora_fake_score_trains():
    """Point-mass data, an exact teacher with a trainable residual: DMD2 from a random one-step
    student with a LoRA critic. Every value stays finite, the critic's denoising loss goes down
    (the adapter learns the generator's samples) and the samples contract onto the point mass."""
    torch.manual_seed(0)
    method = _method("dmd2", PointMassResidual(), init_from_teacher=False, critic_updates=2,
                     gan_layer="residual.net.1", gan_channels=64, fake_score="lora", lora_rank=8)

    def distance():
        with torch.no_grad():
            x = method.generator.sample(torch.zeros(512, 4), {"y": torch.zeros(512, dtype=torch.long)}, index=0)
        return (x - C).pow(2).mean().item()

    before = distance()
    optimizers = {g: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
                  for g, m in method.trainable_modules().items()}
    critic_losses = []
    for step in range(120):
        for group in method.update_groups(step):
            g = torch.Generator().manual_seed(step)
            batch = {"x": torch.full((64, 4), C), "y": torch.randint(0, 3, (64,), generator=g)}
            optimizers[group].zero_grad()
            loss, stats = method.loss(batch, group)
            loss.backward()
            optimizers[group].step()
            assert all(torch.isfinite(torch.as_tensor(v)) for v in (loss, *stats.values()))
            if group == "critic":
                critic_losses.append(stats["critic/denoise"].item())
    assert sum(critic_losses[-20:]) < 0.5 * sum(critic_losses[:20])
    assert distance() < 0.5 * before
