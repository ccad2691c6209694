"""Fixtures for the llm tests."""

from __future__ import annotations

import pytest

from tests.llm.tiny_models import WORDS, tiny_llama, word_tokenizer


@pytest.fixture
def tiny_teacher_folder(tmp_path):
    """A local transformers folder: a random 3-layer Llama over a 64-word tokenizer."""
    folder = tmp_path / "teacher"
    tokenizer = word_tokenizer(WORDS)
    tiny_llama(len(tokenizer), hidden=48, layers=3, tie=True, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
