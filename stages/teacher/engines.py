"""Pick and start a teacher engine from the teacher config.

backend "auto": vLLM when it imports, knows the model's architecture and
starts; otherwise the transformers engine. The choice and the reason are
printed, and kept on the engine as `.choice_reason`.

Every engine has: `name`, `description`, `vocab_size`,
`score(examples, top_k) -> list[TeacherRows]`, `close()`. Sampled targets
(`teacher.targets` sampled or topk+sampled) use `score(..., sampler=)`: the
transformers engine draws from each chunk's full log-softmax; vLLM has to return
the whole vocabulary of every prompt position (exact, but slow: VLLM_SAMPLED_COST),
so "auto" picks the transformers engine for them and backend vllm says the cost.
"""

from __future__ import annotations

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


def make_vllm_engine(teacher_cfg: TeacherConfig, max_seq_len: int | None = None):
    from stages.teacher.engine_vllm import VLLMTeacherEngine

    return VLLMTeacherEngine(
        teacher_cfg.model,
        top_k=teacher_cfg.top_k,
        dtype=teacher_cfg.dtype,
        tensor_parallel_size=teacher_cfg.tensor_parallel_size,
        pipeline_parallel_size=teacher_cfg.pipeline_parallel_size,
        gpu_memory_utilization=teacher_cfg.gpu_memory_utilization,
        max_num_seqs=teacher_cfg.max_num_seqs,
        enforce_eager=teacher_cfg.enforce_eager,
        trust_remote_code=teacher_cfg.trust_remote_code,
        max_seq_len=max_seq_len,
        full_vocab=teacher_cfg.targets != "topk",
    )


def make_engine(teacher_cfg: TeacherConfig, max_seq_len: int | None = None):
    """Start the engine `teacher_cfg.backend` asks for (see module doc for "auto")."""
    backend = teacher_cfg.backend
    if backend == "transformers":
        engine, reason = make_hf_engine(teacher_cfg), "teacher.backend=transformers"
    elif backend == "auto" and teacher_cfg.targets != "topk":
        engine = make_hf_engine(teacher_cfg)
        reason = f"backend auto: transformers, because teacher.targets={teacher_cfg.targets} (vLLM: full rows only)"
    elif backend == "vllm":
        from stages.teacher.engine_vllm import VLLM_SAMPLED_COST, unsupported_reason

        if teacher_cfg.targets != "topk":
            _log(f"teacher.targets={teacher_cfg.targets} with backend vllm: {VLLM_SAMPLED_COST}")
        why_not = unsupported_reason(teacher_cfg.model)
        if why_not is not None:
            raise TeacherError(f"teacher.backend=vllm cannot serve teacher.model {teacher_cfg.model!r}: {why_not}. "
                               "Set teacher.backend=transformers (or auto, which falls back by itself)")
        try:
            engine, reason = make_vllm_engine(teacher_cfg, max_seq_len), "teacher.backend=vllm"
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
    return engine


def _auto(teacher_cfg: TeacherConfig, max_seq_len):
    from stages.teacher.engine_vllm import unsupported_reason

    why_not = unsupported_reason(teacher_cfg.model)
    if why_not is None:
        try:
            return make_vllm_engine(teacher_cfg, max_seq_len), "backend auto: vLLM imports and supports the model"
        except Exception as e:  # start-up failure of any kind: fall back, but say why
            why_not = f"vLLM failed to start: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    _log(f"not using vLLM: {why_not}")
    return make_hf_engine(teacher_cfg), f"backend auto: transformers, because {why_not}"
