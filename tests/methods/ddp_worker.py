"""One process of the critic-methods DDP test (``test_ddp_critics.py``): for each method named on
the command line, a few Trainer steps of that method on tiny networks, then a gradient probe.
Run with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or without it (one
process). Every rank writes ``<out>/<method>-rank<r>.safetensors``:

- ``init/<group>/<key>``, ``final/<group>/<key>``: every trainable group's state before and after;
- ``local/<group>``, ``synced/<group>`` (under torchrun): the flat gradient [P] of one more
  backward pass of ``group``'s loss on this rank's batch, once with the plain modules (this rank's
  own gradient) and once, from the same random state, through the Trainer's wrappers (what DDP
  makes of it: it must be the mean of the ranks' own gradients).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from kdlib.core import distributed
from kdlib.core.data import TensorDataset
from kdlib.core.method import METHODS
from kdlib.core.models import Student, Teacher
from kdlib.core.run_config import TrainConfig
from kdlib.core.trainer import Trainer
from kdlib.diffusion.consistency import ConsistencyModel
from kdlib.diffusion.param import get_parameterisation
from kdlib.diffusion.phase_experts import PhaseExperts
from kdlib.diffusion.reparam import ReparameterisedNet
from kdlib.methods.dmd import add_ode_pairs
from tests.methods.nets import TinyNet

FM, TRIG = get_parameterisation("fm"), get_parameterisation("trigflow")
GAN = {"gan_layer": "net.1", "gan_channels": 64}  # TinyNet's hidden activations
DISC = {"disc_layers": ["net.0", "net.1"], "disc_channels": [64, 64]}
LORA = {"fake_score": "lora", "lora_rank": 4}

# name: (method, its options, student kind); small enough for a few seconds per method
CASES = {
    "dmd": ("dmd", {"regression_weight": 0.25}, "fm"),
    "dmd2": ("dmd2", {"critic_updates": 2, "gen_steps": 2, **GAN}, "fm"),
    "dmd2_lora": ("dmd2", {"critic_updates": 2, **GAN, **LORA}, "fm"),
    "decoupled_dmd": ("decoupled_dmd", {"critic_updates": 2, "guidance": 2.0}, "fm"),
    "vsd": ("vsd", {"lora_rank": 4}, "fm"),
    "ladd": ("ladd", {"gen_steps": 2, "distill_weight": 0.1, **DISC}, "fm"),
    "phased_dmd": ("phased_dmd", {"phases": 2, "critic_updates": 2}, "experts"),
    "rcm": ("rcm", {"tangent_warmup": 2, "critic_updates": 2}, "trigflow"),
    "scm": ("scm", {"tangent_warmup": 2}, "trigflow"),
    "scm_ladd": ("scm_ladd", {"disc_warmup": 2, "adv_weight": 0.1, **DISC}, "trigflow"),
}


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    return TensorDataset(x=0.5 * torch.randn(64, 4, generator=g) + 0.2, y=torch.randint(0, 3, (64,), generator=g))


def build(case: str):
    """(method, training data) of ``case``, from a fixed seed (the same on every rank)."""
    name, args, kind = CASES[case]
    random.seed(0)
    torch.manual_seed(0)
    teacher = Teacher(TinyNet())
    if kind == "experts":
        model = ConsistencyModel(PhaseExperts.for_segments([TinyNet() for _ in range(args["phases"])], FM), FM)
    elif kind == "trigflow":
        model = ConsistencyModel(ReparameterisedNet(TinyNet(), FM, TRIG), TRIG)
    else:
        model = ConsistencyModel(TinyNet(), FM)
    cls = METHODS.get(name)
    method = cls(cls.Config(**args), Student(model), teacher)
    train = data()
    if name == "dmd":
        train = add_ode_pairs(train, teacher, FM, steps=4)
    return method, train


def config(case: str, steps: int = 6) -> TrainConfig:
    # rcm: two micro-batches per update, so the student and the weight trained with it accumulate
    # without synchronising before the last one
    return TrainConfig(steps=steps, batch_size=16, grad_accum=2 if case == "rcm" else 1, lr=1e-3,
                       schedule="constant", grad_clip=1.0, checkpoint_every=100, log_every=100, progress=False,
                       device="cpu")


def _state(prefix: str, trainer: Trainer) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{g}/{k}": v.detach().clone().contiguous()
            for g, m in trainer.modules.items() for k, v in m.state_dict().items()}


def _bind(trainer: Trainer, wrapped: bool) -> None:
    """Hand the method the Trainer's wrappers (``wrapped``) or the plain modules."""
    for name, module in trainer.modules.items():
        target = trainer.wrapped[name] if wrapped else module
        if name == "student":
            trainer.method.student.forward_module = target
        trainer.method.bind_wrapped(name, target)


def _gradient(trainer: Trainer, group: str, batch: dict, rng: tuple, wrapped: bool) -> torch.Tensor:
    """The flat gradient [P] of ``group``'s loss (and of the groups it trains with) on ``batch``."""
    method = trainer.method
    for module in trainer.modules.values():
        module.zero_grad(set_to_none=True)
    _bind(trainer, wrapped)
    torch.set_rng_state(rng[0])
    random.setstate(rng[1])
    loss, _ = method.loss(batch, group)
    loss.backward()
    groups = [group, *method.trained_with(group)]
    return torch.cat([p.grad.flatten() for g in groups for p in trainer.modules[g].parameters()
                      if p.grad is not None])


def run(case: str, out: Path, stage_root: Path) -> None:
    info = distributed.current()
    method, train = build(case)
    trainer = Trainer(method, train, config(case), stage_dir=stage_root / case, seed=1)
    tensors = _state("init", trainer)
    trainer.fit()
    tensors.update(_state("final", trainer))
    if info.enabled:
        batch = trainer._micro_batches()[0]
        rng = (torch.get_rng_state(), random.getstate())
        # Every group the method updates at some step (the last steps' groups, and step 0's).
        groups = dict.fromkeys([*method.update_groups(0), *method.update_groups(trainer.step - 1)])
        for group in groups:
            tensors[f"local/{group}"] = _gradient(trainer, group, batch, rng, wrapped=False)
            tensors[f"synced/{group}"] = _gradient(trainer, group, batch, rng, wrapped=True)
    save_file(tensors, str(out / f"{case}-rank{info.rank}.safetensors"))


def main(out: str, stage_root: str, cases: list[str]) -> None:
    info = distributed.init_distributed("cpu")
    torch.set_num_threads(1)
    for case in cases:
        run(case, Path(out), Path(stage_root))
    if info.enabled:
        distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
