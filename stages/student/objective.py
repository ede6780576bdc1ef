"""The student's training objective, computed without full-vocabulary logits.

A student step needs the student's distribution only at the P trained target
positions of a micro-batch, and never all P x V float32 logits at once. So the
base model runs to its final hidden states [B, L, H], the P target rows are
gathered, and the LM head plus the loss run over chunks of `chunk_size` rows.
Each chunk's gradient (for its rows and the head weight) is taken right away
inside the forward pass and the chunk's logits are freed; backward then only
scales the stored gradients. Peak memory is one chunk's logits plus a gradient
buffer the size of the head, and the head's matmul runs three times (as in plain
fine-tuning) rather than four (as with activation checkpointing per chunk).

Losses are sums (`reduction="sum"` semantics of stages.student.losses); the
trainer divides by the global count of positions or groups, so the gradient is
the same whether the global batch is split over micro-batches, ranks or chunks.
Everything happens inside `StudentObjective.forward`, so DDP and FSDP see one
ordinary forward and one backward per micro-batch.

On a cache with sampled targets (format v2) kd and atkd use the unbiased
estimators of stages.student.sampled_losses (`resolve_targets` says which
targets a loss trains on); the kd "loss" logged there is then the cross-entropy
estimate H(p, q) = KL + H(p), with the same gradient as the KL.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.errors import TrainingError
from stages.student.config import LossConfig
from stages.lm import hidden_at_targets
from stages.buckets import bucket_divergence, bucket_logprobs, position_terms
from stages.student.losses import atkd_position_weights
from stages.student.sampled_losses import sampled_position_terms

ChunkLoss = Callable[[Tensor, slice, dict], Tensor]


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum over chunks of chunk_loss(head(rows[chunk])), gradients taken per chunk."""

    @staticmethod
    def forward(ctx, rows, weight, bias, chunk_loss, chunk_size, softcap, stats):
        grads = [torch.zeros_like(t) if t is not None and t.requires_grad else None for t in (rows, weight, bias)]
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        # One detached leaf for the head, reused by every chunk: autocast caches one
        # bf16 copy per leaf, so a fresh leaf per chunk would pile up copies of the head.
        head = [None if t is None else t.detach().requires_grad_(g is not None)
                for t, g in zip((weight, bias), grads[1:])]
        for start in range(0, rows.shape[0], chunk_size):
            part = slice(start, min(start + chunk_size, rows.shape[0]))
            with torch.enable_grad():
                leaves = [rows[part].detach().requires_grad_(grads[0] is not None), *head]
                logits = F.linear(leaves[0], leaves[1], leaves[2])
                if softcap:
                    logits = softcap * torch.tanh(logits / softcap)
                loss = chunk_loss(logits, part, stats)
            wanted = [(i, leaf) for i, leaf in enumerate(leaves) if grads[i] is not None]
            if wanted and loss.requires_grad:
                for (i, _), g in zip(wanted, torch.autograd.grad(loss, [leaf for _, leaf in wanted])):
                    if i == 0:
                        grads[0][part] = g
                    else:
                        grads[i] += g
            total += loss.detach().float()
        # Intermediates of our own, not inputs/outputs: kept on ctx (not save_for_backward)
        # so backward can scale them in place and release them at once.
        ctx.grads = grads
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grads, ctx.grads = ctx.grads, None
        out = [None if g is None else g.mul_(grad_output.to(g.dtype)) for g in grads]
        return out[0], out[1], out[2], None, None, None, None


def chunked_head_loss(rows: Tensor, head: nn.Module, chunk_loss: ChunkLoss, chunk_size: int, *,
                      softcap: float | None = None, stats: dict | None = None) -> Tensor:
    """sum_c chunk_loss(head(rows[c]), c, stats) over chunks c of `chunk_size` rows; differentiable
    in rows and the head's weight/bias without keeping more than one chunk's logits."""
    if chunk_size <= 0:
        raise ValueError(f"loss.chunk_size must be > 0, got {chunk_size}")
    stats = {} if stats is None else stats
    return _ChunkedHeadLoss.apply(rows, head.weight, getattr(head, "bias", None), chunk_loss,
                                  int(chunk_size), softcap, stats)


def resolve_targets(loss_cfg: LossConfig, cache_targets: str, where: str = "loss") -> str:
    """'topk' or 'sampled': the teacher targets this loss trains on, given the cache's kind
    (storage.schema.targets_of). TrainingError names what does not fit: a kind the cache
    lacks, or a divergence the sampled estimator cannot give without bias (only forward KL)."""
    have_topk, have_samples = cache_targets in ("topk", "topk+sampled"), cache_targets != "topk"
    want = loss_cfg.targets
    if want == "auto":
        want = "sampled" if have_samples else "topk"
    if loss_cfg.kind == "sft":
        return want
    if (want == "sampled" and not have_samples) or (want == "topk" and not have_topk):
        raise TrainingError(f"{where}.targets={loss_cfg.targets}: the cache holds {cache_targets} targets; "
                            f"use auto, or a cache built with teacher.targets={want} or topk+sampled")
    if want == "sampled":
        bad = ("divergence", loss_cfg.divergence) if loss_cfg.kind == "kd" else ("base", loss_cfg.base)
        if bad[1] != "forward_kl":
            raise TrainingError(
                f"{where}.{bad[0]}={bad[1]} on sampled teacher targets: only forward_kl has an unbiased "
                "estimate from teacher draws (docs/method.md); set it to forward_kl, or train on top-k "
                f"({where}.targets=topk with a topk or topk+sampled cache)")
    return want


def _add(stats: dict, key: str, value) -> None:
    value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
    stats[key] = stats[key] + value if key in stats else value


class StudentObjective(nn.Module):
    """The student plus its loss: forward(batch) -> (sum loss, stats) for one micro-batch.

    `stats` holds detached sums over the micro-batch: loss, nll (student -log q_g),
    num_positions; for atkd also tkd_hard (TKD over hard positions), dkd (over all),
    num_hard, num_easy, num_groups and unc (teacher 1 - p_g).

    `batch` is `storage.dataset.collate_sequences` output (or, for sft,
    `stages.training.rows_dataset.collate_examples`: no teacher arrays). The loss is a sum
    over positions (sft, kd) or over groups (atkd); `normaliser(batch)` gives
    the matching count, which the trainer adds up over the global batch.
    """

    def __init__(self, model: nn.Module, loss_cfg: LossConfig, cache_targets: str = "topk") -> None:
        super().__init__()
        if loss_cfg.kind not in ("sft", "kd", "atkd"):
            raise ValueError(f"loss.kind: unknown {loss_cfg.kind!r}; expected sft, kd or atkd")
        self.model = model
        self.cfg = loss_cfg
        self.targets = resolve_targets(loss_cfg, cache_targets)  # "topk" | "sampled"
        config = getattr(model, "config", None)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.logit_scale = getattr(config, "logit_scale", None) if config is not None and \
            getattr(config, "model_type", "") in ("cohere", "cohere2") else None

    def group_ids(self, batch: dict) -> Tensor | None:
        return batch["group_ids"] if self.cfg.group == "sequence" else None

    @torch.no_grad()
    def normaliser(self, batch: dict) -> int:
        """Positions (sft, kd) or non-empty groups (atkd) this micro-batch contributes."""
        n = int(batch["target_ids"].shape[0])
        if self.cfg.kind != "atkd":
            return n
        if n == 0:
            return 0
        return int(torch.unique(batch["group_ids"]).numel()) if self.cfg.group == "sequence" else 1

    def forward(self, batch: dict) -> tuple[Tensor, dict]:
        rows = hidden_at_targets(self.model, batch["input_ids"], batch["attention_mask"], batch["row_batch"],
                                 batch["row_pos"])  # [P, H]: only trained targets
        if self.logit_scale:
            rows = rows * self.logit_scale
        stats: dict = {}
        chunk_loss = self._chunk_loss(batch, stats)
        total = chunked_head_loss(rows, self.model.get_output_embeddings(), chunk_loss,
                                  self.cfg.chunk_size, softcap=self.softcap, stats=stats)
        _add(stats, "loss", total)
        _add(stats, "num_positions", rows.shape[0])
        return total, stats

    def _chunk_loss(self, batch: dict, stats: dict) -> ChunkLoss:
        cfg = self.cfg
        target_ids = batch["target_ids"]
        if cfg.kind == "sft":  # needs no teacher arrays: batches from the rows have none
            def sft(logits: Tensor, part: slice, stats: dict) -> Tensor:
                nll = F.cross_entropy(logits.float(), target_ids[part], reduction="sum")
                _add(stats, "nll", nll)
                return nll
            return sft

        teacher = (batch["topk_ids"], batch["topk_logprobs"], target_ids, batch["target_logprobs"])
        valid = torch.ones_like(target_ids, dtype=torch.bool)

        sampled = None
        if self.targets == "sampled":
            sampled = (batch["sample_ids"], batch["sample_counts"], target_ids, batch["target_logprobs"])

        if cfg.kind == "kd" and sampled is not None:
            def sampled_kd(logits: Tensor, part: slice, stats: dict) -> Tensor:
                terms = sampled_position_terms(logits, *(t[part] for t in sampled), valid=valid[part])
                _add(stats, "nll", terms.nll.sum())
                per_position = terms.kl + cfg.ce_weight * terms.nll if cfg.ce_weight else terms.kl
                return per_position.sum()
            return sampled_kd

        if cfg.kind == "kd":
            def kd(logits: Tensor, part: slice, stats: dict) -> Tensor:
                buckets = bucket_logprobs(logits, *(t[part] for t in teacher), cfg.renormalize_topk, valid[part])
                per_position = bucket_divergence(buckets, cfg.divergence, beta=cfg.beta, alpha=cfg.alpha)
                _add(stats, "nll", buckets.nll.sum())
                if cfg.ce_weight:
                    per_position = per_position + cfg.ce_weight * buckets.nll
                return per_position.sum()
            return kd

        weights = atkd_position_weights(batch["target_logprobs"], valid, self.group_ids(batch),
                                        easy_weight=cfg.easy_weight, hard_ratio=cfg.hard_ratio,
                                        ce_weight=cfg.ce_weight)
        for key in ("num_hard", "num_easy"):
            _add(stats, key, getattr(weights, key[4:]).sum())
        _add(stats, "num_groups", weights.num_groups)
        _add(stats, "unc", weights.unc.sum())

        def atkd(logits: Tensor, part: slice, stats: dict) -> Tensor:
            if sampled is not None:
                terms = sampled_position_terms(logits, *(t[part] for t in sampled), valid=valid[part],
                                               unbiased_dkd=cfg.unbiased_dkd)
            else:
                buckets = bucket_logprobs(logits, *(t[part] for t in teacher), cfg.renormalize_topk, valid[part])
                terms = position_terms(buckets, cfg.base)
            _add(stats, "nll", terms.nll.sum())
            _add(stats, "tkd_hard", (terms.tkd * weights.hard[part]).sum())
            _add(stats, "dkd", terms.dkd.sum())
            per_position = weights.tkd[part] * terms.tkd + weights.dkd[part] * terms.dkd
            if cfg.ce_weight:
                per_position = per_position + weights.ce[part] * terms.nll
            return per_position.sum()
        return atkd
