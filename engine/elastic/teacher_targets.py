"""The full model's next-token distributions, kept small enough to cache, and the KL to them.

Distillation compares a submodel's logits with the full model's at every calibration token.  The
full logits are vocab-wide (SmolLM2: 49,152 floats, 192 KiB a token), too big to keep for the tens
of thousands of tokens a level trains on, and recomputing them costs a full forward per batch and
per level.  What is kept instead, per token:

    top_ids       [N, k]  int32    the teacher's k most likely tokens
    top_logprobs  [N, k]  float16  their log-probabilities (over the whole vocabulary)
    rest_logprob  [N]     float32  log of the mass outside them (-inf when k = vocab)

so the teacher is a (k + 1)-bucket distribution: its top k tokens and one bucket for the rest.
The KL is taken between the teacher's and the student's distributions coarsened the same way:

    KL = sum_{i in top-k} p_i (log p_i - log q_i)  +  p_rest (log p_rest - log q_rest)

which is the exact KL of the two coarsened distributions, and never above the full-vocabulary KL
(coarsening cannot increase a divergence).  With k = 64 the rest holds little of the teacher's mass
on chat text, so the two are close: tests/elastic/test_teacher_targets.py measures the gap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Log-probabilities, not logits, go to float16: they lie in (-inf, 0], where float16 is finest near
# the top token's (log p = -0.1 to within 6e-5), while a logit near 20 would round by 0.016.
_LOGPROB_DTYPE = torch.float16
# The teacher's rest log-mass below this (k = vocab: -inf) adds nothing, so an empty rest gives 0,
# not nan.
_MIN_LOG = -1e4
_MIN_REST_MASS = 1e-6  # the student's rest mass is 1 - its top k's, good to about this in fp32


@dataclass(frozen=True)
class TeacherTargets:
    """The full model's distribution at N token positions, as its top k plus the rest's mass."""

    top_ids: torch.Tensor  # [N, k] int32, most likely first
    top_logprobs: torch.Tensor  # [N, k] float16
    rest_logprob: torch.Tensor  # [N] float32

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int) -> TeacherTargets:
        """Targets from a batch of teacher logits [..., vocab] (flattened to rows)."""
        rows = logits.detach().reshape(-1, logits.shape[-1]).float()
        top_logits, top_ids = rows.topk(k, dim=-1)
        logsumexp = torch.logsumexp(rows, dim=-1)
        rest = torch.logsumexp(rows.scatter(1, top_ids, float("-inf")), dim=-1) - logsumexp
        return cls(top_ids.to(torch.int32), (top_logits - logsumexp[:, None]).to(_LOGPROB_DTYPE), rest)

    @property
    def num_tokens(self) -> int:
        return self.top_ids.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.top_ids, self.top_logprobs, self.rest_logprob))

    def top1_ids(self) -> torch.Tensor:
        """The teacher's greedy token at each position [N] (topk sorts, so column 0)."""
        return self.top_ids[:, 0].long()


def bucketed_kl(student_logits: torch.Tensor, targets: TeacherTargets) -> torch.Tensor:
    """Mean KL(teacher || student) over the targets' rows, on the (k + 1)-bucket distributions.
    `student_logits` [..., vocab] (any float dtype) flattens to the targets' rows."""
    # PERF: one fused log-softmax (fp32 out of bf16 logits) and the rest's mass as 1 - the top k's:
    # two vocabulary-wide logsumexps and a masked copy, forward and backward, held a level-40
    # distillation step to 301 tokens/s against 342 (SmolLM2, 512 tokens a step).
    logprobs = torch.log_softmax(student_logits.reshape(-1, student_logits.shape[-1]), dim=-1, dtype=torch.float32)
    student_top = logprobs.gather(1, targets.top_ids.long())
    # The sum of k fp32 probabilities is good to ~1e-6 absolute: a rest below that is clamped (no
    # gradient through it), and the top k's terms, which hold the rest of the teacher's mass, move it.
    rest_mass = (1.0 - student_top.exp().sum(-1)).clamp_min(_MIN_REST_MASS)
    student_rest = rest_mass.log()
    teacher_top = targets.top_logprobs.float()
    kl_top = (teacher_top.exp() * (teacher_top - student_top)).sum(-1)
    teacher_rest = targets.rest_logprob.clamp_min(_MIN_LOG)
    kl_rest = torch.where(teacher_rest > _MIN_LOG, teacher_rest.exp() * (teacher_rest - student_rest), 0.0)
    return (kl_top + kl_rest).mean()


def full_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) over the whole vocabulary, rows flattened."""
    student = torch.log_softmax(student_logits.reshape(-1, student_logits.shape[-1]).float(), dim=-1)
    teacher = torch.log_softmax(teacher_logits.reshape(-1, teacher_logits.shape[-1]).float(), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()
