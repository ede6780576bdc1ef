"""The vLLM teacher engine's shared start-up, and its prompt log-probs route (teacher.vllm_route: logprobs).

`start_llm`, `check_lengths` and `close_llm` serve both routes; the hidden-state
route is engine_vllm_hidden.py. This route reads vLLM's own prompt log-probs:

What this vLLM returns (checked in vllm 0.32.0, V1 model runner, which is what
runs on CPU and wherever Triton is missing; the V2 runner computes the same):
- `v1/worker/gpu_model_runner.py::_get_prompt_logprobs_dict`: logits =
  `model.compute_logits(hidden)` (the model's own head: soft-capping/scaling
  included), then with the default `logprobs_mode="raw_logprobs"`
  `Sampler.compute_logprobs` = `logits.log_softmax(-1, dtype=float32)`
  (`v1/sample/sampler.py`); prompt rows skip every sampling processor, so no
  temperature, penalty or top-k/p touches them (config/model.py notes that raw_*
  and processed_* are identical for prompt log-probs).
- `Sampler.gather_logprobs` returns per row [gold, top_1 .. top_k] (torch.topk,
  descending) and the gold's rank; prompt row i scores token i+1, and the
  request's list starts with None for token 0 (`logprobs.create_prompt_logprobs`).
- With `flat_logprobs=True` the result is a `FlatLogprobs`: flat python lists
  plus start/end indices per position, entries in exactly that order (gold
  first, duplicates kept), so rows are sliced with numpy instead of walking one
  dict of `Logprob` objects per position. Older vLLMs without it get the dict
  path, which reads the same numbers.
- `prompt_logprob_start` only works together with `prompt_logprob_token_ids`
  (fixed ids per row, V2 runner only), so it cannot skip prompt rows of a top-k
  request; every prompt row is scored and the non-target rows are dropped here.
"""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.errors import TeacherError
from stages.logs import engine_output
from stages import reaper
from stages.teacher.scoring import TeacherRows

# Sampled targets on this route (docs/cache-format.md, "Sampled targets and vLLM"): prompt
# rows skip vLLM's sampler and logits processors, so the exact way is prompt_logprobs=-1
# with max_logprobs=-1: every prompt position's whole vocabulary, sorted, as python lists
# through the engine-core IPC; the full rows are rebuilt here and drawn from with the same
# sampler as the transformers engine. It costs ~V entries per prompt position (not just per
# target), so it is far slower than top-k; the hidden-state route (engine_vllm_hidden.py) is not.
VLLM_SAMPLED_COST = ("vLLM returns prompt positions' full vocabulary only as python lists (prompt_logprobs=-1): "
                     "exact, but ~V python entries per position, far slower than top-k; the hidden-state route "
                     "(teacher.vllm_route: hidden) draws from tensors instead where it can serve the model")

# Prompt tokens per `LLM.generate` call: bounds the python-side result lists.
_REQUEST_TOKENS = 1 << 16
# Full-vocabulary requests (sampled targets): at most this many (position, id) entries per call.
_FULL_VOCAB_ENTRIES = 1 << 23


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a dependency
        return False


def model_architectures(model_path: str) -> list[str]:
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return []
    return list(json.loads(config.read_text()).get("architectures") or [])


def model_max_positions(model_path: str) -> int | None:
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return None
    raw = json.loads(config.read_text())
    raw = raw.get("text_config", raw)
    value = raw.get("max_position_embeddings")
    return int(value) if isinstance(value, int) else None


def _supports_flat_logprobs(sampling_params_cls) -> bool:
    try:
        sampling_params_cls(max_tokens=1, flat_logprobs=True)
    except TypeError:  # vLLM releases before flat_logprobs
        return False
    return True


def unsupported_reason(model_path: str) -> str | None:
    """Why vLLM can't serve this model (None: it can, as far as we can tell cheaply)."""
    try:
        from vllm import ModelRegistry
    except Exception as e:  # ImportError, or a broken install
        return f"vllm does not import ({type(e).__name__}: {e})"
    archs = model_architectures(model_path)
    supported = set(ModelRegistry.get_supported_archs())
    if archs and not any(a in supported for a in archs):
        return f"vLLM has no implementation of {', '.join(archs)}"
    return None


@dataclass
class StartedLLM:
    """vLLM's `LLM`, started by `start_llm` for one route, and what the engines report about it."""

    llm: object
    description: str  # device, dtype, parallelism, in-process, CPU adjustments
    device: str  # cuda / cpu
    dtype: str  # what vLLM runs the model in
    startup_seconds: float
    max_model_len: int


def start_llm(model_path: str, *, dtype: str = "auto", tensor_parallel_size: int = 1,
              pipeline_parallel_size: int = 1, gpu_memory_utilization: float = 0.85, max_num_seqs: int = 256,
              enforce_eager: bool = False, trust_remote_code: bool = False, max_seq_len: int | None = None,
              in_process: bool | None = None, **route_kwargs) -> StartedLLM:
    """Start vLLM for either route (`route_kwargs`: the route's own LLM arguments).

    `in_process` (default: env ATKD_VLLM_IN_PROCESS=1) runs vLLM's engine core and
    worker inside this process (tp = pp = 1 only): two fewer process start-ups
    (~45 s on a 2-core CPU box), but vLLM then pins this process's OpenMP
    threads and patches torch.set_num_threads, so use it only in a process that
    does nothing else (a dedicated worker, the benchmark, the tests' scorer)."""
    from vllm import LLM

    on_gpu = cuda_available()
    notes = []
    if not on_gpu:
        # CPU vLLM: the memory fraction is of one NUMA node's RAM and the
        # default 0.85-0.92 fails at start-up; graph capture is GPU-only.
        if gpu_memory_utilization > 0.5:
            notes.append(f"gpu_memory_utilization {gpu_memory_utilization} -> 0.3 on CPU")
            gpu_memory_utilization = 0.3
        enforce_eager = True
        if dtype == "auto":
            dtype = "float32"  # as the transformers engine: CPU bf16 loses accuracy for little speed
    kwargs = dict(
        model=model_path,
        enable_prefix_caching=False,  # every prompt position must be computed, not read from a cache
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        dtype=dtype,
        enforce_eager=enforce_eager,
        max_num_seqs=max_num_seqs,
        trust_remote_code=trust_remote_code,
        **route_kwargs,
    )
    limit = model_max_positions(model_path)
    if max_seq_len is not None and (limit is None or max_seq_len + 1 <= limit):
        # +1: vLLM refuses a prompt as long as max_model_len (it must generate one token).
        kwargs["max_model_len"] = max_seq_len + 1
    if in_process is None:
        in_process = os.environ.get("ATKD_VLLM_IN_PROCESS") == "1"
    in_process = in_process and tensor_parallel_size == 1 and pipeline_parallel_size == 1
    if in_process:
        kwargs["distributed_executor_backend"] = "uni"
    t0 = time.perf_counter()
    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    # vLLM does not watch its parent: its engine core and workers (GBs of RAM, the GPU) must die
    # with this process even when it is SIGKILLed (stages/reaper.py). In-process vLLM starts none.
    guard = None if in_process else reaper.start()
    try:
        if in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        with engine_output():  # start-up chatter of vLLM and its engine processes -> the stage log
            llm = LLM(**kwargs)
        llm.atkd_reaper = guard
    except BaseException:
        if guard is not None:
            guard.stop()  # a failed start-up: whatever it left dies with this process
        raise
    finally:
        if in_process:
            if saved is None:
                os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
            else:
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved
    model_config = llm.llm_engine.model_config
    run_dtype = str(model_config.dtype).replace("torch.", "")
    device = "cuda" if on_gpu else "cpu"
    description = (f"vLLM on {device} ({run_dtype}, tp={tensor_parallel_size}, pp={pipeline_parallel_size}"
                   f"{', in-process' if in_process else ''})" + "".join("; " + n for n in notes))
    return StartedLLM(llm, description, device, run_dtype, time.perf_counter() - t0,
                      int(model_config.max_model_len))


def check_lengths(examples, max_model_len: int) -> None:
    for ex in examples:
        if len(ex.input_ids) >= max_model_len:
            raise TeacherError(
                f"example {ex.example_id}: {len(ex.input_ids)} tokens, vLLM max_model_len is "
                f"{max_model_len} (needs one more than the longest sequence)"
            )


def close_llm(llm) -> None:
    """Shut vLLM's engine core down (its processes end with it) and drop the LLM."""
    if llm is None:
        return
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    guard = getattr(llm, "atkd_reaper", None)
    if guard is not None:
        guard.cancel()
    del llm
    gc.collect()


class VLLMTeacherEngine:
    """The log-probs route: vLLM's own prompt log-probs, as python results (see module doc)."""

    name = "vllm"
    route = "logprobs"

    def __init__(self, model_path: str, *, top_k: int, flat_logprobs: bool = True, full_vocab: bool = False,
                 **settings):
        """`settings`: start_llm's. `full_vocab`: request every prompt position's whole
        vocabulary (sampled targets)."""
        from vllm import SamplingParams

        self.top_k = int(top_k)
        self.full_vocab = bool(full_vocab)
        self._flat = flat_logprobs and _supports_flat_logprobs(SamplingParams)
        if self.full_vocab and not self._flat:
            raise TeacherError("sampled targets through vLLM need its flat_logprobs results (vLLM >= 0.11)")
        started = start_llm(model_path, max_logprobs=-1 if self.full_vocab else self.top_k,
                            skip_tokenizer_init=True, **settings)  # we send token ids and read ids back
        self.llm = started.llm
        self.startup_seconds, self.max_model_len = started.startup_seconds, started.max_model_len
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        self.device = started.device
        self.description = started.description + ", prompt log-probs route"
        self._sampling = self._sampling_params(self.top_k)

    def _sampling_params(self, k: int):
        from vllm import SamplingParams

        kwargs = dict(max_tokens=1, prompt_logprobs=-1 if self.full_vocab else k, detokenize=False, temperature=0.0)
        if self._flat:
            kwargs["flat_logprobs"] = True
        return SamplingParams(**kwargs)

    def score(self, examples, top_k: int, sampler=None) -> list[TeacherRows]:
        """Top-k (and with a ``sampling.Sampler``, draws from the full rows) at each example's targets."""
        from vllm.inputs import TokensPrompt

        if sampler is not None and not self.full_vocab:
            raise ValueError("this vLLM engine was started without full_vocab; sampled targets need it")
        budget = _REQUEST_TOKENS if not self.full_vocab else max(1, _FULL_VOCAB_ENTRIES // (self.vocab_size + 1))
        if top_k > self.top_k:
            raise ValueError(f"this vLLM engine was started with max_logprobs={self.top_k}; asked for top_k={top_k}")
        sampling = self._sampling if top_k == self.top_k else self._sampling_params(top_k)
        check_lengths(examples, self.max_model_len)
        results: list[TeacherRows] = []
        start = 0
        while start < len(examples):
            end, tokens = start, 0
            while end < len(examples) and (end == start or tokens + len(examples[end].input_ids) <= budget):
                tokens += len(examples[end].input_ids)
                end += 1
            part = examples[start:end]
            prompts = [TokensPrompt(prompt_token_ids=list(map(int, ex.input_ids))) for ex in part]
            outputs = self.llm.generate(prompts, sampling, use_tqdm=False)
            for ex, out in zip(part, outputs):
                results.append(self._rows(ex, out.prompt_logprobs, top_k, sampler))
            start = end
        return results

    def _rows(self, ex, plp, k: int, sampler=None) -> TeacherRows:
        t = np.asarray(ex.target_positions, dtype=np.int64)
        if self._flat and hasattr(plp, "start_indices"):
            starts = np.asarray(plp.start_indices, dtype=np.int64)[t + 1]
            ends = np.asarray(plp.end_indices, dtype=np.int64)[t + 1]
            need = self.vocab_size if sampler is not None else k
            if np.any(ends - starts < need + 1):
                raise RuntimeError(f"example {ex.example_id}: vLLM returned fewer than {need} + 1 prompt log-probs")
            ids = np.asarray(plp.token_ids, dtype=np.int32)
            lps = np.asarray(plp.logprobs, dtype=np.float32)
            cols = starts[:, None] + 1 + np.arange(k)[None, :]  # entry 0 is the gold token
            rows = TeacherRows(topk_ids=ids[cols], topk_logprobs=lps[cols], target_logprobs=lps[starts])
            if sampler is not None:
                rows.sample_ids, rows.sample_counts = _draw_full_rows(ex, t, ids, lps, starts, self.vocab_size,
                                                                      sampler)
            return rows
        return _rows_from_dicts(ex, plp, k)

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        close_llm(llm)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _draw_full_rows(ex, t, ids, lps, starts, vocab: int, sampler, chunk: int = 256):
    """The target rows' full vocabularies (entries 1..V after each row's start: every id
    once, sorted by log-prob) back into dense [rows, V] float32, then the sampler's draws."""
    import torch

    out_ids, out_counts = [], []
    for a in range(0, len(t), chunk):
        cols = starts[a:a + chunk, None] + 1 + np.arange(vocab)[None, :]
        dense = np.full((len(cols), vocab), -np.inf, dtype=np.float32)
        np.put_along_axis(dense, ids[cols].astype(np.int64), lps[cols], axis=1)
        s_ids, s_counts = sampler(torch.from_numpy(dense), np.full(len(cols), ex.example_id, dtype=np.int64),
                                  t[a:a + chunk])
        out_ids.append(s_ids)
        out_counts.append(s_counts)
    if not out_ids:
        return np.zeros((0, sampler.n), np.int32), np.zeros((0, sampler.n), np.uint8)
    return np.concatenate(out_ids), np.concatenate(out_counts)


def _rows_from_dicts(ex, plp, k: int) -> TeacherRows:
    """The list-of-dicts form: {token_id: Logprob} per prompt position (None at 0)."""
    p = len(ex.target_positions)
    topk_ids = np.zeros((p, k), dtype=np.int32)
    topk_lp = np.zeros((p, k), dtype=np.float32)
    gold_lp = np.zeros((p,), dtype=np.float32)
    for row, t in enumerate(np.asarray(ex.target_positions, dtype=np.int64)):
        entries = plp[int(t) + 1]
        gold = int(ex.input_ids[t + 1])
        gold_lp[row] = entries[gold].logprob
        # The gold is an extra entry only when it is outside the top-k.
        items = [(tok, lp) for tok, lp in entries.items() if not (len(entries) > k and tok == gold)]
        items.sort(key=lambda kv: (-kv[1].logprob, kv[1].rank))
        if len(items) < k:
            raise RuntimeError(f"example {ex.example_id}: vLLM returned {len(items)} < {k} prompt log-probs")
        topk_ids[row] = [tok for tok, _ in items[:k]]
        topk_lp[row] = [lp.logprob for _, lp in items[:k]]
    return TeacherRows(topk_ids=topk_ids, topk_logprobs=topk_lp, target_logprobs=gold_lp)
