"""2-process gloo DDP (launched with torchrun's environment) equals 1 process on the same global
batch: each rank takes half of every global batch and DDP averages the gradients."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.core.toy import toy_model
from tests.launch import launch

ROOT = Path(__file__).resolve().parents[2]


def _launch(world_size: int, tmp_path: Path, tag: str) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{tag}.safetensors"
    launch(ROOT / "tests/core/ddp_worker.py", [str(out), str(tmp_path / f"{tag}-stage")], world_size, timeout=180)
    return load_file(str(out))


def test_two_process_gloo_matches_one_process(tmp_path):
    single = _launch(1, tmp_path, "single")
    ddp = _launch(2, tmp_path, "ddp")
    assert single.keys() == ddp.keys()
    for k in single:
        assert torch.allclose(single[k], ddp[k], rtol=1e-5, atol=1e-6), (k, (single[k] - ddp[k]).abs().max())
    torch.manual_seed(0)
    initial = toy_model(dropout=0.0).state_dict()
    assert not torch.allclose(single["0.weight"], initial["0.weight"], atol=1e-3)  # it did train
