"""Hidden states at the target positions -> cached rows: one code path for both engines.

The transformers engine (its base model's output) and vLLM's hidden-state route
(the final hidden states vLLM returns) both hand `rows_from_hidden` the [P, H]
hidden states of their targets; it applies the output head (output_head.py)
`chunk` rows at a time, takes log-softmax in float32 and, from those same
log-probs, the top-k ids and log-probs, the gold token's log-prob and (with a
``sampling.Sampler``) the seeded draws. So both engines store the same numbers
wherever their float32 hidden states agree, and the largest temporary is
[chunk, V] (float32 log-probs, plus the sampler's float64 CDF of
`sampling.draw`'s sub-rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TeacherRows:
    """Teacher data for one sequence's trained targets, in target_positions order."""

    topk_ids: np.ndarray  # int32 [p, k], descending log-prob
    topk_logprobs: np.ndarray  # float32 [p, k]
    target_logprobs: np.ndarray  # float32 [p]
    # sampled targets only (stages/teacher/sampling.py encode): distinct ids ascending, -1 padding
    sample_ids: np.ndarray | None = None  # int32 [p, n]
    sample_counts: np.ndarray | None = None  # uint8 [p, n], 0 = padding


def rows_from_hidden(hidden, gold, where: np.ndarray, head, top_k: int, sampler=None, chunk: int = 2048):
    """hidden [P, H] (torch, on the head's device), gold [P] ids, where [P, 2] = each row's
    (example id, target position) -> (topk ids int32 [P, k], top-k log-probs float32 [P, k],
    gold log-probs float32 [P], (sample ids, sample counts) [P, n] or None)."""
    import torch

    ids, lps, golds, s_ids, s_counts = [], [], [], [], []
    gold = gold.to(hidden.device)
    for a in range(0, hidden.shape[0], chunk):
        b = a + chunk
        lp = head(hidden[a:b]).float().log_softmax(dim=-1)
        values, indices = torch.topk(lp, top_k, dim=-1, sorted=True)
        golds.append(lp.gather(-1, gold[a:b, None])[:, 0].cpu())
        ids.append(indices.to(torch.int32).cpu())
        lps.append(values.cpu())
        if sampler is not None:
            chunk_ids, chunk_counts = sampler(lp, where[a:b, 0], where[a:b, 1])
            s_ids.append(chunk_ids)
            s_counts.append(chunk_counts)
        del lp
    samples = None
    if sampler is not None:
        n = sampler.n
        samples = (np.concatenate(s_ids) if s_ids else np.zeros((0, n), np.int32),
                   np.concatenate(s_counts) if s_counts else np.zeros((0, n), np.uint8))
    if not ids:
        return np.zeros((0, top_k), np.int32), np.zeros((0, top_k), np.float32), np.zeros((0,), np.float32), samples
    return torch.cat(ids).numpy(), torch.cat(lps).numpy(), torch.cat(golds).numpy(), samples


def split_rows(counts: list[int], scored) -> list[TeacherRows]:
    """`rows_from_hidden`'s arrays cut into one TeacherRows per example (`counts` targets each)."""
    ids, lps, golds, samples = scored
    out, start = [], 0
    for p in counts:
        end = start + p
        out.append(TeacherRows(topk_ids=ids[start:end], topk_logprobs=lps[start:end], target_logprobs=golds[start:end],
                               sample_ids=None if samples is None else samples[0][start:end],
                               sample_counts=None if samples is None else samples[1][start:end]))
        start = end
    return out


def example_targets(ex) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One example's target positions t [p], gold next-token ids input_ids[t + 1] [p] and the
    draws' seed coordinates (example id, t) [p, 2], all int64."""
    t = np.asarray(ex.target_positions, dtype=np.int64)
    gold = np.asarray(ex.input_ids, dtype=np.int64)[t + 1]
    return t, gold, np.stack([np.full(len(t), ex.example_id, dtype=np.int64), t], 1)
