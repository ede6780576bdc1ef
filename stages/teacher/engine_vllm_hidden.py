"""vLLM's hidden-state route: vLLM computes the final hidden states, atkd applies the head.

vLLM 0.32's pooling runner hands back every prompt position's final hidden state
as one tensor per prompt (checked in its source):
- `LLM(model, runner="pooling", convert="embed", pooler_config=PoolerConfig(
  task="token_embed", pooling_type="ALL", use_activation=False))` wraps the
  causal LM in `model_executor/models/adapters.py::as_embedding_model`: the same
  model class, its `lm_head`/logits processor left unloaded, `forward` returning
  what the model's base returns (after the final norm; OPT's `project_out`
  included), which is transformers' `last_hidden_state`.
- `llm.encode(prompts, pooling_task="token_embed")`: `outputs.data` [T, H], in
  float32 (pooling models run their "head" in fp32: `ModelConfig.head_dtype`);
  `use_activation=False` skips the normalisation `token_embed` would apply.
- Chunked prefill works for causal models with ALL pooling
  (`ModelConfig.is_chunked_prefill_supported`); prefix caching stays off so
  every position is computed.
- The pooling path needs the tokenizer files in the model directory
  (`skip_tokenizer_init` is refused); stage one loads the teacher's tokenizer
  from there already. A sentence-transformers `modules.json` would add layers:
  output_head.unsupported_reason refuses such a directory.

The head (output_head.py, exact per architecture) runs on the first visible
GPU when there is one (else the CPU), and scoring.rows_from_hidden turns its
logits into the cached rows with the transformers engine's own code: top-k,
gold log-prob and the seeded draws of sampled targets from the same float32
log-probs. A shard is scored in pieces of at most `batch_tokens` tokens (one
longer sequence alone), so a worker holds at most one piece's hidden states
(batch_tokens x H float32) and one chunk's logits at a time.
"""

from __future__ import annotations

import numpy as np

from stages.errors import TeacherError
from stages.teacher.engine_vllm import check_lengths, close_llm, cuda_available, model_architectures, start_llm
from stages.teacher.output_head import OutputHead
from stages.teacher.scoring import TeacherRows, example_targets, rows_from_hidden, split_rows

_POOLER = dict(task="token_embed", pooling_type="ALL", use_activation=False)


def pooling_unavailable_reason(model_path: str) -> str | None:
    """Why this vLLM cannot hand back this model's hidden states (None: its pooling runner can)."""
    try:
        from vllm import LLM, ModelRegistry
        from vllm.config import PoolerConfig

        PoolerConfig(**_POOLER)
    except Exception as e:  # ImportError, or a PoolerConfig without these fields
        return f"this vLLM has no token_embed pooling ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if not hasattr(LLM, "encode"):
        return "this vLLM's LLM has no encode()"
    for arch in model_architectures(model_path):
        entry = getattr(ModelRegistry, "models", {}).get(arch)
        if entry is not None and str(getattr(entry, "module_name", "")).endswith(".transformers"):
            # vLLM 0.32-CPU: the pooling runner over its transformers backend fails at start-up
            # ("Current vLLM config is not set"), seen with GPTNeoX (Pythia).
            return (f"vLLM runs {arch} through its generic transformers backend, whose pooling runner does not "
                    "start (vLLM 0.32)")
    return None


def token_pieces(lengths: list[int], batch_tokens: int) -> list[range]:
    """Consecutive examples whose tokens add up to at most batch_tokens (a longer one alone)."""
    pieces, start, tokens = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and tokens + n > batch_tokens:
            pieces.append(range(start, i))
            start, tokens = i, 0
        tokens += n
    if start < len(lengths):
        pieces.append(range(start, len(lengths)))
    return pieces


class VLLMHiddenEngine:
    """The hidden-state route (module doc): same `score` contract as the other engines."""

    name = "vllm"
    route = "hidden"

    def __init__(self, model_path: str, *, batch_tokens: int = 16384, logprob_chunk: int = 2048, **settings):
        """`settings`: engine_vllm.start_llm's (dtype, parallelism, memory, in_process, ...)."""
        import torch
        from vllm.config import PoolerConfig

        started = start_llm(model_path, runner="pooling", convert="embed", pooler_config=PoolerConfig(**_POOLER),
                            **settings)
        self.llm = started.llm
        self.startup_seconds, self.max_model_len = started.startup_seconds, started.max_model_len
        self.batch_tokens, self.logprob_chunk = int(batch_tokens), int(logprob_chunk)
        self.head_device = "cuda:0" if cuda_available() else "cpu"
        self.head = OutputHead.load(model_path, device=self.head_device, dtype=getattr(torch, started.dtype))
        self.vocab_size = int(self.head.weight.shape[0])
        self.device = started.device
        self.description = f"{started.description}, hidden-state route ({self.head.describe()})"
        self.memory_note = _memory_note(self.head, self.logprob_chunk, self.batch_tokens)

    def score(self, examples, top_k: int, sampler=None) -> list[TeacherRows]:
        """Top-k + gold log-prob (and, with a ``sampling.Sampler``, the draws) at each example's targets."""
        if top_k > self.vocab_size:
            raise TeacherError(f"teacher.top_k={top_k} exceeds the teacher's vocabulary ({self.vocab_size})")
        check_lengths(examples, self.max_model_len)
        results: list[TeacherRows] = []
        for piece in token_pieces([len(ex.input_ids) for ex in examples], self.batch_tokens):
            part = [examples[i] for i in piece]
            results += self._score_piece(part, top_k, sampler)
        return results

    def _score_piece(self, part, top_k: int, sampler) -> list[TeacherRows]:
        import torch

        hidden, gold, where = [], [], []
        for ex, h in zip(part, self.hidden_states(part)):
            if h.shape != (len(ex.input_ids), self.head.weight.shape[1]):
                raise TeacherError(f"example {ex.example_id}: vLLM returned hidden states {tuple(h.shape)}, the "
                                   f"output head expects ({len(ex.input_ids)}, {self.head.weight.shape[1]})")
            t, g, w = example_targets(ex)
            hidden.append(h[torch.from_numpy(t)])
            gold.append(g)
            where.append(w)
        with torch.inference_mode():
            sel = torch.cat(hidden).to(self.head_device)
            scored = rows_from_hidden(sel, torch.from_numpy(np.concatenate(gold)), np.concatenate(where), self.head,
                                      top_k, sampler, self.logprob_chunk)
        return split_rows([len(ex.target_positions) for ex in part], scored)

    def hidden_states(self, examples) -> list:
        """vLLM's final hidden states [T, H] of each example (one `encode` call: the caller sizes it)."""
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(map(int, ex.input_ids))) for ex in examples]
        outputs = self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
        return [out.outputs.data for out in outputs]

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        self.head = None
        close_llm(llm)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _memory_note(head: OutputHead, chunk: int, batch_tokens: int) -> str:
    """What the head adds beside vLLM's own memory, on the head's device (bounds, not measurements)."""
    vocab, width = head.weight.shape
    logits = chunk * vocab * (head.weight.element_size() + 8)  # the head's output + float32 log-probs (+ topk)
    sampler = 256 * vocab * 16  # sampling.draw: float64 exp and cumsum of 256 rows
    hidden = batch_tokens * width * 4  # one piece's float32 hidden states (on the CPU, from vLLM)
    gib = 1 << 30
    return (f"output head on {head.weight.device}: {head.nbytes / gib:.2f} GiB of weights + up to "
            f"{(logits + sampler) / gib:.2f} GiB working memory per chunk of {chunk} positions; hidden states of "
            f"one piece of <= {batch_tokens} tokens: {hidden / gib:.2f} GiB")
