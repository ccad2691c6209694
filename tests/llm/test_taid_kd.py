"""taid_kd: λ climbs to the teacher by the end of its schedule, where the loss is forward KL."""

from __future__ import annotations

import torch

from kdlib.core.method import METHODS
from kdlib.core.models import Student, Teacher
from kdlib.objectives import divergence


def test_taid_reaches_the_teacher_at_the_end_of_its_schedule():
    torch.manual_seed(0)
    student, teacher = torch.nn.Embedding(30, 30), torch.nn.Embedding(30, 30)
    x = torch.randint(0, 30, (4, 5))
    y = torch.randint(0, 30, (4, 5))
    method = METHODS.get("taid_kd")(METHODS.get("taid_kd").Config(total_steps=6), Student(student),
                                    Teacher(teacher))
    lambdas = []
    for step in range(7):
        method.update_groups(step)
        _, values = method.loss({"x": x, "y": y}, "student")
        lambdas.append(values["taid/lambda"])
    assert lambdas[0] == 0.4 and lambdas[-1] == 1.0
    assert all(b >= a for a, b in zip(lambdas, lambdas[1:]))
    loss, _ = method.loss({"x": x, "y": y}, "student")
    torch.testing.assert_close(loss, divergence(student(x), teacher(x), "fkl"))
    loss.backward()
    assert student.weight.grad.abs().max() > 0
