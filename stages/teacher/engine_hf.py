"""The transformers teacher engine: the reference, and the fallback when vLLM can't run.

Per batch: one forward pass of the base model (no LM head) over right-padded
sequences of similar length; then only the hidden states at the trained
positions go through the output head and into cached rows, `logprob_chunk`
rows at a time (scoring.py, the code path vLLM's hidden-state route shares).
So neither [batch, seq, vocab] logits nor a [tokens, vocab] float32 tensor ever
exists; the largest temporary is [logprob_chunk, vocab] float32.

The head is output_head.OutputHead for the architectures it lists (Gemma-2's
soft-capping, Cohere's scale, ...), the model's own output layer otherwise. A
start-up self-check compares it with the model's own full forward on a short
input, so a head that does more than that is caught instead of silently mis-scored.
"""

from __future__ import annotations

import gc
import time
import numpy as np

from stages.errors import EngineError, ModelError, TeacherError
from stages.teacher.output_head import HEADS, OutputHead
from stages.teacher.scoring import TeacherRows, example_targets, rows_from_hidden, split_rows


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
        # The exact head where output_head.py knows the architecture; otherwise the model's own
        # output layer, which the self-check below must find equal to its full forward.
        known = type(self.model).__name__ in HEADS
        self.head = OutputHead.from_model(self.model) if known else self.model.get_output_embeddings()
        self.vocab_size = int(self.head.weight.shape[0])
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
        return self.head(hidden).float().log_softmax(dim=-1)

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
                f"{type(self.model).__name__}: the LM head is not what atkd applies to the base model's hidden "
                f"states (max log-prob difference {err:.3g}); this engine does not support it"
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
                    ids[b, :lengths[i]] = torch.as_tensor(ex.input_ids, dtype=torch.long)
                    mask[b, :lengths[i]] = 1
                    t, g, w = example_targets(ex)
                    rows.append(np.full(len(t), b))
                    cols.append(t)
                    gold.append(g)
                    where.append(w)
                hidden = self._hidden(ids.to(self.device), mask.to(self.device))
                sel = hidden[torch.as_tensor(np.concatenate(rows)).to(self.device),
                             torch.as_tensor(np.concatenate(cols)).to(self.device)]  # [P, H]
                del hidden
                scored = rows_from_hidden(sel, torch.as_tensor(np.concatenate(gold)), np.concatenate(where),
                                          self.head, top_k, sampler, self.logprob_chunk)
                for i, r in zip(batch, split_rows([len(examples[i].target_positions) for i in batch], scored)):
                    results[i] = r
        return results  # type: ignore[return-value]

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
