"""Per-position KL from the exact top-k-implied teacher target to a decoded (lossy) one.

The target is what the losses train on (docs/method.md, "A sparse teacher: the
residual bucket"): buckets [gold, top-k slots without g, residual], built by
`stages.buckets.bucket_present` and `teacher_bucket_logprobs` (clamp,
residual floor, renormalisation), here in float64. Rows are matched by id, so
a decoding that reorders equal entries compares correctly; both sides must
hold the same id set per row (ids are lossless in every encoding).
"""

from __future__ import annotations

import numpy as np
import torch

from stages.buckets import bucket_present, teacher_bucket_logprobs


def _by_id(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(ids, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(logprobs.astype(np.float64), order, 1)


def target_kl(exact_ids: np.ndarray, exact_lp: np.ndarray, decoded_ids: np.ndarray, decoded_lp: np.ndarray,
              gold: np.ndarray, gold_lp: np.ndarray, vocab: int, batch: int = 65536) -> np.ndarray:
    """KL(exact target || decoded target) per position [P], float64 nats."""
    ids_a, lp_a = _by_id(exact_ids, exact_lp)
    ids_b, lp_b = _by_id(decoded_ids, decoded_lp)
    if not np.array_equal(ids_a, ids_b):
        raise ValueError("the decoded top-k ids differ from the exact ones")
    out = []
    for lo in range(0, len(ids_a), batch):
        sl = slice(lo, lo + batch)
        ids, g = torch.from_numpy(ids_a[sl].astype(np.int64)), torch.from_numpy(gold[sl].astype(np.int64))
        g_lp = torch.from_numpy(gold_lp[sl].astype(np.float64))
        present, _ = bucket_present(ids, g, vocab)
        p = teacher_bucket_logprobs(g_lp, torch.from_numpy(lp_a[sl]), present)
        q = teacher_bucket_logprobs(g_lp, torch.from_numpy(lp_b[sl]), present)
        terms = torch.where(present, p.exp() * (p - q), torch.zeros((), dtype=torch.float64))
        out.append(terms.sum(1).numpy())
    return np.concatenate(out) if out else np.zeros(0)
