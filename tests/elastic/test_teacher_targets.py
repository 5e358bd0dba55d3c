"""Cached teacher targets: the bucketed KL is the exact KL of the coarsened distributions, never
above the full-vocabulary KL, and zero for the teacher itself."""

from __future__ import annotations

import pytest
import torch

from engine.elastic.teacher_targets import TeacherTargets, bucketed_kl, full_kl

VOCAB = 50


def logits_pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(2, 7, VOCAB, generator=generator) * 3
    student = teacher + torch.randn(2, 7, VOCAB, generator=generator)
    return teacher, student


def test_targets_keep_the_top_k_log_probabilities() -> None:
    teacher, _ = logits_pair()
    targets = TeacherTargets.from_logits(teacher, k=5)
    assert targets.top_ids.shape == (14, 5) and targets.num_tokens == 14
    expected = torch.log_softmax(teacher.reshape(14, VOCAB), -1).topk(5, dim=-1)
    assert torch.equal(targets.top_ids.long(), expected.indices)
    assert torch.allclose(targets.top_logprobs.float(), expected.values, atol=1e-2)
    assert torch.equal(targets.top1_ids(), teacher.reshape(14, VOCAB).argmax(-1))
    assert targets.nbytes == 14 * (5 * (4 + 2) + 4)


def test_teacher_against_itself_is_zero() -> None:
    teacher, _ = logits_pair()
    assert abs(float(bucketed_kl(teacher, TeacherTargets.from_logits(teacher, k=8)))) < 1e-3


@pytest.mark.parametrize("k", [1, 5, 20, VOCAB])
def test_bucketed_kl_is_at_most_the_full_kl_and_exact_at_full_width(k: int) -> None:
    teacher, student = logits_pair()
    full = float(full_kl(student, teacher))
    bucketed = float(bucketed_kl(student, TeacherTargets.from_logits(teacher, k)))
    assert 0 <= bucketed <= full + 1e-3
    if k >= VOCAB - 1:  # a rest of at most one token loses nothing
        assert bucketed == pytest.approx(full, abs=2e-3)


def test_bucketed_kl_gradient_moves_the_student_toward_the_teacher() -> None:
    teacher, student = logits_pair()
    targets = TeacherTargets.from_logits(teacher, k=10)
    student = student.clone().requires_grad_()
    bucketed_kl(student, targets).backward()
    assert torch.isfinite(student.grad).all()
    with torch.no_grad():
        stepped = student - 1.0 * student.grad
        assert float(full_kl(stepped, teacher)) < float(full_kl(student, teacher))
