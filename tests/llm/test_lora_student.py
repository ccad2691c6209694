"""The LoRA student: the teacher's architecture and frozen weights plus trainable peft adapters."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from domains.llm import LLMDataConfig, LLMDomain, LLMModelConfig  # noqa: E402
from domains.llm.models import CausalLM, LoRACausalLM, load_causal_lm, student_lora  # noqa: E402
from kdlib.core.models import Student, Teacher  # noqa: E402
from kdlib.objectives import divergence  # noqa: E402


def test_only_adapters_train_and_the_student_starts_as_the_teacher(tiny_teacher_folder):
    teacher = load_causal_lm(tiny_teacher_folder)
    student = student_lora(teacher, rank=4, alpha=8.0, targets=["q_proj", "v_proj"])
    assert isinstance(student, LoRACausalLM)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # rank-4 adapters (A [4, in], B [out, 4]) on q_proj and v_proj of each of the 3 layers
    q, v = teacher.lm.model.layers[0].self_attn.q_proj, teacher.lm.model.layers[0].self_attn.v_proj
    per_layer = 4 * (q.in_features + q.out_features) + 4 * (v.in_features + v.out_features)
    assert sum(p.numel() for n, p in student.named_parameters() if n in trainable) == 3 * per_layer
    x = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(student(x), teacher(x))  # B = 0 at init
    assert student(x, output="hidden").shape == (2, 7, 48)
    # The base weights are copies: training the student never touches the teacher.
    assert student.head_weight.data_ptr() != teacher.head_weight.data_ptr()


def test_training_then_saving_merges_and_reloads_identical_logits(tiny_teacher_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher = load_causal_lm(tiny_teacher_folder)
    reference = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = student_lora(teacher, rank=2, alpha=4.0, targets=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    sharp = Teacher(CausalLM(AutoModelForCausalLM.from_pretrained(tiny_teacher_folder), teacher.vocab_size))
    with torch.no_grad():
        sharp.model.lm.lm_head.weight.mul_(30.0)  # a target the student is not yet
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = divergence(Student(student)(x), sharp(x), "fkl")
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, reference[key]), key  # teacher untouched
    with torch.no_grad():
        trained = student(x)
    assert not torch.allclose(trained, teacher(x), atol=1e-4)
    folder = student.save_pretrained(tmp_path / "student")
    assert not list(folder.glob("adapter_*")) and (folder / "config.json").exists()
    back = CausalLM(AutoModelForCausalLM.from_pretrained(folder), student.vocab_size)
    assert not any("lora" in k for k in back.state_dict())
    torch.testing.assert_close(back(x), trained, rtol=1e-5, atol=1e-5)
    # Saving merged a copy: the student still has its adapters and still trains.
    assert any(p.requires_grad and "lora_" in n for n, p in student.named_parameters())
    torch.testing.assert_close(student(x), trained)


def test_the_domain_builds_a_lora_student_and_checks_its_options(tiny_teacher_folder):
    domain = LLMDomain(LLMDataConfig(), LLMModelConfig(teacher=str(tiny_teacher_folder), student="lora",
                                                       lora_rank=3, lora_targets=["q_proj"]))
    student = domain.build_student()
    assert isinstance(student, LoRACausalLM)
    a = [p for n, p in student.named_parameters() if "lora_A" in n]
    assert len(a) == 3 and a[0].shape == (3, 48)
    bad = LLMDomain(LLMDataConfig(), LLMModelConfig(teacher=str(tiny_teacher_folder), student="lora",
                                                    lora_targets=["qkv"]))
    with pytest.raises(ValueError, match="match no linear layer.*q_proj"):
        bad.build_student()
    with pytest.raises(ValueError, match="lora_rank"):
        student_lora(load_causal_lm(tiny_teacher_folder), rank=0, alpha=1.0, targets=["q_proj"])


def test_lora_student_generates_like_its_base_model(tiny_teacher_folder):
    teacher = load_causal_lm(tiny_teacher_folder)
    student = student_lora(teacher, rank=2, alpha=4.0, targets=["q_proj"])
    prompt = torch.randint(3, 64, (2, 4), generator=torch.Generator().manual_seed(1))
    ids, mask = student.generate(prompt, 5, temperature=0.0)
    t_ids, t_mask = teacher.generate(prompt, 5, temperature=0.0)
    assert torch.equal(ids, t_ids) and torch.equal(mask, t_mask)  # adapters start at zero
