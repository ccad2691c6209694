"""Memory estimates (``kdlib distill --dry-run``): exact parameter, gradient and optimizer bytes
against a real CPU run; activations against the tensors autograd really saves; and, on a GPU,
the whole estimate against ``torch.cuda.max_memory_allocated`` of real training steps."""

from __future__ import annotations

import pytest
import torch

from domains.image.gen_models import MLPDenoiser
from kdlib.core.data import TensorDataset
from kdlib.core.memory import estimate_training, measure_training_peak
from kdlib.core.method import METHODS
from kdlib.core.models import Student, Teacher
from kdlib.core.run_config import TrainConfig
from kdlib.diffusion.consistency import ConsistencyModel
from kdlib.diffusion.param import get_parameterisation
from kdlib.diffusion.reparam import ReparameterisedNet
from kdlib.nn.dit import DiT, DiTConfig

SHAPE = (1, 8, 8)


def digits_like(n: int, shape=SHAPE) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(x=torch.randn(n, *shape, generator=g).clamp(-1, 1), y=torch.randint(0, 10, (n,), generator=g))


def denoiser(hidden: int, blocks: int, shape=SHAPE) -> MLPDenoiser:
    return MLPDenoiser(shape=shape, hidden=hidden, blocks=blocks, num_classes=10, parameterisation="fm")


def cd_builder(hidden: int, blocks: int, ema: list[float], shape=SHAPE, device: str | None = None,
               teacher_dtype: torch.dtype | None = None):
    """Consistency distillation of a denoiser teacher into a same-size consistency student."""

    def build():
        teacher = Teacher(denoiser(hidden, blocks, shape), device=device or "meta", dtype=teacher_dtype)
        student = Student(ConsistencyModel(denoiser(hidden, blocks, shape), get_parameterisation("fm")),
                          ema_decays=ema)
        if device:
            student = student.to(device)
        method_cls = METHODS.get("consistency_distillation")
        return method_cls(method_cls.Config(num_intervals=8), student, teacher)

    return build


def fm_builder(hidden: int, blocks: int, shape=SHAPE, device: str | None = None):
    """Flow-matching training of one denoiser (no teacher)."""

    def build():
        student = Student(denoiser(hidden, blocks, shape).to(device) if device else denoiser(hidden, blocks, shape))
        method_cls = METHODS.get("flow_matching")
        return method_cls(method_cls.Config(), student, None)

    return build


def train_cfg(**kw) -> TrainConfig:
    base = dict(steps=1, batch_size=16, device="cpu", progress=False, checkpoint_every=1000, log_every=1000)
    return TrainConfig(**{**base, **kw})


def storage_bytes(tensors) -> int:
    """Real tensors' bytes, each storage once by its address (not the estimator's mechanism)."""
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def real_saved_bytes(method, batch, group: str) -> int:
    """The bytes a real CPU forward of ``group``'s loss saves for backward (each storage once, by
    address; the networks' weights and forward AD's zero tangents, which hold none, left out);
    then its backward."""
    nets = [m for m in (method.teacher, method.student, *method.trainable_modules().values()) if m is not None]
    weights = {t.untyped_storage().data_ptr() for m in nets for t in (*m.parameters(), *m.buffers())}
    saved = {}

    def pack(t):
        if not t._is_zerotensor() and t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = method.loss(batch, group)
    loss.backward()
    return sum(saved.values())


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_param_grad_and_optimizer_bytes_are_exact(tmp_path, optimizer):
    """The estimate's rows equal what a real CPU training step allocates, to the byte: teacher
    (fp16 here), student, EMA copy, gradients and AdamW's two moments / SGD's momentum buffer."""
    cfg = train_cfg(optimizer=optimizer, ema_decays=[0.9])
    data = digits_like(64)
    est = estimate_training(cd_builder(32, 2, [0.9], teacher_dtype=torch.float16), data, cfg)
    rows = {n.name: n for n in est.networks}
    assert list(rows) == ["teacher", "student", "student ema 0.9"]

    from kdlib.core.trainer import Trainer

    torch.manual_seed(0)
    method = cd_builder(32, 2, [0.9], device="cpu", teacher_dtype=torch.float16)()
    trainer = Trainer(method, data, cfg, stage_dir=tmp_path, seed=0)
    trainer.fit()
    student = method.student.model
    teacher = method.teacher.model
    assert rows["teacher"].weights == storage_bytes([*teacher.parameters(), *teacher.buffers()])
    assert rows["teacher"].dtypes == "fp16" and rows["teacher"].grads == 0
    assert rows["student"].params == sum(p.numel() for p in student.parameters())
    assert rows["student"].weights == storage_bytes([*student.parameters(), *student.buffers()])
    assert rows["student ema 0.9"].weights == rows["student"].weights
    assert rows["student"].grads == storage_bytes([p.grad for p in student.parameters() if p.grad is not None])
    state = [v for s in trainer.optimizers["student"].state.values() for v in s.values() if torch.is_tensor(v)]
    assert rows["student"].optimizer == storage_bytes(state) > 0
    per_param = 2 if optimizer == "adamw" else 1  # (+ AdamW's scalar step counters, which are real CPU state)
    moments = per_param * rows["student"].weights - student.segments.numel() * student.segments.element_size()
    assert rows["student"].optimizer >= moments
    assert est.data == storage_bytes(data.tensors.values())


@pytest.mark.parametrize("batch_size", [16, 128])
def test_activations_within_20_percent_of_the_saved_tensors(batch_size):
    """The fake-tensor estimate against the bytes a real CPU forward really saves for backward
    (each storage once, by address; weights left out)."""
    cfg = train_cfg(batch_size=batch_size)
    data = digits_like(256)
    est = estimate_training(cd_builder(64, 3, []), data, cfg)

    torch.manual_seed(0)
    method = cd_builder(64, 3, [], device="cpu")()
    real = real_saved_bytes(method, {k: v[:batch_size] for k, v in data.tensors.items()}, "student")
    assert real > 0
    assert abs(est.activations["student"] - real) <= 0.2 * real, (est.activations, real)


def test_shared_weights_count_once():
    """A network built on the teacher's own parameters (as a LoRA fake score is) adds only its
    own weights: the teacher's show up as shared, counted once."""

    def build():
        method = cd_builder(32, 2, [])()
        method.fake_score = torch.nn.ModuleDict({"base": method.teacher.model, "adapter": torch.nn.Linear(32, 4)})
        return method

    est = estimate_training(build, digits_like(64), train_cfg())
    rows = {n.name: n for n in est.networks}
    assert rows["fake_score"].weights == (32 * 4 + 4) * 4
    assert rows["fake_score"].shared == rows["teacher"].params


def test_dry_run_prints_estimates_and_exits_without_a_run(tmp_path, capsys, monkeypatch):
    from kdlib.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["distill", "image", "--dry-run", "baseline=false"]) == 0
    out = capsys.readouterr().out
    # the default's two stages (MLCM, then DMD2), each estimated
    assert "stage seed0-mlcm: multistep_cd" in out and "stage seed0-dmd2: dmd2" in out
    assert "teacher" in out and "student" in out
    assert "peak estimate" in out and "nothing was allocated" in out
    assert not (tmp_path / "runs").exists()


GPU_CASES = {
    # name: (build on device, estimate builder, train config, data): >= 100M parameters each
    "cd-104M-ema-bf16": lambda: (cd_builder(2048, 4, [0.999], shape=(1, 28, 28), device="cuda"),
                                 cd_builder(2048, 4, [0.999], shape=(1, 28, 28)),
                                 train_cfg(batch_size=256, ema_decays=[0.999], device="cuda"), (1, 28, 28)),
    "fm-104M-big-batch-bf16": lambda: (fm_builder(2048, 4, shape=(3, 32, 32), device="cuda"),
                                       fm_builder(2048, 4, shape=(3, 32, 32)),
                                       train_cfg(batch_size=8192, device="cuda"), (3, 32, 32)),
    "fm-104M-big-batch-fp32": lambda: (fm_builder(2048, 4, shape=(3, 32, 32), device="cuda"),
                                       fm_builder(2048, 4, shape=(3, 32, 32)),
                                       train_cfg(batch_size=8192, device="cuda", precision="fp32"), (3, 32, 32)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_estimate_within_20_percent_of_the_measured_gpu_peak(case):
    import gc

    build_real, build_meta, cfg, shape = GPU_CASES[case]()
    data = digits_like(cfg.batch_size * 2, shape)
    est = estimate_training(build_meta, data, cfg, device="cuda")
    gc.collect()  # an earlier case's optimizer (in a cycle with its LR schedule) must not count here
    torch.cuda.empty_cache()
    # What an earlier case (or cuBLAS's workspace) left on the GPU is not this case's memory.
    before = torch.cuda.memory_allocated()
    method = build_real()
    params = sum(p.numel() for p in method.student.model.parameters())
    assert params >= 100e6
    measured = measure_training_peak(method, data, cfg) - before
    ratio = est.peak / measured
    mib = {k: round(v / 2**20) for k, v in [("weights", est.weights), ("grads", est.grads),
                                             ("optimizer", est.optimizer), ("data", est.data),
                                             ("activations", max(est.activations.values())),
                                             ("step temporaries", max(est.step_temporaries.values()))]}
    print(f"{case}: estimate {est.peak / 2**20:.0f} MiB {mib}, measured {measured / 2**20:.0f} MiB, "
          f"ratio {ratio:.3f}")
    del method
    gc.collect()
    torch.cuda.empty_cache()
    assert 0.8 <= ratio <= 1.2, (case, ratio)


def test_a_loss_that_reads_tensor_values_is_reported_not_fatal():
    """Fake tensors have no values: a loss calling float(t) gets no activation estimate (named,
    with the line), while its gradients and optimizer state stay exact."""
    from kdlib.core.method import Method

    class ReadsValues(Method):
        needs_teacher = False

        def loss(self, batch, group):
            out = self.student(batch["x"])
            return out.pow(2).mean() * float(out.detach().abs().mean()), {}

    def build():
        return ReadsValues(None, Student(torch.nn.Linear(8, 4)), None)

    est = estimate_training(build, TensorDataset(x=torch.randn(32, 8)), train_cfg())
    assert "test_memory.py" in est.unmeasured["student"] and "student" not in est.activations
    (row,) = est.networks
    assert row.grads == row.weights == (8 * 4 + 4) * 4 and row.optimizer >= 2 * row.weights


# -- forward AD (sCM's torch.func.jvp), step-dependent losses, later-trained parameters ----------
def small_dit() -> DiT:
    net = DiT(DiTConfig(in_channels=1, patch_size=2, hidden=32, depth=2, heads=2, num_classes=10))
    net.parameterisation = "fm"
    return net


NETS = {"mlp": lambda: denoiser(64, 3), "dit": small_dit}


def scm_builder(method: str, net: str, device: str | None = None, **args):
    """sCM-family distillation of a flow-matching teacher into a TrigFlow student that starts as
    it (the image domain's ``student_param: trigflow``), dF/dt by torch.func.jvp."""

    def build():
        teacher = Teacher(NETS[net](), device=device or "meta")
        trig = get_parameterisation("trigflow")
        student = Student(ConsistencyModel(ReparameterisedNet(NETS[net](), get_parameterisation("fm"), trig), trig))
        if device:
            student = student.to(device)
        cls = METHODS.get(method)
        return cls(cls.Config(teacher_param="fm", **args), student, teacher)

    return build


@pytest.mark.parametrize("net", sorted(NETS))
def test_jvp_losses_within_20_percent_of_the_saved_tensors(net):
    """sCM's loss runs torch.func.jvp: through LayerNorm (whose weight gets a zero tangent, which
    torch's ZeroTensor kernels leak onto the meta device under FakeTensorMode) and through kdlib
    attention's JVP (the DiT). It is estimated, and the estimate is what a real CPU step saves."""
    cfg, data = train_cfg(batch_size=32), digits_like(64)
    est = estimate_training(scm_builder("scm", net), data, cfg)
    assert not est.unmeasured
    torch.manual_seed(0)
    method = scm_builder("scm", net, device="cpu")()
    method.update_groups(0)
    real = real_saved_bytes(method, {k: v[:32] for k, v in data.tensors.items()}, "student")
    assert abs(est.activations["student"] - real) <= 0.2 * real, (est.activations, real)
    rows = {n.name: n for n in est.networks}
    assert rows["scm_weight"].optimizer > 0  # sCM's adaptive weight, trained with the student


def test_a_term_that_starts_later_is_counted():
    """rCM adds its distribution-matching term after the tangent warm-up: a run that gets there
    is estimated at its last step too, and the estimate is what a real step there saves."""
    data, args = digits_like(64), dict(tangent_warmup=4, adaptive_weight=False)
    before = estimate_training(scm_builder("rcm", "mlp", **args), data, train_cfg(batch_size=32, steps=1))
    after = estimate_training(scm_builder("rcm", "mlp", **args), data, train_cfg(batch_size=32, steps=10))
    torch.manual_seed(0)
    method = scm_builder("rcm", "mlp", device="cpu", **args)()
    method.update_groups(9)
    real = real_saved_bytes(method, {k: v[:32] for k, v in data.tensors.items()}, "student")
    assert before.activations["student"] < 0.9 * real
    assert abs(after.activations["student"] - real) <= 0.2 * real, (after.activations, real)


def test_every_trainable_parameter_gets_its_optimizer_state():
    """A loss that trains one expert per step (a phase's) gives the others no gradient; over the
    run each gets its AdamW state all the same, and that is counted. Gradients: this step's."""
    from kdlib.core.method import Method

    class OneExpert(Method):
        needs_teacher = False

        def loss(self, batch, group):
            return self.student.model["a"](batch["x"]).pow(2).mean(), {}

    def build():
        experts = torch.nn.ModuleDict({"a": torch.nn.Linear(8, 8), "b": torch.nn.Linear(8, 8)})
        return OneExpert(None, Student(experts), None)

    est = estimate_training(build, TensorDataset(x=torch.randn(32, 8)), train_cfg())
    (row,) = est.networks
    assert row.weights == 2 * (8 * 8 + 8) * 4 and row.grads == row.weights // 2
    assert row.optimizer >= 2 * row.weights
