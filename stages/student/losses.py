"""Distillation losses on a sparse (top-k) teacher: plain KD baselines and ATKD.

Every loss here works on the *bucket partition* of docs/method.md. At a position
with gold next token g and cached teacher top-k ids S the buckets are

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
= 0, positions with ``valid`` False contribute nothing, "mean" divides by the
valid count (or the non-empty group count for ATKD), and a batch with nothing
valid gives 0 with the autograd graph intact. Teacher log-probs are clamped at
``TEACHER_MIN_LOGPROB`` and the teacher residual at ``TEACHER_RESIDUAL_FLOOR``:
float32 cannot resolve ``1 - sum`` below ~1e-7 and fp16 top-k log-probs can sum
past 1, so a zero residual is rounding noise, and a strictly positive teacher
keeps reverse-direction divergences finite. The teacher buckets are then
renormalised to sum to 1 (a no-op unless the cached masses exceeded 1).

For chunked training (never materialising [tokens, vocab] logits): compute
``atkd_position_weights`` for the whole micro-batch (teacher only), then per
chunk of positions ``position_terms(bucket_logprobs(...))`` and accumulate
``sum(w.tkd * tkd + w.dkd * dkd + w.ce * nll)``; that equals
``atkd_loss(..., reduction="sum")``, and dividing by ``w.num_groups`` gives "mean".
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "tvd", "js", "skew_kl", "skew_rkl")
ATKD_BASES = ("forward_kl", "reverse_kl")
REDUCTIONS = ("mean", "sum")
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


class ATKDWeights(NamedTuple):
    """Per-position [N] weights of the ATKD objective (teacher-only, no grad).

    ``atkd_loss(reduction="sum") == sum(tkd * TKD + dkd * DKD + ce * NLL)``;
    "mean" additionally divides by ``num_groups`` (groups with >= 1 valid position).
    """

    tkd: Tensor
    dkd: Tensor
    ce: Tensor
    hard: Tensor  # bool, valid and hard
    easy: Tensor  # bool, valid and easy
    unc: Tensor  # teacher 1 - p_g (0 where invalid)
    num_groups: Tensor  # long scalar

    def stats(self) -> dict[str, float]:
        """Logging summary: mean UNC over valid positions, easy/hard/group counts."""
        n_valid = int((self.hard | self.easy).sum())
        return {
            "mean_unc": float(self.unc.sum()) / max(n_valid, 1),
            "num_hard": int(self.hard.sum()),
            "num_easy": int(self.easy.sum()),
            "num_groups": int(self.num_groups),
        }


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")


def _check_open_unit(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value}")


def _check_inputs(student_logits, topk_ids, topk_logprobs, target_ids, target_logprobs, valid, group_ids=None):
    if student_logits.dim() != 2 or student_logits.shape[1] < 2:
        raise ValueError(f"student_logits must be [N, V] with V >= 2, got shape {tuple(student_logits.shape)}")
    n, vocab = student_logits.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n or not 1 <= topk_ids.shape[1] <= vocab:
        raise ValueError(f"topk_ids must be [N={n}, k] with 1 <= k <= V={vocab}, got {tuple(topk_ids.shape)}")
    if topk_logprobs.shape != topk_ids.shape:
        raise ValueError(f"topk_logprobs shape {tuple(topk_logprobs.shape)} != topk_ids shape {tuple(topk_ids.shape)}")
    check_position_args(n, target_ids, target_logprobs, valid, group_ids, (("topk_ids", topk_ids),))


def check_position_args(n: int, target_ids, target_logprobs, valid, group_ids, teacher_ids) -> None:
    """The per-position arguments every loss shares: [N] shapes, integer ids, a bool mask.
    `teacher_ids`: (name, tensor) pairs of the teacher's id arrays, checked as integers first."""
    for name, t in (("target_ids", target_ids), ("target_logprobs", target_logprobs), ("valid", valid)):
        if t.shape != (n,):
            raise ValueError(f"{name} must be [N={n}], got shape {tuple(t.shape)}")
    if group_ids is not None and group_ids.shape != (n,):
        raise ValueError(f"group_ids must be [N={n}] or None, got shape {tuple(group_ids.shape)}")
    for name, t in (*teacher_ids, ("target_ids", target_ids), ("group_ids", group_ids)):
        if t is not None and (t.is_floating_point() or t.dtype == torch.bool):
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor, got {valid.dtype}")


def _masked_logsumexp(x: Tensor, mask: Tensor) -> Tensor:
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
    known_lse = _masked_logsumexp(known, present[:, :-1])
    residual_mass = (-torch.expm1(known_lse.clamp(max=0.0))).clamp(min=TEACHER_RESIDUAL_FLOOR)
    teacher = torch.cat([known, residual_mass.log()[:, None]], 1)
    return teacher - _masked_logsumexp(teacher, present)[:, None]


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
    nll = _masked_logsumexp(raw, full_present) - raw[:, 0]
    student = raw - _masked_logsumexp(raw, present)[:, None]

    teacher = teacher.masked_fill(~present, -math.inf)
    student = student.masked_fill(~present, -math.inf)
    return Buckets(teacher, student, present, nll)


def _divergence_rows(lp: Tensor, lq: Tensor, present: Tensor, divergence: str, beta: float, alpha: float) -> Tensor:
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
    _check_choice("divergence", divergence, DIVERGENCES)
    _check_open_unit("beta", beta)
    _check_open_unit("alpha", alpha)
    return _divergence_rows(buckets.teacher, buckets.student, buckets.present, divergence, beta, alpha)


def position_terms(buckets: Buckets, base: str = "forward_kl") -> PositionTerms:
    """Per-position TKD, DKD, full KL and NLL; ``base`` picks the KL direction.

    Both binary and non-gold distributions are built from the buckets in log
    space (1 - x_g = logsumexp of the non-gold buckets), so p_g = 1 or q_g -> 1
    never takes log(0). A row with no non-gold bucket (``renormalize_topk`` and
    S = {g}) has TKD = DKD = 0.
    """
    _check_choice("base", base, ATKD_BASES)
    lp, lq, present = buckets.teacher, buckets.student, buckets.present
    ng_present = present[:, 1:]
    lp_rest = _masked_logsumexp(lp[:, 1:], ng_present)  # log(1 - p_g)
    lq_rest = _masked_logsumexp(lq[:, 1:], ng_present)
    binary_present = torch.stack([torch.ones_like(present[:, 0]), torch.isfinite(lp_rest)], 1)
    tkd = _divergence_rows(
        torch.stack([lp[:, 0], lp_rest], 1), torch.stack([lq[:, 0], lq_rest], 1), binary_present, base, 0.5, 0.1
    )
    has_rest = torch.isfinite(lp_rest) & torch.isfinite(lq_rest)
    dkd_present = ng_present & has_rest[:, None]
    lp_hat = lp[:, 1:] - torch.where(has_rest, lp_rest, 0.0)[:, None]
    lq_hat = lq[:, 1:] - torch.where(has_rest, lq_rest, 0.0)[:, None]
    dkd = _divergence_rows(lp_hat, lq_hat, dkd_present, base, 0.5, 0.1)
    kl = _divergence_rows(lp, lq, present, base, 0.5, 0.1)
    return PositionTerms(tkd, dkd, kl, buckets.nll)


@torch.no_grad()
def atkd_position_weights(
    target_logprobs: Tensor,
    valid: Tensor,
    group_ids: Tensor | None = None,
    *,
    easy_weight: float = 0.2,
    hard_ratio: float = 0.5,
    ce_weight: float = 0.0,
) -> ATKDWeights:
    """ATKD's per-position weights, from the teacher's gold log-probs only.

    Per group of valid positions (n of them): UNC = 1 - p_g; the ceil(hard_ratio
    * n) positions with the largest UNC are hard (ties: lower position index
    first), the rest easy. Group loss = easy_weight * mean_easy(DKD) +
    (1 - easy_weight) * mean_hard(TKD + DKD) [+ ce_weight * mean(NLL)], an empty
    set contributing 0. Vectorised: one stable sort by UNC, one by group.
    """
    if not 0.0 <= easy_weight <= 1.0 or not 0.0 <= hard_ratio <= 1.0 or ce_weight < 0.0:
        raise ValueError(
            f"need 0 <= easy_weight <= 1, 0 <= hard_ratio <= 1, ce_weight >= 0; "
            f"got easy_weight={easy_weight}, hard_ratio={hard_ratio}, ce_weight={ce_weight}"
        )
    n = valid.shape[0]
    device = valid.device
    if group_ids is None:
        group_ids = torch.zeros(n, dtype=torch.long, device=device)
    _, group = torch.unique(group_ids, return_inverse=True)
    num_slots = int(group.max()) + 1 if n else 0  # == number of distinct group ids
    unc = torch.where(valid, -torch.expm1(target_logprobs.float().clamp(max=0.0)), 0.0)

    # Rank inside each group: by UNC descending (invalid last), then by group;
    # both sorts stable, so equal UNC keeps position order.
    order = torch.sort(torch.where(valid, unc, -1.0), descending=True, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]
    group_size = torch.bincount(group, minlength=num_slots)
    group_start = torch.cumsum(group_size, 0) - group_size
    rank = torch.empty_like(group)
    rank[order] = torch.arange(n, device=device) - group_start[group[order]]

    n_valid = torch.zeros(num_slots, dtype=torch.long, device=device).scatter_add_(0, group, valid.long())
    n_hard = torch.ceil(hard_ratio * n_valid.double()).long()
    n_easy = n_valid - n_hard
    hard = valid & (rank < n_hard[group])
    easy = valid & ~hard
    hard_w = (1.0 - easy_weight) / n_hard.clamp(min=1).float()
    easy_w = easy_weight / n_easy.clamp(min=1).float()
    zero = torch.zeros(n, device=device)
    tkd = torch.where(hard, hard_w[group], zero)
    dkd = torch.where(hard, hard_w[group], torch.where(easy, easy_w[group], zero))
    ce = torch.where(valid, ce_weight / n_valid.clamp(min=1).float()[group], zero)
    return ATKDWeights(tkd, dkd, ce, hard, easy, unc, (n_valid > 0).sum())


def _reduce(per_position: Tensor, valid: Tensor, denominator: Tensor, reduction: str) -> Tensor:
    total = torch.where(valid, per_position, 0.0).sum()
    return total if reduction == "sum" else total / denominator.clamp(min=1)


def kd_loss(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    target_ids: Tensor,
    target_logprobs: Tensor,
    valid: Tensor,
    *,
    divergence: str = "forward_kl",
    renormalize_topk: bool = False,
    beta: float = 0.5,
    alpha: float = 0.1,
    ce_weight: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """Plain KD baseline: ``divergence`` on the bucket partition (+ ce_weight * NLL),
    averaged ("mean") or summed ("sum") over valid positions; 0 if none is valid.

    Shapes: student_logits [N, V], topk_ids / topk_logprobs [N, k], target_ids /
    target_logprobs / valid [N]. ``beta``: the js mixture weight on the teacher;
    ``alpha``: DistiLLM's skew (see ``_divergence_rows``).
    """
    _check_inputs(student_logits, topk_ids, topk_logprobs, target_ids, target_logprobs, valid)
    _check_choice("divergence", divergence, DIVERGENCES)
    _check_choice("reduction", reduction, REDUCTIONS)
    if ce_weight < 0.0:
        raise ValueError(f"ce_weight must be >= 0, got {ce_weight}")
    buckets = bucket_logprobs(
        student_logits, topk_ids, topk_logprobs, target_ids, target_logprobs, renormalize_topk, valid
    )
    per_position = bucket_divergence(buckets, divergence, beta=beta, alpha=alpha)
    if ce_weight:
        per_position = per_position + ce_weight * buckets.nll
    return _reduce(per_position, valid, valid.sum(), reduction)


def atkd_loss(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    target_ids: Tensor,
    target_logprobs: Tensor,
    valid: Tensor,
    *,
    group_ids: Tensor | None = None,
    base: str = "forward_kl",
    easy_weight: float = 0.2,
    hard_ratio: float = 0.5,
    renormalize_topk: bool = False,
    ce_weight: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """ATKD (docs/method.md): per group, easy_weight * mean_easy(DKD) + (1 - easy_weight)
    * mean_hard(TKD + DKD), split by the teacher's UNC = 1 - p_g, no UNC factor.

    ``group_ids`` [N] (e.g. the sequence index) or None for one group. "mean"
    averages the group losses over groups with >= 1 valid position, "sum" adds
    them. ``base="reverse_kl"`` uses TKD = KL(b_q||b_p), DKD = KL(q^||p^).
    """
    _check_inputs(student_logits, topk_ids, topk_logprobs, target_ids, target_logprobs, valid, group_ids)
    _check_choice("base", base, ATKD_BASES)
    _check_choice("reduction", reduction, REDUCTIONS)
    weights = atkd_position_weights(
        target_logprobs, valid, group_ids, easy_weight=easy_weight, hard_ratio=hard_ratio, ce_weight=ce_weight
    )
    buckets = bucket_logprobs(
        student_logits, topk_ids, topk_logprobs, target_ids, target_logprobs, renormalize_topk, valid
    )
    terms = position_terms(buckets, base)
    per_position = weights.tkd * terms.tkd + weights.dkd * terms.dkd
    if ce_weight:
        per_position = per_position + weights.ce * terms.nll
    return _reduce(per_position, valid, weights.num_groups, reduction)
