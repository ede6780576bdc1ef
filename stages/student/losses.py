"""Distillation losses on a sparse (top-k) teacher: plain KD baselines and ATKD.

Every loss here works on the *bucket partition* of docs/method.md, built by
stages/buckets.py (the buckets, their log-probs and the divergences on them,
which evaluation's KL to the teacher uses too): KD is a divergence on the
buckets, ATKD weighs the TKD and DKD terms of ``position_terms`` per position.

Reductions (torchtune's kd_losses): positions with ``valid`` False contribute
nothing, "mean" divides by the valid count (or the non-empty group count for
ATKD), and a batch with nothing valid gives 0 with the autograd graph intact.

For chunked training (never materialising [tokens, vocab] logits): compute
``atkd_position_weights`` for the whole micro-batch (teacher only), then per
chunk of positions ``position_terms(bucket_logprobs(...))`` and accumulate
``sum(w.tkd * tkd + w.dkd * dkd + w.ce * nll)``; that equals
``atkd_loss(..., reduction="sum")``, and dividing by ``w.num_groups`` gives "mean".
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from stages.buckets import (ATKD_BASES, DIVERGENCES, bucket_divergence, bucket_logprobs, check_choice,
                            position_terms)
from stages.student.config import weight_problems

REDUCTIONS = ("mean", "sum")


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
    problems = weight_problems(easy_weight=easy_weight, hard_ratio=hard_ratio, ce_weight=ce_weight)
    if problems:
        raise ValueError("; ".join(problems))
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
    ``alpha``: DistiLLM's skew (see ``stages.buckets.divergence_rows``).
    """
    _check_inputs(student_logits, topk_ids, topk_logprobs, target_ids, target_logprobs, valid)
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("reduction", reduction, REDUCTIONS)
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
    check_choice("base", base, ATKD_BASES)
    check_choice("reduction", reduction, REDUCTIONS)
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
