"""Runs the real vLLM engine for tests/stages/teacher/test_vllm_engine.py, in its own process.

    python -m tests.stages.teacher.vllm_worker <spec.json>

In a separate process because vLLM (in-process mode, which saves two process
start-ups) pins this process's OpenMP threads; the pytest process stays clean.
Steps, all on one engine started through make_engine (backend from the spec):
1. run_capture into spec["cache"]["path"];
2. score the examples again with the flat result path and with the dict path;
3. score with temperature 2.0 in the sampling params (prompt log-probs must not change);
4. ask unsupported_reason about a model with an unknown architecture.
Results go to spec["out"] (npz) and spec["out"] + ".json".
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    os.environ.setdefault("ATKD_VLLM_IN_PROCESS", "1")
    import numpy as np
    from vllm import SamplingParams

    from pipeline.config import CacheConfig, DataConfig, TeacherConfig
    from stages.data import load_examples
    from stages.teacher.capture import run_capture
    from stages.teacher.identity import load_tokenizer
    from stages.teacher.engine_vllm import unsupported_reason
    from stages.teacher.engines import make_engine

    data_cfg, teacher_cfg = DataConfig(**spec["data"]), TeacherConfig(**spec["teacher"])
    t0 = time.perf_counter()
    engine = make_engine(teacher_cfg, max_seq_len=data_cfg.max_seq_len)
    startup = time.perf_counter() - t0
    info = {"engine": engine.name, "description": engine.description, "reason": engine.choice_reason,
            "startup_s": startup}
    try:
        summary = run_capture(data_cfg, teacher_cfg, CacheConfig(**spec["cache"]), progress=False, engine=engine)
        info["capture"] = summary.as_dict()
        examples, _ = load_examples(data_cfg, load_tokenizer(teacher_cfg.model))
        k = teacher_cfg.top_k
        t0 = time.perf_counter()
        flat = engine.score(examples, k)
        info["score_s"] = time.perf_counter() - t0
        engine._flat = False
        engine._sampling = engine._sampling_params(k)  # list-of-dicts results
        t0 = time.perf_counter()
        dicts = engine.score(examples, k)
        info["score_dict_s"] = time.perf_counter() - t0
        engine._flat = True
        engine._sampling = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, temperature=2.0,
                                          flat_logprobs=True)
        hot = engine.score(examples, k)
    finally:
        engine.close()
    arrays = {}
    for name, rows in (("flat", flat), ("dict", dicts), ("hot", hot)):
        arrays[f"{name}_ids"] = np.concatenate([r.topk_ids for r in rows])
        arrays[f"{name}_lp"] = np.concatenate([r.topk_logprobs for r in rows])
        arrays[f"{name}_gold"] = np.concatenate([r.target_logprobs for r in rows])
    np.savez(spec["out"], **arrays)
    info["unsupported"] = unsupported_reason(spec["fake_model"])
    with open(spec["out"] + ".json", "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main()
