"""The teacher's ODE pairs of the generative image domain, for methods that regress on them (DMD's
regression loss: ``kdlib.methods.dmd``, whose ``needs_ode_pairs`` says when).

A pair is a noise image z ~ N(0, I) and the teacher's deterministic sample from it under a class
label: ``model.teacher_sampler`` (Euler by default) for ``data.ode_pair_steps`` steps (50) at
``model.guidance``, i.e. the teacher as the domain samples it. DMD's pair set is smaller than its
data (``data.ode_pairs``, default 2,000 of MNIST's 4,000 training digits): the pairs are drawn
stratified by label (each label's share of the training split, at least one pair per label), and
every training row carries one pair of its own label, the label's pairs in turn (row j of a label
gets that label's pair j mod k), so a batch's condition is its pairs' condition too. With
``ode_pairs`` ≥ the training rows, every row gets a pair of its own.

The pairs cost ``ode_pair_steps`` teacher evaluations per pair (2× with guidance ≠ 1), once: they
are stored under ``$KDLIB_CACHE_DIR`` (default ``~/.cache/kdlib``)``/image-gen/ode-pairs/`` in a
safetensors file named by the training data, the teacher's dtype, count, sampler, steps and seed,
whose metadata is the whole key (also the teacher's weights, guidance, parameterisation, format).
A later run with the same key loads them; a file made for another key (a retrained teacher,
another guidance) is stale: warned about, recomputed and replaced; an unreadable one too. Files
are written under a temporary name and renamed (atomic).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from kdlib.core.cache import cache_dir, load_keyed, save_keyed
from kdlib.core.data import TensorDataset
from kdlib.core.models import Teacher
from kdlib.core.teacher_cache import fingerprint
from kdlib.diffusion.param import Parameterisation
from kdlib.methods.dmd import PAIR_KEYS, add_ode_pairs

FORMAT = "image-gen-ode-pairs/1"


def pair_rows(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Indices [k] (sorted) of the training rows whose labels the pairs take: ``count`` rows
    stratified by label (each label's share of ``count`` by largest remainders, at least one per
    label, so k = max(count, number of labels)), drawn with ``seed``; every row when ``count`` ≥
    len(labels)."""
    if count >= len(labels):
        return torch.arange(len(labels))
    classes, sizes = labels.unique(return_counts=True)
    quota = count * sizes.double() / len(labels)
    k = quota.floor().long().clamp(min=1)
    short = count - int(k.sum())
    if short > 0:  # the largest remainders get one more
        k[(quota - quota.floor()).argsort(descending=True, stable=True)[:short]] += 1
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c, n in zip(classes, k.tolist()):
        members = (labels == c).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=g)[:n]])
    return torch.cat(chosen).sort().values


def assign_pairs(labels: torch.Tensor, pair_labels: torch.Tensor) -> torch.Tensor:
    """For every row of ``labels`` [N], the index of the pair (of ``pair_labels`` [k]) it carries:
    the row's label's pairs in turn (module docstring)."""
    out = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique():
        rows = (labels == c).nonzero().flatten()
        pairs = (pair_labels == c).nonzero().flatten()
        if not len(pairs):
            raise ValueError(f"no ODE pair has label {int(c)}")
        out[rows] = pairs[torch.arange(len(rows)) % len(pairs)]
    return out


def teacher_fingerprint(teacher: Teacher) -> str:
    """sha256 over the teacher network's state (names, dtypes, shapes and values)."""
    state = teacher.model.state_dict()
    return fingerprint(*(part for name in sorted(state) for part in (name, state[name])))


def ode_pairs(train: TensorDataset, teacher: Teacher, param: Parameterisation, *, count: int, steps: int,
              sampler: str, guidance: float, seed: int, batch_size: int = 256,
              cache: Path | None = None) -> dict[str, torch.Tensor]:
    """The pair set of ``train`` (x, y): ``rows`` [k] (the training rows whose labels the pairs
    take), ``ode_noise`` and ``ode_x`` [k, C, H, W] (float32, CPU); from the cache file when it was
    made for the same key, else computed with ``teacher`` and stored (module docstring)."""
    x, y = train.tensors["x"], train.tensors["y"]
    extra = sorted(set(train.tensors) - {"x", "y"})
    if extra:
        raise ValueError(f"ODE pairs: the training split may hold only x and y, found also {extra}")
    key = {"format": FORMAT, "teacher": teacher_fingerprint(teacher), "data": fingerprint(x, y),
           "param": param.name, "count": str(count), "sampler": sampler, "steps": str(steps),
           "guidance": repr(float(guidance)), "seed": str(seed)}
    weight = next(teacher.model.parameters())
    # One slot per data, teacher dtype (fp32 and bf16 runs keep their own), count, solver and seed;
    # the rest of the key (the teacher's weights, guidance, ...) is checked inside.
    slot = f"{key['data'][:16]}-{str(weight.dtype).removeprefix('torch.')}-n{count}-{sampler}{steps}-s{seed}"
    path = (cache or cache_dir() / "image-gen" / "ode-pairs") / f"{slot}.safetensors"
    stored = _load(path, key)
    if stored is not None:
        return stored
    rows = pair_rows(y, count, seed)
    subset = TensorDataset(x=x[rows], y=y[rows]).to(weight.device)
    made = add_ode_pairs(subset, teacher, param, steps=steps, sampler=sampler, guidance=guidance, seed=seed,
                         batch_size=batch_size).tensors
    pairs = {"rows": rows, **{k: made[k].float().cpu().contiguous() for k in PAIR_KEYS}}
    save_keyed(path, pairs, key)
    return pairs


def attach_pairs(train: TensorDataset, pairs: dict[str, torch.Tensor]) -> TensorDataset:
    """``train`` with ``ode_noise`` / ``ode_x`` per row: a pair of the row's own label."""
    y = train.tensors["y"]
    index = assign_pairs(y, y[pairs["rows"]])
    return TensorDataset(**train.tensors, **{k: pairs[k][index] for k in PAIR_KEYS})


def placeholder_pairs(train: TensorDataset) -> TensorDataset:
    """Zero pairs of the right shapes and dtypes (``kdlib distill --dry-run``, whose teacher is on
    the meta device: there is nothing to solve, only shapes to measure)."""
    x = train.tensors["x"]
    return TensorDataset(**train.tensors, **{k: torch.zeros_like(x) for k in PAIR_KEYS})


def _load(path: Path, key: dict[str, str]) -> dict[str, torch.Tensor] | None:
    pairs = load_keyed(path, key, what="ODE pair cache")
    if pairs is None:
        return None
    if set(pairs) != {"rows", *PAIR_KEYS} or not len(pairs["rows"]) == len(pairs["ode_noise"]) == len(pairs["ode_x"]):
        warnings.warn(f"ODE pair cache {path} does not hold a pair set; recomputing it", stacklevel=3)
        return None
    return pairs
