"""Text loading and packing, tokenizer comparison, model folders, and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch

from domains.llm import data as llm_data
from domains.llm.models import CausalLM, check_same_tokenizer, load_causal_lm, student_from_teacher
from tests.llm.tiny_models import WORDS, word_tokenizer


def test_packing_keeps_documents_out_of_both_splits():
    tok = word_tokenizer(WORDS)
    docs = [" ".join(f"w{(3 * d + i) % 61}" for i in range(5 + d % 4)) + f" w{d % 61}" for d in range(40)]
    blocks = llm_data.pack_blocks(docs, tok, block_size=7, eval_blocks=3, train_blocks=5, seed=0, name="t")
    assert blocks["heldout"].shape == (3, 8) and blocks["train"].shape == (5, 8)
    assert int(blocks["train"].max()) < len(tok)
    eos = tok.eos_token_id
    assert (blocks["train"] == eos).any()  # documents are joined with EOS
    again = llm_data.pack_blocks(docs, tok, block_size=7, eval_blocks=3, train_blocks=5, seed=0, name="t")
    assert torch.equal(again["train"], blocks["train"])  # fixed by split_seed


def test_steering_blocks_come_after_the_training_documents():
    tok = word_tokenizer(WORDS)
    docs = [" ".join(f"w{(3 * d + i) % 61}" for i in range(5 + d % 4)) + f" w{d % 61}" for d in range(60)]
    plain = llm_data.pack_blocks(docs, tok, block_size=7, eval_blocks=3, train_blocks=5, seed=0, name="t")
    steered = llm_data.pack_blocks(docs, tok, block_size=7, eval_blocks=3, train_blocks=5, seed=0, name="t",
                                   steer_blocks=4)
    assert "steer" not in plain and steered["steer"].shape == (4, 8)
    # asking for steering blocks leaves the held-out and training blocks (and their caches) as they were
    assert torch.equal(steered["heldout"], plain["heldout"]) and torch.equal(steered["train"], plain["train"])
    # and they come from other documents: every document ends with its own marker word w{d % 61}
    # right before EOS, so the (marker) words before each EOS name the documents a split holds
    eos = tok.eos_token_id

    def markers(blocks):
        flat = blocks.flatten()
        return {int(flat[i - 1]) for i in (flat == eos).nonzero().flatten().tolist() if i > 0}

    assert markers(steered["steer"]).isdisjoint(markers(steered["train"]) | markers(steered["heldout"]))
    with pytest.raises(ValueError, match="4 steering blocks"):
        llm_data.pack_blocks(docs[:12], tok, block_size=7, eval_blocks=3, train_blocks=5, seed=0, name="t",
                             steer_blocks=4)


def test_text_that_tokenises_to_nothing_is_an_error(tmp_path):
    tok = word_tokenizer(WORDS)
    with pytest.raises(ValueError, match="'empty' tokenises to 0 tokens"):
        llm_data.pack_blocks(["", "  "], tok, block_size=4, eval_blocks=1, train_blocks=1, seed=0, name="empty")


def test_user_files(tmp_path):
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text(json.dumps({"text": "w1 w2"}) + "\n\n" + json.dumps({"text": "w3"}) + "\n")
    assert llm_data.source_documents(str(jsonl)) == ("mine", ["w1 w2", "w3"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: .*'text'"):
        llm_data.source_documents(str(bad))
    txt = tmp_path / "notes.txt"
    txt.write_text("a b\nc\n\nd e\n")
    assert llm_data.source_documents(str(txt)) == ("notes", ["a b\nc", "d e"])
    with pytest.raises(ValueError, match="unknown text source 'koran'"):
        llm_data.source_documents("koran")


def test_missing_debian_packages_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(llm_data.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install bible-kjv"):
        llm_data.bible_documents()
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        llm_data.fortune_documents(tmp_path / "nowhere")


def test_python_source_is_the_running_stdlib():
    docs = llm_data.python_documents()
    assert len(docs) > 50 and any("def " in d for d in docs)


def test_mismatched_tokenizers_name_the_difference():
    check_same_tokenizer(word_tokenizer(WORDS), word_tokenizer(WORDS))
    with pytest.raises(ValueError, match=r"only in the student's: \['zebra'\]"):
        check_same_tokenizer(word_tokenizer(WORDS), word_tokenizer(WORDS + ["zebra"]))
    with pytest.raises(ValueError, match="same token, different id"):
        check_same_tokenizer(word_tokenizer(WORDS), word_tokenizer(WORDS[::-1]))


def test_a_folder_that_is_not_a_causal_lm_is_an_error(tmp_path):
    from transformers import T5Config

    with pytest.raises(ValueError, match="no config.json"):
        load_causal_lm(tmp_path)
    T5Config(d_model=16, num_layers=1, vocab_size=32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a causal language model .*'t5'"):
        load_causal_lm(tmp_path)


def test_layer_student_is_cut_from_the_teacher_and_round_trips(tmp_path, tiny_teacher_folder):
    from transformers import AutoModelForCausalLM

    teacher = load_causal_lm(tiny_teacher_folder)
    student = student_from_teacher(teacher, every=2)  # layers 0 and 2 of 3
    assert student.lm.config.num_hidden_layers == 2
    assert torch.equal(student.lm.model.layers[1].mlp.up_proj.weight, teacher.lm.model.layers[2].mlp.up_proj.weight)
    student.save_pretrained(tmp_path / "student")
    back = CausalLM(AutoModelForCausalLM.from_pretrained(tmp_path / "student"), student.vocab_size)
    x = torch.randint(0, 64, (2, 5))
    torch.testing.assert_close(back(x), student(x))
    assert student(x, output="hidden").shape == (2, 5, 48)


def test_under_the_meta_device_a_model_is_built_with_shapes_only(tiny_teacher_folder):
    """The --dry-run estimator builds networks under torch.device("meta"), where from_pretrained
    refuses to run: the folder's architecture comes from its config, at the same shapes and dtypes,
    and a student cut from it is too."""
    real = load_causal_lm(tiny_teacher_folder)
    with torch.device("meta"):
        meta = load_causal_lm(tiny_teacher_folder)
        student = student_from_teacher(meta, every=2)
    shapes = {k: (v.shape, v.dtype) for k, v in real.state_dict().items()}
    assert {k: (v.shape, v.dtype) for k, v in meta.state_dict().items()} == shapes
    assert all(p.is_meta for p in (*meta.parameters(), *student.parameters()))
    assert meta.vocab_size == real.vocab_size and student.lm.config.num_hidden_layers == 2


def test_domain_end_to_end_on_a_tiny_teacher(tmp_path, tiny_teacher_folder, monkeypatch):
    """kdlib's Experiment on the llm domain with user text files and the teacher cache, a few steps."""
    from kdlib.core.experiment import Experiment, create_run_dir
    from kdlib.core.run_config import resolve_config

    monkeypatch.setenv("KDLIB_CACHE_DIR", str(tmp_path / "cache"))
    g = torch.Generator().manual_seed(0)
    for name in ("one", "two"):
        text = "\n\n".join(" ".join(f"w{int(i)}" for i in torch.randint(0, 61, (12,), generator=g))
                           for _ in range(30))
        (tmp_path / f"{name}.txt").write_text(text)
    raw = {
        "domain": "llm", "method": "cached_kd", "runs_dir": str(tmp_path / "runs"), "name": "tiny",
        "data": {"sources": [str(tmp_path / "one.txt"), str(tmp_path / "two.txt")], "block_size": 8,
                 "train_blocks": 6, "eval_blocks": 2, "teacher_cache_k": 4},
        "model": {"teacher": str(tiny_teacher_folder), "student": "layers", "student_every": 2},
        "train": {"steps": 3, "batch_size": 4, "progress": False, "checkpoint_every": 3},
    }
    cfg = resolve_config(raw, source="test")
    results = Experiment(create_run_dir(cfg, "test"), cfg).run()
    assert set(results["teacher"]) >= {"val_one/teacher/ppl", "val_two/teacher/agreement"}
    assert results["teacher"]["val_one/teacher/agreement"] == 1.0
    for method in ("cached_kd", "supervised"):
        final = results["seeds"][method]["0"]
        assert 1.0 < final["val_one/student/ppl"] < 1e4 and 0.0 <= final["val_two/student/agreement"] <= 1.0
    cached = list((tmp_path / "cache" / "llm" / "teacher-signal").glob("*train-k4*.safetensors"))
    assert len(cached) == 1
    report = (tmp_path / "runs" / "tiny" / "report.md").read_text()
    assert "val_one" in report and "## Generations" in report and "tokens/s" in report
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "tiny" / "students" / "cached_kd")
    assert saved.config.num_hidden_layers == 2


def test_every_llm_recipe_resolves():
    from domains.llm import LLMDomain
    from kdlib.core.run_config import load_run_config

    names = sorted(p.stem for p in LLMDomain.recipes_dir.glob("*.yaml"))
    assert {"default", "ddk", "fused-gpu"} <= set(names)
    for name in names:
        cfg = load_run_config(LLMDomain.recipe_path(name), domain="llm")
        assert cfg.domain == "llm" and cfg.baseline
