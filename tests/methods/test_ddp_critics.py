"""The methods with trained networks besides the student (a critic, discriminator heads, sCM's
adaptive weight) under 2-process gloo DDP, as torchrun runs them: every group's gradients are
averaged across the ranks, so after training each group is the same on both ranks, and one more
backward pass through the Trainer's wrappers gives exactly the mean of the ranks' own gradients.

Each rank draws the same noise (same seed) on its own half of the global batch, so a run is not
one process's run on the whole batch (that one draws independent noise for the second half);
the gradient probe checks the averaging itself (``ddp_worker.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tests.launch import launch

ROOT = Path(__file__).resolve().parents[2]

# case of ddp_worker.CASES -> the groups whose gradients are probed (a group trained_with another
# is probed with it: sCM's weight with the student)
PROBED = {
    "dmd": {"student", "critic"},
    "dmd2": {"student", "critic"},  # with the GAN head and 2-step backward simulation
    "dmd2_lora": {"student", "critic"},  # GAN head on a LoRA fake score (frozen shared weights)
    "decoupled_dmd": {"student", "critic"},  # dmd2's critic, with guidance
    "vsd": {"student", "critic"},  # LoRA fake score
    "ladd": {"student", "discriminator"},
    "phased_dmd": {"student", "critic"},  # one expert per generator update
    "rcm": {"student", "critic"},
    "scm": {"student"},
    "scm_ladd": {"student", "discriminator"},
}

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Per case, each rank's tensors (``ddp_worker.py``); both ranks run every case in one launch."""
    out = tmp_path_factory.mktemp("ddp-critics")
    world = 2
    launch(ROOT / "tests/methods/ddp_worker.py", [str(out), str(out / "stages"), *PROBED], world, timeout=240)
    return {case: [load_file(str(out / f"{case}-rank{r}.safetensors")) for r in range(world)] for case in PROBED}


@pytest.mark.parametrize("case", list(PROBED))
def test_every_group_trains_and_stays_the_same_on_both_ranks(runs, case):
    rank0, rank1 = runs[case]
    final = [k for k in rank0 if k.startswith("final/")]
    groups = {k.split("/")[1] for k in final}
    assert {"student"} | PROBED[case] <= groups
    for k in final:
        assert torch.equal(rank0[k], rank1[k]), f"{case}: {k} differs between the ranks"
    for group in groups:  # it did train (the ranks' data differ, so unsynchronised copies would part)
        keys = [k for k in final if k.split("/")[1] == group]
        assert any(not torch.equal(rank0[k], rank0["init/" + k[len("final/"):]]) for k in keys), (case, group)


@pytest.mark.parametrize("case", list(PROBED))
def test_gradients_through_the_wrappers_are_the_mean_of_the_ranks_own(runs, case):
    rank0, rank1 = runs[case]
    assert {k[len("synced/"):] for k in rank0 if k.startswith("synced/")} == PROBED[case]
    for group in PROBED[case]:
        own0, own1 = rank0[f"local/{group}"], rank1[f"local/{group}"]
        assert not torch.allclose(own0, own1), f"{case}/{group}: the ranks' own gradients agree; the probe is void"
        synced = rank0[f"synced/{group}"]
        assert torch.equal(synced, rank1[f"synced/{group}"])
        torch.testing.assert_close(synced, (own0 + own1) / 2, rtol=1e-5, atol=1e-7)
