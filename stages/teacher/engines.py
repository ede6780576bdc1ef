"""Pick and start a teacher engine from the teacher config: one engine per worker.

backend "auto": vLLM when it imports, knows the model's architecture and
starts; otherwise the transformers engine. The choice and the reason are
printed, and kept on the engine as `.choice_reason`.

vLLM has two routes (`teacher.vllm_route`), and one of them starts:
- "hidden" (engine_vllm_hidden.py): vLLM's pooling runner returns final hidden
  states as tensors and atkd applies the output head (output_head.py) and turns
  the logits into rows with the transformers engine's code; top-k and sampled
  targets cost about the same.
- "logprobs" (engine_vllm.py): vLLM's prompt log-probs as python results; sampled
  targets need every position's whole vocabulary that way (exact, but slow:
  VLLM_SAMPLED_COST).
"auto" takes "hidden" when output_head reproduces the architecture's head from
the checkpoint and this vLLM has the pooling API, else "logprobs" with one log
line saying why; "hidden" where it cannot work is an error naming the reason.
With sampled targets, backend "auto" picks vLLM only on the hidden route.

Every engine has: `name`, `description`, `vocab_size`,
`score(examples, top_k, sampler=None) -> list[TeacherRows]`, `close()`; vLLM's also `route`.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from stages.errors import EngineError, TeacherError
from stages.teacher.config import TeacherConfig


def _log(msg: str) -> None:
    print(f"[teacher] {msg}", file=sys.stderr, flush=True)


def make_hf_engine(teacher_cfg: TeacherConfig):
    from stages.teacher.engine_hf import HFTeacherEngine

    return HFTeacherEngine(
        teacher_cfg.model,
        dtype=teacher_cfg.dtype,
        device=teacher_cfg.device,
        batch_tokens=teacher_cfg.batch_tokens,
        logprob_chunk=teacher_cfg.logprob_chunk,
        trust_remote_code=teacher_cfg.trust_remote_code,
    )


def make_vllm_engine(teacher_cfg: TeacherConfig, max_seq_len: int | None = None, route: str = "logprobs"):
    settings = dict(
        dtype=teacher_cfg.dtype,
        tensor_parallel_size=teacher_cfg.tensor_parallel_size,
        pipeline_parallel_size=teacher_cfg.pipeline_parallel_size,
        gpu_memory_utilization=teacher_cfg.gpu_memory_utilization,
        max_num_seqs=teacher_cfg.max_num_seqs,
        enforce_eager=teacher_cfg.enforce_eager,
        trust_remote_code=teacher_cfg.trust_remote_code,
        max_seq_len=max_seq_len,
    )
    if route == "hidden":
        from stages.teacher.engine_vllm_hidden import VLLMHiddenEngine

        return VLLMHiddenEngine(teacher_cfg.model, batch_tokens=teacher_cfg.batch_tokens,
                                logprob_chunk=teacher_cfg.logprob_chunk, **settings)
    from stages.teacher.engine_vllm import VLLMTeacherEngine

    return VLLMTeacherEngine(teacher_cfg.model, top_k=teacher_cfg.top_k, full_vocab=teacher_cfg.targets != "topk",
                             **settings)


def hidden_route_reason(teacher_cfg: TeacherConfig, *, check_vllm: bool = True) -> str | None:
    """Why vLLM's hidden-state route cannot serve teacher.model (None: it can). Without
    `check_vllm` (the dry run), vLLM is not imported and its pooling API not checked."""
    from stages.teacher.output_head import unsupported_reason

    why = unsupported_reason(teacher_cfg.model)
    if why is None and check_vllm:
        from stages.teacher.engine_vllm_hidden import pooling_unavailable_reason

        why = pooling_unavailable_reason(teacher_cfg.model)
    return why


def resolve_route(teacher_cfg: TeacherConfig) -> tuple[str, str]:
    """("hidden" | "logprobs", why) for a vLLM engine; TeacherError when vllm_route=hidden cannot work."""
    asked = teacher_cfg.vllm_route
    if asked == "logprobs":
        return "logprobs", "teacher.vllm_route=logprobs"
    if asked not in ("auto", "hidden"):
        raise TeacherError(f"teacher.vllm_route {asked!r}: expected auto, hidden or logprobs")
    why_not = hidden_route_reason(teacher_cfg)
    if why_not is None:
        return "hidden", f"vllm_route {asked}: hidden states as tensors, the head applied by atkd"
    if asked == "hidden":
        raise TeacherError(f"teacher.vllm_route=hidden cannot serve teacher.model {teacher_cfg.model!r}: "
                           f"{why_not}. Set teacher.vllm_route=auto (falls back to logprobs) or logprobs")
    _log(f"vLLM route: logprobs, because {why_not}")
    return "logprobs", f"vllm_route auto: logprobs, because {why_not}"


def make_engine(teacher_cfg: TeacherConfig, max_seq_len: int | None = None):
    """Start the engine `teacher_cfg.backend` asks for (see module doc for "auto")."""
    backend = teacher_cfg.backend
    if backend == "transformers":
        engine, reason = make_hf_engine(teacher_cfg), "teacher.backend=transformers"
    elif backend == "vllm":
        from stages.teacher.engine_vllm import VLLM_SAMPLED_COST, unsupported_reason

        why_not = unsupported_reason(teacher_cfg.model)
        if why_not is not None:
            raise TeacherError(f"teacher.backend=vllm cannot serve teacher.model {teacher_cfg.model!r}: {why_not}. "
                               "Set teacher.backend=transformers (or auto, which falls back by itself)")
        route, why = resolve_route(teacher_cfg)
        if teacher_cfg.targets != "topk" and route == "logprobs":
            _log(f"teacher.targets={teacher_cfg.targets} on vLLM's logprobs route: {VLLM_SAMPLED_COST}")
        try:
            engine, reason = make_vllm_engine(teacher_cfg, max_seq_len, route), f"teacher.backend=vllm, {why}"
        except Exception as e:  # vLLM's own start-up errors (memory, CUDA, config): say what and what to do
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise EngineError(f"vLLM failed to start teacher.model {teacher_cfg.model!r} ({type(e).__name__}: "
                              f"{first}). Its log is in <run_dir>/logs/teacher.log (-v shows it); lower "
                              "teacher.gpu_memory_utilization or max_num_seqs, or set teacher.backend=auto "
                              "(falls back to transformers) or transformers") from e
    elif backend == "auto":
        engine, reason = _auto(teacher_cfg, max_seq_len)
    else:
        raise TeacherError(f"teacher.backend {backend!r}: expected auto, vllm or transformers")
    engine.choice_reason = reason
    _log(f"engine: {engine.description} ({reason})")
    if getattr(engine, "memory_note", ""):
        _log(engine.memory_note)
    return engine


def _auto(teacher_cfg: TeacherConfig, max_seq_len):
    from stages.teacher.engine_vllm import unsupported_reason

    why_not = unsupported_reason(teacher_cfg.model)
    if why_not is None and teacher_cfg.targets != "topk":
        # Sampled targets: vLLM only on the hidden route; its logprobs route is slower than transformers.
        if teacher_cfg.vllm_route == "logprobs":
            why_not = f"teacher.targets={teacher_cfg.targets} with teacher.vllm_route=logprobs (full rows only)"
        elif (hidden_why := hidden_route_reason(teacher_cfg)) is not None:
            if teacher_cfg.vllm_route == "hidden":
                resolve_route(teacher_cfg)  # raises, naming the reason
            why_not = (f"teacher.targets={teacher_cfg.targets} needs vLLM's hidden-state route, which cannot "
                       f"serve this model: {hidden_why}")
    if why_not is None:
        route, why = resolve_route(teacher_cfg)
        try:
            return make_vllm_engine(teacher_cfg, max_seq_len, route), f"backend auto: vLLM, {why}"
        except Exception as e:  # start-up failure of any kind: fall back, but say why
            why_not = f"vLLM failed to start: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    _log(f"not using vLLM: {why_not}")
    return make_hf_engine(teacher_cfg), f"backend auto: transformers, because {why_not}"


def planned_engine(teacher_cfg: TeacherConfig) -> str:
    """What make_engine would start, told without importing vLLM or starting anything (--dry-run)."""
    if teacher_cfg.backend == "transformers":
        return "transformers (teacher.backend=transformers)"
    if importlib.util.find_spec("vllm") is None:
        return ("transformers (vLLM is not installed)" if teacher_cfg.backend == "auto"
                else "vLLM, which is not installed: stage one would fail")
    sampled = teacher_cfg.targets != "topk"
    if teacher_cfg.vllm_route != "logprobs" and not os.path.isdir(os.path.expanduser(teacher_cfg.model)):
        fallback = "transformers" if sampled and teacher_cfg.backend == "auto" else "its prompt log-probs route"
        return ("decided once teacher.model exists: vLLM's hidden-state route if its output head is reproduced "
                f"(and vLLM supports the architecture), else {fallback}")
    if teacher_cfg.vllm_route == "logprobs":
        if sampled and teacher_cfg.backend == "auto":
            return "transformers (sampled targets with teacher.vllm_route=logprobs)"
        return "vLLM, prompt log-probs route (teacher.vllm_route=logprobs)"
    why_not = hidden_route_reason(teacher_cfg, check_vllm=False)
    if why_not is None:
        return "vLLM, hidden-state route (the output head is reproduced) where vLLM supports the architecture"
    if teacher_cfg.vllm_route == "hidden":
        return f"vLLM hidden-state route, which cannot serve this model: stage one would fail ({why_not})"
    if sampled and teacher_cfg.backend == "auto":
        return f"transformers (sampled targets need vLLM's hidden-state route: {why_not})"
    return f"vLLM, prompt log-probs route (no hidden-state route: {why_not})"
