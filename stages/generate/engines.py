"""Engines that sample responses: vLLM (production) and transformers (fallback), both seeded per request.

Each request carries its own seed; sample j of a request is drawn with seed + j. A request's
responses then depend on its prompt, its seed and the model only, not on which other requests
share its batch, their order or the shard it is in:
- vLLM: `SamplingParams(seed=...)` gives every request its own generator (vLLM 0.32 on CPU:
  identical token ids and log-probs across repeats, batch order and composition, engine
  batch sizes and prefix caching; `n` samples of seed s equal `n=1` with seeds s, s+1, ...).
- transformers: `generate` draws from one global generator, so a row's sample depends on its
  batch. Here every row gets its own `torch.Generator`: temperature and top-p are applied, then
  Gumbel noise from the row's generator is added and greedy decoding takes the argmax, which
  is an exact draw from the tempered, top-p-truncated distribution (the Gumbel-max trick).
  Left padding may still move a logit in the last bits, so bit-equality across batchings
  is vLLM's guarantee; within one shard plan both engines are deterministic.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from stages.errors import EngineError


@dataclass
class Request:
    prompt_ids: list[int]
    seed: int
    max_new_tokens: int


@dataclass
class Sample:
    token_ids: list[int]  # the response, EOS not included
    finished: bool  # True: ended with EOS; False: stopped at max_new_tokens


def _log(msg: str) -> None:
    print(f"[generate] {msg}", file=sys.stderr, flush=True)


def _strip_eos(ids: list[int], eos: int, limit: int) -> Sample:
    ids = list(ids)[:limit + 1]
    if eos in ids:
        return Sample(ids[: ids.index(eos)], True)
    return Sample(ids[:limit], False)


class VllmGenerator:
    name = "vllm"

    def __init__(self, model: str, *, eos: int, max_seq_len: int, trust_remote_code: bool = False, **settings):
        """`settings`: start_llm's (dtype, gpu_memory_utilization, max_num_seqs, parallelism; the teacher's)."""
        from stages.teacher.engine_vllm import start_llm

        self.eos = eos
        self.started = start_llm(model, trust_remote_code=trust_remote_code, max_seq_len=max_seq_len, **settings)
        self.description = self.started.description

    def generate(self, requests: list[Request], n: int, temperature: float, top_p: float) -> list[list[Sample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=r.max_new_tokens,
                                 seed=r.seed, stop_token_ids=[self.eos]) for r in requests]
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        outs = self.started.llm.generate(prompts, params, use_tqdm=False)
        return [[_strip_eos(c.token_ids, self.eos, r.max_new_tokens) for c in sorted(o.outputs, key=lambda c: c.index)]
                for r, o in zip(requests, outs)]

    def close(self) -> None:
        from stages.teacher.engine_vllm import close_llm

        close_llm(self.started.llm)
        self.started = None


class HfGenerator:
    name = "transformers"

    def __init__(self, model: str, *, eos: int, pad: int, dtype: str = "float32", device: str = "auto",
                 batch_size: int = 32, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForCausalLM

        torch_dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
                       "float16": torch.float16}[dtype]
        self.device = "cuda" if device == "auto" and torch.cuda.is_available() else \
            ("cpu" if device == "auto" else device)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype,
                                                          trust_remote_code=trust_remote_code).to(self.device).eval()
        self.eos, self.pad, self.batch_size = eos, pad, batch_size
        self.description = f"transformers on {self.device} ({str(torch_dtype).replace('torch.', '')})"

    def generate(self, requests: list[Request], n: int, temperature: float, top_p: float) -> list[list[Sample]]:
        flat = [(i, j) for i in range(len(requests)) for j in range(n)]
        out: list[list[Sample]] = [[None] * n for _ in requests]  # type: ignore[list-item]
        for start in range(0, len(flat), self.batch_size):
            part = flat[start: start + self.batch_size]
            samples = self._batch([requests[i] for i, _ in part], [requests[i].seed + j for i, j in part],
                                  temperature, top_p)
            for (i, j), s in zip(part, samples):
                out[i][j] = s
        return out

    def _batch(self, requests: list[Request], seeds: list[int], temperature: float, top_p: float) -> list[Sample]:
        import torch
        from transformers import LogitsProcessorList

        length = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), length), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, r in enumerate(requests):
            ids[b, length - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[b, length - len(r.prompt_ids):] = 1
        sampler = RowSeededSampler(seeds, temperature, top_p)
        with torch.no_grad():
            seqs = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                       do_sample=False, max_new_tokens=max(r.max_new_tokens for r in requests),
                                       eos_token_id=self.eos, pad_token_id=self.pad, use_cache=True,
                                       logits_processor=LogitsProcessorList([sampler]))
        return [_strip_eos(seqs[b, length:].tolist(), self.eos, r.max_new_tokens) for b, r in enumerate(requests)]

    def close(self) -> None:
        import gc

        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next stage's model gets the memory back


class RowSeededSampler:
    """A logits processor: temperature, top-p, then Gumbel(0, 1) noise from each row's own generator;
    the argmax of the result (greedy decoding) is a draw from the row's tempered, truncated distribution."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        import torch

        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            probs = scores.softmax(-1)
            sorted_probs, order = probs.sort(-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
            drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        noise = torch.stack([torch.empty(scores.shape[1]).exponential_(generator=g) for g in self.generators])
        return scores - noise.log().to(scores.device)


def resolve_backend(model: str, backend: str) -> tuple[str, str]:
    """(vllm | transformers, why): auto picks vLLM where it imports and has the model's architecture,
    else transformers. Resolved before anything is generated: the engine is part of the rows' identity."""
    if backend not in ("auto", "vllm", "transformers"):
        raise EngineError(f"generate.backend {backend!r}: expected auto, vllm or transformers")
    if backend == "transformers":
        return backend, "generate.backend=transformers"
    from stages.teacher.engine_vllm import unsupported_reason

    why_not = unsupported_reason(model)
    if why_not is None:
        return "vllm", f"generate.backend={backend}"
    if backend == "vllm":
        raise EngineError(f"generate.backend=vllm cannot serve {model!r}: {why_not}. Set generate.backend: "
                          "transformers (or auto, which falls back by itself)")
    return "transformers", f"generate.backend=auto, transformers because {why_not}"


def make_generator(model: str, backend: str, *, eos: int, pad: int, max_seq_len: int, batch_size: int = 32,
                   trust_remote_code: bool = False, vllm_settings: dict | None = None):
    """Start the engine of a resolved `backend` (resolve_backend)."""
    if backend == "transformers":
        return HfGenerator(model, eos=eos, pad=pad, batch_size=batch_size, trust_remote_code=trust_remote_code)
    try:
        return VllmGenerator(model, eos=eos, max_seq_len=max_seq_len, trust_remote_code=trust_remote_code,
                             **(vllm_settings or {}))
    except Exception as e:  # vLLM's own start-up errors (memory, an unsupported head size on CPU, ...)
        first = (str(e).strip().splitlines() or [""])[0]
        raise EngineError(f"vLLM failed to start {model!r} for generation ({type(e).__name__}: {first}); these "
                          "rows are identified as vLLM's, so atkd does not switch engines by itself: set the "
                          "round's generate.backend: transformers (its rows are generated anew)") from e
