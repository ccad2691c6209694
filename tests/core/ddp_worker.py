"""One process of the DDP test: trains the toy problem with the environment torchrun would set
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and rank 0 writes the final parameters."""

import sys

import torch
from safetensors.torch import save_file

from kdlib.core import distributed
from kdlib.core.method import METHODS
from kdlib.core.models import Student
from kdlib.core.trainer import Trainer
from tests.core.toy import toy_data, toy_model, toy_train_config


def main(out: str, stage_dir: str) -> None:
    info = distributed.init_distributed("cpu")
    torch.manual_seed(0)
    student = Student(toy_model(dropout=0.0))
    method = METHODS.get("supervised")(METHODS.get("supervised").Config(), student, None)
    cfg = toy_train_config(steps=12, batch_size=32, checkpoint_every=100, grad_clip=0.5)
    Trainer(method, toy_data(), cfg, stage_dir=stage_dir, seed=1).fit()
    if info.is_main:
        save_file({k: v.contiguous() for k, v in student.model.state_dict().items()}, out)
    if info.enabled:
        distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
