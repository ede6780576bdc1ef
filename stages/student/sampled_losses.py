"""Distillation losses on *sampled* teacher targets (cache format v2): KD and ATKD.

A top-k cache biases the student: the teacher's tail is one residual bucket, so
the student only learns how much mass the tail has, not where. Instead, a v2
position holds n i.i.d. draws x_1..x_n from the teacher's full distribution p at
temperature 1 (the distribution whose exact gold log-prob log p_g is also cached),
stored as ids + counts, count 0 marking padding (ids need not be unique), and
optionally the teacher log-probs of the sampled ids. This follows "Sparse Logit
Sampling" (Anshumann et al., 2025, arXiv 2503.16870): sampled targets give an
unbiased estimate of the forward-KL gradient, which top-k targets cannot.

Estimators, per position (c_j the count of id x_j, n = sum c_j):

* KD, forward KL:  KL^ = sum_j (c_j / n) * (log p(x_j) - log q(x_j)).
  Its gradient in the student logits, q - c/n, is an unbiased estimate of
  q - p = grad KL(p||q). With ``sample_logprobs`` the value is an unbiased
  estimate of KL(p||q); without them log p(x_j) is taken as 0, so the value is
  an unbiased estimate of the cross-entropy H(p, q) = KL(p||q) + H(p): KL up to
  a student-independent constant, with the same (unbiased) gradient.
* ATKD: TKD = KL(b_p || b_q), b = [x_g, 1 - x_g], is *exact* (p_g is cached,
  q from the full student logits), so TKD and the hard/easy split by
  UNC = 1 - p_g are identical to the top-k version's (``atkd_position_weights``).
  DKD = KL(p^ || q^) over the non-gold tokens is estimated from the non-gold
  draws only (gold draws are dropped; q^ = the student renormalised over the
  non-gold ids). Given n_ng = sum of non-gold counts >= 1, those draws are
  i.i.d. from p^, so the ratio estimate
      D = sum_{x_j != g} (c_j / n_ng) * (log p^(x_j) - log q^(x_j))
  is conditionally unbiased; with n_ng = 0 (every draw was the gold token) DKD
  is undefined and the position's DKD is 0. That event has the known
  probability p_g^n, so ``unbiased_dkd=True`` (this function's default; training's
  ``loss.unbiased_dkd`` defaults to False, see docs/method.md) returns D / (1 - p_g^n),
  an exactly unbiased estimate of DKD (value with ``sample_logprobs``, else DKD
  up to the student-independent -H(p^)) and of its gradient.
  ``unbiased_dkd=False`` returns D itself: E = (1 - p_g^n) * DKD, biased low
  (negligible unless p_g^n is large), with less variance on confident positions.
* Reverse KL cannot be estimated without bias from teacher samples at useful
  variance (it needs E_q, i.e. importance weights q/p, unbounded on the teacher's
  tail), so ``base="reverse_kl"`` raises ValueError.

Variance notes: all estimates have variance O(1/n) for KD and O(1/(n (1 - p_g)))
for DKD (about n (1 - p_g) non-gold draws); single estimates can be negative.
The 1/(1 - p_g^n) factor is large only when all-gold draws are likely (p_g near
1, easy positions); it is floored at TEACHER_RESIDUAL_FLOOR (as the teacher's
1 - p_g is), so one position's DKD is scaled by at most 1e6. On a confident teacher
those rare large terms dominate the gradient (RMS error 8x-40x the dense gradient's
norm on demo-like batches, ~1.4x with ``unbiased_dkd=False``), which is why training
defaults to False (docs/method.md). More draws per position shrink all of it; the
ATKD/KD means over many positions average it further.

Conventions are those of ``stages.student.losses``: float32, ``valid`` masks
positions (their terms are 0), "mean" divides by the valid count (KD) or the
non-empty group count (ATKD), nothing valid gives 0 with the graph intact,
teacher log-probs are clamped at TEACHER_MIN_LOGPROB and 1 - p_g floored at
TEACHER_RESIDUAL_FLOOR. A valid position with no draws (all counts 0)
contributes TKD (ATKD) but no KL^ or DKD.

Chunked training: ``atkd_position_weights`` (teacher only) for the micro-batch,
then per chunk ``sampled_position_terms`` and accumulate ``sum(w.tkd * tkd +
w.dkd * dkd + w.ce * nll)`` == ``sampled_atkd_loss(..., reduction="sum")``; for
KD accumulate ``sum(kl + ce_weight * nll)`` == ``sampled_kd_loss(..., "sum")``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from stages.buckets import (TEACHER_MIN_LOGPROB, TEACHER_RESIDUAL_FLOOR, PositionTerms, check_choice,
                            divergence_rows)
from stages.student.losses import REDUCTIONS, _reduce, atkd_position_weights, check_position_args

SAMPLED_BASES = ("forward_kl",)


def _check_base(base: str) -> None:
    if base == "reverse_kl":
        raise ValueError(
            "base 'reverse_kl' is not supported on sampled teacher targets: KL(q||p) needs an expectation "
            "under the student, which draws from the teacher can only give through unbounded importance "
            "weights q/p; use base='forward_kl' or a top-k cache"
        )
    check_choice("base", base, SAMPLED_BASES)


def _check_sampled_inputs(student_logits, sample_ids, sample_counts, target_ids, target_logprobs, valid,
                          sample_logprobs=None, group_ids=None) -> None:
    if student_logits.dim() != 2 or student_logits.shape[1] < 2:
        raise ValueError(f"student_logits must be [N, V] with V >= 2, got shape {tuple(student_logits.shape)}")
    n = student_logits.shape[0]
    if sample_ids.dim() != 2 or sample_ids.shape[0] != n:
        raise ValueError(f"sample_ids must be [N={n}, m], got shape {tuple(sample_ids.shape)}")
    for name, t in (("sample_counts", sample_counts), ("sample_logprobs", sample_logprobs)):
        if t is not None and t.shape != sample_ids.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != sample_ids shape {tuple(sample_ids.shape)}")
    check_position_args(n, target_ids, target_logprobs, valid, group_ids,
                        (("sample_ids", sample_ids), ("sample_counts", sample_counts)))


def sampled_position_terms(
    student_logits: Tensor,
    sample_ids: Tensor,
    sample_counts: Tensor,
    target_ids: Tensor,
    target_logprobs: Tensor,
    sample_logprobs: Tensor | None = None,
    valid: Tensor | None = None,
    *,
    base: str = "forward_kl",
    unbiased_dkd: bool = True,
) -> PositionTerms:
    """Per-position [N] float32 terms on sampled targets (see the module doc).

    ``tkd``: exact TKD; ``dkd``: the DKD estimate; ``kl``: the KL^ estimate (or
    cross-entropy estimate without ``sample_logprobs``); ``nll``: exact -log q_g.
    Rows with ``valid`` False are all 0 (their ids/log-probs may be garbage).
    """
    _check_base(base)
    n_rows, _ = student_logits.shape
    device = student_logits.device
    target_ids, ids = target_ids.long(), sample_ids.long()
    lp_g, counts = target_logprobs.float(), sample_counts.float()
    if valid is None:
        valid = torch.ones(n_rows, dtype=torch.bool, device=device)
    target_ids = torch.where(valid, target_ids, 0)
    lp_g = torch.where(valid, lp_g, 0.0)
    used = valid[:, None] & (counts > 0)  # count 0 (or below) is padding
    ids = torch.where(used, ids, 0)
    counts = torch.where(used, counts, 0.0)

    # Teacher binary [p_g, 1 - p_g]: clamp, floor, renormalise (as buckets.bucket_logprobs does).
    lp_g = lp_g.clamp(min=TEACHER_MIN_LOGPROB, max=0.0)
    lp_rest = (-torch.expm1(lp_g)).clamp(min=TEACHER_RESIDUAL_FLOOR).log()
    norm = torch.logaddexp(lp_g, lp_rest)
    lp_g, lp_rest = lp_g - norm, lp_rest - norm

    # Student: log q_g, log(1 - q_g) (a logsumexp over the non-gold logits, exact near q_g = 1).
    logits = student_logits.float()
    lse = torch.logsumexp(logits, dim=1)
    lse_rest = torch.logsumexp(logits.scatter(1, target_ids[:, None], -math.inf), dim=1)  # V >= 2: finite
    z_g = logits.gather(1, target_ids[:, None])[:, 0]
    z_s = logits.gather(1, ids)  # [N, m]
    lq_g, lq_rest = z_g - lse, lse_rest - lse

    binary_present = torch.ones(n_rows, 2, dtype=torch.bool, device=device)
    tkd = divergence_rows(torch.stack([lp_g, lp_rest], 1), torch.stack([lq_g, lq_rest], 1), binary_present,
                           "forward_kl", 0.5, 0.1)

    lp_s = None
    if sample_logprobs is not None:
        lp_s = torch.where(used, sample_logprobs.float().clamp(min=TEACHER_MIN_LOGPROB, max=0.0), 0.0)

    # KD: sum_j c_j / n * (log p(x_j) - log q(x_j)).
    n = counts.sum(1)
    lq_s = z_s - lse[:, None]
    kl = -(counts * lq_s).sum(1) if lp_s is None else (counts * (lp_s - lq_s)).sum(1)
    kl = kl / n.clamp(min=1.0)

    # DKD: the non-gold draws, log q^ = z - lse_rest and log p^ = log p - log(1 - p_g).
    counts_ng = torch.where(ids != target_ids[:, None], counts, 0.0)
    n_ng = counts_ng.sum(1)
    lq_hat = z_s - lse_rest[:, None]
    if lp_s is None:
        dkd = -(counts_ng * lq_hat).sum(1)
    else:
        dkd = (counts_ng * (lp_s - lp_rest[:, None] - lq_hat)).sum(1)
    dkd = dkd / n_ng.clamp(min=1.0)  # rows with no non-gold draw: 0
    if unbiased_dkd:  # divide by P(n_ng >= 1) = 1 - p_g^n
        dkd = dkd / (-torch.expm1(n * lp_g)).clamp(min=TEACHER_RESIDUAL_FLOOR)

    zero = torch.zeros((), device=device)
    return PositionTerms(*(torch.where(valid, t, zero) for t in (tkd, dkd, kl, -lq_g)))


def sampled_kd_loss(
    student_logits: Tensor,
    sample_ids: Tensor,
    sample_counts: Tensor,
    target_ids: Tensor,
    target_logprobs: Tensor,
    valid: Tensor,
    *,
    sample_logprobs: Tensor | None = None,
    ce_weight: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """Forward-KL KD on sampled targets (+ ce_weight * NLL), "mean" over valid positions or "sum".

    Shapes: student_logits [N, V]; sample_ids / sample_counts (/ sample_logprobs)
    [N, m], count 0 = padding; target_ids / target_logprobs / valid [N]. The
    gradient is an unbiased estimate of the dense KL's; the value is an unbiased
    estimate of KL with ``sample_logprobs``, of the cross-entropy H(p, q) without.
    """
    _check_sampled_inputs(student_logits, sample_ids, sample_counts, target_ids, target_logprobs, valid,
                          sample_logprobs)
    check_choice("reduction", reduction, REDUCTIONS)
    if ce_weight < 0.0:
        raise ValueError(f"ce_weight must be >= 0, got {ce_weight}")
    terms = sampled_position_terms(student_logits, sample_ids, sample_counts, target_ids, target_logprobs,
                                   sample_logprobs, valid)
    per_position = terms.kl + ce_weight * terms.nll if ce_weight else terms.kl
    return _reduce(per_position, valid, valid.sum(), reduction)


def sampled_atkd_loss(
    student_logits: Tensor,
    sample_ids: Tensor,
    sample_counts: Tensor,
    target_ids: Tensor,
    target_logprobs: Tensor,
    valid: Tensor,
    *,
    sample_logprobs: Tensor | None = None,
    group_ids: Tensor | None = None,
    base: str = "forward_kl",
    easy_weight: float = 0.2,
    hard_ratio: float = 0.5,
    ce_weight: float = 0.0,
    unbiased_dkd: bool = True,
    reduction: str = "mean",
) -> Tensor:
    """ATKD on sampled targets: per group, easy_weight * mean_easy(DKD) + (1 - easy_weight)
    * mean_hard(TKD + DKD), TKD exact, DKD estimated (see the module doc), split by
    the exact UNC = 1 - p_g exactly as ``losses.atkd_loss``. Only ``base="forward_kl"``.
    """
    _check_sampled_inputs(student_logits, sample_ids, sample_counts, target_ids, target_logprobs, valid,
                          sample_logprobs, group_ids)
    _check_base(base)
    check_choice("reduction", reduction, REDUCTIONS)
    weights = atkd_position_weights(
        target_logprobs, valid, group_ids, easy_weight=easy_weight, hard_ratio=hard_ratio, ce_weight=ce_weight
    )
    terms = sampled_position_terms(student_logits, sample_ids, sample_counts, target_ids, target_logprobs,
                                   sample_logprobs, valid, base=base, unbiased_dkd=unbiased_dkd)
    per_position = weights.tkd * terms.tkd + weights.dkd * terms.dkd
    if ce_weight:
        per_position = per_position + weights.ce * terms.nll
    return _reduce(per_position, valid, weights.num_groups, reduction)


def counts_from_draws(draws: Tensor) -> tuple[Tensor, Tensor]:
    """Draws [N, n] of token ids -> (unique ids, counts), both [N, n] long, sorted by id,
    count-0 padding (id 0) after each row's unique ids. Deterministic, vectorised."""
    draws, _ = torch.sort(draws.long(), dim=1)
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = torch.cumsum(first.long(), dim=1) - 1
    counts = torch.zeros_like(draws).scatter_add_(1, slot, torch.ones_like(draws))
    ids = torch.zeros_like(draws).scatter_(1, slot, draws)  # each slot gets one value, repeated
    return ids, counts


def draw_teacher_samples(teacher_logprobs: Tensor, n: int, *, generator: torch.Generator | None = None
                         ) -> tuple[Tensor, Tensor]:
    """n i.i.d. draws per row from softmax(teacher_logprobs [N, V]) (temperature 1), as
    ``counts_from_draws`` (ids, counts). A reference sampler for tests and small caches."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    probs = torch.softmax(teacher_logprobs.double(), dim=-1)
    return counts_from_draws(torch.multinomial(probs, n, replacement=True, generator=generator))
