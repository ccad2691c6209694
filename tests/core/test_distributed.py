"""2-process gloo DDP (launched with torchrun's environment) equals 1 process on the same global
batch: each rank takes half of every global batch and DDP averages the gradients. Each rank draws
its own torch random numbers, and a resumed run continues every rank's stream exactly."""

import json
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


def _rng_run(tmp_path: Path, tag: str, stage: str, stop: int) -> list[dict]:
    out = tmp_path / tag
    launch(ROOT / "tests/core/rng_worker.py", [str(out), str(tmp_path / stage), str(stop)], 2, timeout=180)
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]


def test_ranks_draw_their_own_noise_and_resume_exactly(tmp_path):
    whole = _rng_run(tmp_path, "whole", "whole-stage", 6)
    # One draw per step per rank; the ranks' streams differ (before, every rank drew rank 0's noise).
    assert [len(r["draws"]) for r in whole] == [6, 6]
    assert all(a != b for a, b in zip(whole[0]["draws"], whole[1]["draws"]))
    first = _rng_run(tmp_path, "first", "split-stage", 3)  # interrupted after step 3's checkpoint
    resumed = _rng_run(tmp_path, "resumed", "split-stage", 6)  # new processes, from that checkpoint
    for rank in range(2):
        assert first[rank]["draws"] == whole[rank]["draws"][:3]
        assert resumed[rank]["draws"] == whole[rank]["draws"][3:], rank
        assert resumed[rank]["params"] == whole[rank]["params"], rank
    assert whole[0]["params"] == whole[1]["params"]  # DDP kept the replicas equal
