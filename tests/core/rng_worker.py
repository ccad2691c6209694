"""One process of the per-rank RNG test: trains the toy problem on inputs with torch noise added,
under torchrun's environment, and writes this rank's noise draws and final parameters to
``<out>.rank<r>.json``. A 6-step run; ``stop`` < 6 interrupts it before step stop + 1 as a crash
would (its step-3 checkpoint is resumed by a later launch)."""

import json
import sys
from dataclasses import dataclass

import torch

from kdlib.core import distributed
from kdlib.core.method import Method
from kdlib.core.models import Student
from kdlib.core.trainer import Trainer
from kdlib.objectives import cross_entropy
from tests.core.toy import toy_data, toy_model, toy_train_config


@dataclass
class NoisyConfig:
    noise: float = 0.3


class Interrupted(Exception):
    pass


class NoisyInputs(Method):
    """Supervised training on x + noise·ε: every step draws ε from the global torch RNG."""

    Config = NoisyConfig
    needs_teacher = False
    draws: list[float] = []
    stop = 6

    def loss(self, batch, group):
        if len(NoisyInputs.draws) == NoisyInputs.stop:
            raise Interrupted
        eps = torch.randn_like(batch["x"])
        NoisyInputs.draws.append(float(eps.sum()))
        return cross_entropy(self.student(batch["x"] + self.config.noise * eps), batch["y"]), {}


def main(out: str, stage_dir: str, stop: int) -> None:
    info = distributed.init_distributed("cpu")
    torch.manual_seed(0)
    student = Student(toy_model(dropout=0.0))
    method = NoisyInputs(NoisyConfig(), student, None)
    cfg = toy_train_config(steps=6, batch_size=32, checkpoint_every=3)
    NoisyInputs.stop = stop
    try:
        Trainer(method, toy_data(), cfg, stage_dir=stage_dir, seed=1).fit()
    except Interrupted:
        pass
    params = {k: v.flatten().tolist() for k, v in student.model.state_dict().items()}
    with open(f"{out}.rank{info.rank}.json", "w") as f:
        json.dump({"draws": NoisyInputs.draws, "params": params}, f)
    if info.enabled:
        distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
