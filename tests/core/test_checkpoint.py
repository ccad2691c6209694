import json
import warnings

import pytest
import torch

from kdlib.core import checkpoint as ckpt
from kdlib.core.state import capture_rng, flatten_state, restore_rng, unflatten_state


def _tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g), "i": torch.arange(4)}


def test_roundtrip_and_keep_last_k(tmp_path):
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(tmp_path, step, _tensors(step), {"note": f"s{step}"}, keep=2)
    kept = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert kept == ["step-00000030", "step-00000040"]
    loaded = ckpt.latest_checkpoint(tmp_path)
    assert loaded.step == 40 and loaded.meta["note"] == "s40"
    for k, v in _tensors(40).items():
        assert torch.equal(loaded.tensors[k], v)


def test_corrupt_latest_falls_back_with_warning(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, _tensors(1), {}, keep=3)
    path = ckpt.save_checkpoint(tmp_path, 2, _tensors(2), {}, keep=3)
    data = bytearray((path / ckpt.TENSORS).read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the tensor payload
    (path / ckpt.TENSORS).write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="checksum mismatch.*falling back"):
        loaded = ckpt.latest_checkpoint(tmp_path)
    assert loaded.step == 1 and torch.equal(loaded.tensors["w"], _tensors(1)["w"])


def test_torn_meta_and_crash_leftovers_are_handled(tmp_path):
    ckpt.save_checkpoint(tmp_path, 5, _tensors(5), {}, keep=3)
    torn = ckpt.save_checkpoint(tmp_path, 6, _tensors(6), {}, keep=3)
    (torn / ckpt.META).write_text('{"step": 6, "tens')  # a write cut short
    (tmp_path / "step-00000007.tmp").mkdir()  # a crash during the next save
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert ckpt.latest_checkpoint(tmp_path).step == 5


def test_non_finite_checkpoint_is_refused(tmp_path):
    bad = _tensors(0)
    bad["w"][1, 1] = float("nan")
    with pytest.raises(ckpt.CheckpointError, match="tensor 'w' is not finite"):
        ckpt.save_checkpoint(tmp_path, 3, bad, {})
    assert ckpt.list_checkpoints(tmp_path) == []


def test_optimizer_state_roundtrip_without_pickle(tmp_path):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    tensors = {}
    skeleton = flatten_state("optim", opt.state_dict(), tensors)
    ckpt.save_checkpoint(tmp_path, 1, tensors, {"optim": skeleton})
    loaded = ckpt.latest_checkpoint(tmp_path)
    meta = json.loads(json.dumps(loaded.meta))  # what actually came off disk
    opt2 = torch.optim.AdamW(torch.nn.Linear(4, 2).parameters(), lr=0.5)
    opt2.load_state_dict(unflatten_state(meta["optim"], loaded.tensors))
    assert opt2.param_groups[0]["lr"] == 0.1 and list(opt2.param_groups[0]["betas"]) == [0.8, 0.9]
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt2.state_dict()["state"][0][key], opt.state_dict()["state"][0][key])


def test_rng_capture_restores_every_generator():
    import random

    import numpy as np

    tensors = {}
    meta = capture_rng(tensors)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(json.loads(json.dumps(meta)), tensors)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]


def test_weights_file_errors_are_clear(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = ckpt.save_weights(tmp_path / "w.safetensors", model)
    with pytest.raises(ckpt.CheckpointError, match="does not fit the model"):
        ckpt.load_weights(torch.nn.Linear(4, 2), path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ckpt.CheckpointError, match="cannot be read"):
        ckpt.load_weights(model, tmp_path / "junk.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt.load_weights(torch.nn.Linear(3, 2), path)
