"""The transformers teacher engine: the reference, and the fallback when vLLM can't run.

Per batch: one forward pass of the base model (no LM head) over right-padded
sequences of similar length; then only the hidden states at the trained
positions go through the LM head, `logprob_chunk` rows at a time, with
log-softmax in float32. So neither [batch, seq, vocab] logits nor a
[tokens, vocab] float32 tensor ever exists; the largest temporary is
[logprob_chunk, vocab] float32.

A start-up self-check compares this path with the model's own full forward on
a short input, so models whose head does more than a linear projection
(logit soft-capping, scaling) are caught instead of silently mis-scored.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import numpy as np

from stages.errors import EngineError, ModelError, TeacherError


@dataclass
class TeacherRows:
    """Teacher data for one sequence's trained targets, in target_positions order."""

    topk_ids: np.ndarray  # int32 [p, k], descending log-prob
    topk_logprobs: np.ndarray  # float32 [p, k]
    target_logprobs: np.ndarray  # float32 [p]
    # sampled targets only (stages/teacher/sampling.py encode): distinct ids ascending, -1 padding
    sample_ids: np.ndarray | None = None  # int32 [p, n]
    sample_counts: np.ndarray | None = None  # uint8 [p, n], 0 = padding


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str):
    """'auto': bf16 on a GPU that supports it, float32 otherwise (CPU bf16 matmuls are slow)."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped by length (longest first) so batch * max_len <= batch_tokens.

    Deterministic in the lengths alone: the same examples always form the
    same batches, so a rerun of a shard reproduces it bit for bit.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]  # longest of the batch comes first
        if current and (len(current) + 1) * width > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class HFTeacherEngine:
    name = "transformers"

    def __init__(
        self,
        model_path: str,
        dtype: str = "auto",
        device: str = "auto",
        batch_tokens: int = 16384,
        logprob_chunk: int = 2048,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForCausalLM

        self.device = resolve_device(device)
        self.torch_dtype = resolve_dtype(dtype, self.device)
        self.batch_tokens = int(batch_tokens)
        self.logprob_chunk = int(logprob_chunk)
        t0 = time.perf_counter()
        try:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.torch_dtype,
                                                         trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:  # no weights file, an unknown architecture, ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ModelError(f"teacher.model {model_path!r}: cannot load the model ({type(e).__name__}: "
                             f"{first})") from e
        self.model = model.to(self.device)
        self.model.eval()
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.description = f"transformers on {self.device} ({str(self.torch_dtype).replace('torch.', '')})"
        self.startup_seconds = time.perf_counter() - t0
        self._check_head()

    # ------------------------------------------------------------ internals
    def _hidden(self, input_ids, attention_mask):
        """Last hidden states [B, L, H] of the base model (final norm applied)."""
        base = self.model.base_model
        return base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def _logprobs(self, hidden):
        """[n, H] hidden states -> [n, V] float32 log-probs (call on chunks only)."""
        head = self.model.get_output_embeddings()
        return head(hidden).float().log_softmax(dim=-1)

    def _check_head(self) -> None:
        import torch

        ids = torch.arange(1, 9, device=self.device).unsqueeze(0) % self.vocab_size
        with torch.inference_mode():
            full = self.model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)[0]
            ours = self._logprobs(self._hidden(ids, torch.ones_like(ids))[0])
        err = (full - ours).abs().max().item()
        tol = 1e-4 if self.torch_dtype == torch.float32 else 5e-2
        if err > tol:
            raise EngineError(
                f"{type(self.model).__name__}: the LM head is not a plain projection of the base model's "
                f"hidden states (max log-prob difference {err:.3g}); this engine does not support it"
            )

    # ------------------------------------------------------------ public
    def score(self, examples, top_k: int, sampler=None) -> list[TeacherRows]:
        """Teacher rows for each example (same order), at its target_positions; with a
        ``sampling.Sampler``, also its draws from each position's full distribution."""
        import torch

        if top_k > self.vocab_size:
            raise TeacherError(f"teacher.top_k={top_k} exceeds the teacher's vocabulary ({self.vocab_size})")
        results: list[TeacherRows | None] = [None] * len(examples)
        lengths = [len(ex.input_ids) for ex in examples]
        with torch.inference_mode():
            for batch in length_batches(lengths, self.batch_tokens):
                width = max(lengths[i] for i in batch)
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                rows, cols, gold, where = [], [], [], []
                for b, i in enumerate(batch):
                    ex = examples[i]
                    n = lengths[i]
                    ids[b, :n] = torch.as_tensor(ex.input_ids, dtype=torch.long)
                    mask[b, :n] = 1
                    t = torch.as_tensor(np.asarray(ex.target_positions, dtype=np.int64))
                    rows.append(torch.full_like(t, b))
                    cols.append(t)
                    gold.append(ids[b, t + 1])
                    where.append(np.stack([np.full(len(t), ex.example_id, dtype=np.int64), t.numpy()], 1))
                hidden = self._hidden(ids.to(self.device), mask.to(self.device))
                sel = hidden[torch.cat(rows).to(self.device), torch.cat(cols).to(self.device)]  # [P, H]
                del hidden
                where = np.concatenate(where) if where else np.zeros((0, 2), np.int64)
                out_ids, out_lp, out_gold, out_s = self._topk_chunks(sel, torch.cat(gold).to(self.device), top_k,
                                                                     sampler, where)
                start = 0
                for i in batch:
                    p = len(examples[i].target_positions)
                    results[i] = TeacherRows(
                        topk_ids=out_ids[start : start + p],
                        topk_logprobs=out_lp[start : start + p],
                        target_logprobs=out_gold[start : start + p],
                        sample_ids=None if out_s is None else out_s[0][start : start + p],
                        sample_counts=None if out_s is None else out_s[1][start : start + p],
                    )
                    start += p
        return results  # type: ignore[return-value]

    def _topk_chunks(self, hidden, gold, top_k: int, sampler=None, where=None):
        """Top-k, gold log-probs and (with a sampler) the draws, `logprob_chunk` rows at a time;
        `where` [P, 2] is each row's (example id, target position), the draws' seed."""
        import torch

        ids, lps, golds, s_ids, s_counts = [], [], [], [], []
        for a in range(0, hidden.shape[0], self.logprob_chunk):
            b = a + self.logprob_chunk
            lp = self._logprobs(hidden[a:b])
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
            return (np.zeros((0, top_k), np.int32), np.zeros((0, top_k), np.float32), np.zeros((0,), np.float32),
                    samples)
        return torch.cat(ids).numpy(), torch.cat(lps).numpy(), torch.cat(golds).numpy(), samples

    def forward_only(self, examples) -> int:
        """A bare forward pass (base model + LM head at every position); for the benchmark."""
        import torch

        lengths = [len(ex.input_ids) for ex in examples]
        n_tokens = 0
        with torch.inference_mode():
            for batch in length_batches(lengths, self.batch_tokens):
                width = max(lengths[i] for i in batch)
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for b, i in enumerate(batch):
                    ids[b, : lengths[i]] = torch.as_tensor(examples[i].input_ids)
                    mask[b, : lengths[i]] = 1
                self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
                n_tokens += sum(lengths[i] for i in batch)
        return n_tokens

    def close(self) -> None:
        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
