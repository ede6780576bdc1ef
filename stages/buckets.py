"""The bucket partition of a sparse (top-k) teacher, and divergences on it: what the distillation
losses (stages/student/losses.py, sampled_losses.py) train on and what evaluation's KL to the
teacher (stages/eval/evaluate.py) measures, so both use the same math (docs/method.md).

At a position with gold next token g and cached teacher top-k ids S the buckets are

    [ {g},  each id of S (the slot holding g, if any, is dropped),  residual ]

where the residual is every other vocabulary id. The teacher's masses are
p_g = exp(target_logprob), p_s = exp(topk_logprob) and the residual
1 - p_g - sum p_{S\\g}; the student's come from its full float32 logits (the
residual is a logsumexp over the ids outside S u {g}, so it is exact in log
space). With k = V the residual is empty and everything equals the dense math.

Decomposition (Zhong et al., ACL 2024), on buckets and exact up to float error:

    KL(p||q) = TKD + (1 - p_g) * DKD,   TKD = KL(b_p || b_q),  DKD = KL(p^ || q^)

b = [x_g, 1 - x_g]; p^, q^ = the non-gold buckets renormalised by their own mass.
The reverse-KL base swaps the arguments: KL(q||p) = KL(b_q||b_p) + (1-q_g) KL(q^||p^).

Numerical conventions (torchtune's kd_losses): float32 everywhere, 0 * log(0/x)
= 0. Teacher log-probs are clamped at ``TEACHER_MIN_LOGPROB`` and the teacher
residual at ``TEACHER_RESIDUAL_FLOOR``: float32 cannot resolve ``1 - sum`` below
~1e-7 and fp16 top-k log-probs can sum past 1, so a zero residual is rounding
noise, and a strictly positive teacher keeps reverse-direction divergences
finite. The teacher buckets are then renormalised to sum to 1 (a no-op unless
the cached masses exceeded 1).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "tvd", "js", "skew_kl", "skew_rkl")
ATKD_BASES = ("forward_kl", "reverse_kl")
TEACHER_MIN_LOGPROB = -80.0  # exp(-80) ~ 1.8e-35: still a normal float32
TEACHER_RESIDUAL_FLOOR = 1e-6  # below float32's resolution of 1 - sum(p)


class Buckets(NamedTuple):
    """Log-probs on the bucket partition; columns [gold, top-k slots..., residual].

    ``teacher`` and ``student`` are float32 [N, k+2] and each row sums to 1 over
    the ``present`` columns; absent columns (the slot duplicating g, the residual
    when S u {g} covers the vocabulary or with ``renormalize_topk``) hold -inf.
    ``nll`` [N] is the student's full-vocabulary -log q_g (for a CE mix).
    """

    teacher: Tensor
    student: Tensor
    present: Tensor
    nll: Tensor


class PositionTerms(NamedTuple):
    """Per-position [N] float32 terms in one base direction (see module doc)."""

    tkd: Tensor
    dkd: Tensor
    kl: Tensor  # full bucket KL in the base direction; = tkd + unc * dkd
    nll: Tensor


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")


def check_open_unit(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value}")


def masked_logsumexp(x: Tensor, mask: Tensor) -> Tensor:
    """logsumexp over the last dim of the entries where mask is True (-inf if none).

    Masking with ``where`` also zeroes the masked entries' gradient, so even an
    all-masked row (whose logsumexp backward is NaN) back-propagates 0."""
    return torch.logsumexp(torch.where(mask, x, -math.inf), dim=-1)


def bucket_present(topk_ids: Tensor, target_ids: Tensor, vocab: int, renormalize_topk: bool = False
                   ) -> tuple[Tensor, Tensor]:
    """(present [N, k+2] bool, covered [N] bool): which buckets [gold, top-k slots..., residual]
    exist (g's duplicate slot does not; the residual not when S u {g} is the vocabulary, ``covered``)."""
    n = topk_ids.shape[0]
    slot_present = topk_ids != target_ids[:, None]  # drop g's duplicate from S
    covered = slot_present.sum(dim=1) + 1 >= vocab  # S u {g} is the whole vocabulary
    residual_present = ~covered & (not renormalize_topk)
    ones = torch.ones(n, 1, dtype=torch.bool, device=topk_ids.device)
    return torch.cat([ones, slot_present, residual_present[:, None]], 1), covered


def teacher_bucket_logprobs(target_logprobs: Tensor, topk_logprobs: Tensor, present: Tensor) -> Tensor:
    """The teacher's log-probs on the buckets (in the inputs' dtype; absent columns unmasked):
    clamp at TEACHER_MIN_LOGPROB, add the residual 1 - sum (floored), renormalise over ``present``."""
    known = torch.cat([target_logprobs[:, None], topk_logprobs], 1).clamp(min=TEACHER_MIN_LOGPROB)
    known_lse = masked_logsumexp(known, present[:, :-1])
    residual_mass = (-torch.expm1(known_lse.clamp(max=0.0))).clamp(min=TEACHER_RESIDUAL_FLOOR)
    teacher = torch.cat([known, residual_mass.log()[:, None]], 1)
    return teacher - masked_logsumexp(teacher, present)[:, None]


def bucket_logprobs(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    target_ids: Tensor,
    target_logprobs: Tensor,
    renormalize_topk: bool = False,
    valid: Tensor | None = None,
) -> Buckets:
    """Teacher and student log-probs on the bucket partition (see ``Buckets``).

    With ``renormalize_topk`` the residual bucket is dropped and both teacher and
    student are renormalised over S u {g} (the gold bucket is kept: its teacher
    log-prob is exact). The top-k ids of a row must be distinct (as any top-k
    is); g may or may not be among them. Rows where ``valid`` is False are replaced by a harmless
    dummy row so padding ids (e.g. -100) and garbage log-probs cannot raise or
    poison gradients; their values are meaningless.
    """
    n, vocab = student_logits.shape
    k = topk_ids.shape[1]
    device = student_logits.device
    target_ids, topk_ids = target_ids.long(), topk_ids.long()
    target_lp, topk_lp = target_logprobs.float(), topk_logprobs.float()
    if valid is not None:
        target_ids = torch.where(valid, target_ids, 0)
        dummy_ids = (torch.arange(1, k + 1, device=device) % vocab).expand(n, k)  # distinct ids
        topk_ids = torch.where(valid[:, None], topk_ids, dummy_ids)
        target_lp = torch.where(valid, target_lp, 0.0)
        topk_lp = torch.where(valid[:, None], topk_lp, 0.0)

    present, covered = bucket_present(topk_ids, target_ids, vocab, renormalize_topk)
    teacher = teacher_bucket_logprobs(target_lp, topk_lp, present)

    # Student: float32 logits of g and S, and logsumexp of the logits outside S u {g}.
    # Covered rows mask nothing (fill 0) so their logsumexp stays finite; unused.
    logits = student_logits.float()
    ids = torch.cat([target_ids[:, None], topk_ids], 1)
    fill = torch.where(covered, 0.0, -math.inf).to(logits.dtype)[:, None].expand(n, k + 1)
    residual_logit = torch.logsumexp(logits.scatter(1, ids, fill), dim=1)
    raw = torch.cat([logits.gather(1, ids), residual_logit[:, None]], 1)
    full_present = present.clone()
    full_present[:, -1] = ~covered
    nll = masked_logsumexp(raw, full_present) - raw[:, 0]
    student = raw - masked_logsumexp(raw, present)[:, None]

    teacher = teacher.masked_fill(~present, -math.inf)
    student = student.masked_fill(~present, -math.inf)
    return Buckets(teacher, student, present, nll)


def divergence_rows(lp: Tensor, lq: Tensor, present: Tensor, divergence: str, beta: float, alpha: float) -> Tensor:
    """Per-row divergence between teacher (lp) and student (lq) log-probs on ``present`` columns.

    js: beta * KL(p||m) + (1-beta) * KL(q||m), m = beta p + (1-beta) q (TRL's GKD
    convention); skew_kl: KL(p || alpha p + (1-alpha) q); skew_rkl: KL(q || alpha q
    + (1-alpha) p) (DistiLLM). Absent columns are zeroed on both the input and the
    output side so no inf/NaN reaches the backward pass.
    """
    lp = torch.where(present, lp, 0.0)
    lq = torch.where(present, lq, 0.0)
    p, q = lp.exp(), lq.exp()
    if divergence == "forward_kl":
        terms = p * (lp - lq)
    elif divergence == "reverse_kl":
        terms = q * (lq - lp)
    elif divergence == "tvd":
        terms = 0.5 * (p - q).abs()
    elif divergence == "js":
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
        terms = beta * p * (lp - lm) + (1.0 - beta) * q * (lq - lm)
    elif divergence == "skew_kl":
        terms = p * (lp - torch.logaddexp(lp + math.log(alpha), lq + math.log1p(-alpha)))
    elif divergence == "skew_rkl":
        terms = q * (lq - torch.logaddexp(lq + math.log(alpha), lp + math.log1p(-alpha)))
    else:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {', '.join(DIVERGENCES)}")
    return torch.where(present, terms, 0.0).sum(dim=-1)


def bucket_divergence(
    buckets: Buckets, divergence: str = "forward_kl", *, beta: float = 0.5, alpha: float = 0.1
) -> Tensor:
    """Per-position [N] divergence between teacher and student on the buckets."""
    check_choice("divergence", divergence, DIVERGENCES)
    check_open_unit("beta", beta)
    check_open_unit("alpha", alpha)
    return divergence_rows(buckets.teacher, buckets.student, buckets.present, divergence, beta, alpha)


def position_terms(buckets: Buckets, base: str = "forward_kl") -> PositionTerms:
    """Per-position TKD, DKD, full KL and NLL; ``base`` picks the KL direction.

    Both binary and non-gold distributions are built from the buckets in log
    space (1 - x_g = logsumexp of the non-gold buckets), so p_g = 1 or q_g -> 1
    never takes log(0). A row with no non-gold bucket (``renormalize_topk`` and
    S = {g}) has TKD = DKD = 0.
    """
    check_choice("base", base, ATKD_BASES)
    lp, lq, present = buckets.teacher, buckets.student, buckets.present
    ng_present = present[:, 1:]
    lp_rest = masked_logsumexp(lp[:, 1:], ng_present)  # log(1 - p_g)
    lq_rest = masked_logsumexp(lq[:, 1:], ng_present)
    binary_present = torch.stack([torch.ones_like(present[:, 0]), torch.isfinite(lp_rest)], 1)
    tkd = divergence_rows(
        torch.stack([lp[:, 0], lp_rest], 1), torch.stack([lq[:, 0], lq_rest], 1), binary_present, base, 0.5, 0.1
    )
    has_rest = torch.isfinite(lp_rest) & torch.isfinite(lq_rest)
    dkd_present = ng_present & has_rest[:, None]
    lp_hat = lp[:, 1:] - torch.where(has_rest, lp_rest, 0.0)[:, None]
    lq_hat = lq[:, 1:] - torch.where(has_rest, lq_rest, 0.0)[:, None]
    dkd = divergence_rows(lp_hat, lq_hat, dkd_present, base, 0.5, 0.1)
    kl = divergence_rows(lp, lq, present, base, 0.5, 0.1)
    return PositionTerms(tkd, dkd, kl, buckets.nll)
