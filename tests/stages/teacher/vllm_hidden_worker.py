"""Runs vLLM's hidden-state route for tests/stages/teacher/test_vllm_hidden.py, in its own process
(vLLM in-process mode pins this process's OpenMP threads, see vllm_worker.py):

    python -m tests.stages.teacher.vllm_hidden_worker <spec.json>

For each model of spec["models"], one engine after the other in this process, started
through make_engine with the spec's teacher settings (backend auto, sampled targets):
1. run_capture into <model's cache path>;
2. score the examples again: float32 top-k (k = top_k + 1, to see ties at the k-th) and gold rows;
3. the engine's name, route, description and reason.
Results go to <out>/<arch>.npz and <out>/<arch>.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    os.environ.setdefault("ATKD_VLLM_IN_PROCESS", "1")
    import numpy as np

    from pipeline.config import CacheConfig, DataConfig, TeacherConfig
    from stages.data import load_examples
    from stages.teacher.capture import run_capture
    from stages.teacher.engines import make_engine
    from stages.teacher.identity import load_tokenizer

    data_cfg = DataConfig(**spec["data"])
    for arch, entry in spec["models"].items():
        teacher_cfg = TeacherConfig(**{**spec["teacher"], "model": entry["model"]})
        t0 = time.perf_counter()
        engine = make_engine(teacher_cfg, max_seq_len=data_cfg.max_seq_len)
        info = {"engine": engine.name, "route": getattr(engine, "route", ""), "description": engine.description,
                "reason": engine.choice_reason, "startup_s": time.perf_counter() - t0}
        try:
            summary = run_capture(data_cfg, teacher_cfg, CacheConfig(path=entry["cache"], sequences_per_shard=8),
                                  progress=False, engine=engine)
            info["capture"] = summary.as_dict()
            examples, _ = load_examples(data_cfg, load_tokenizer(teacher_cfg.model))
            rows = engine.score(examples, teacher_cfg.top_k + 1)
        finally:
            engine.close()
        np.savez(os.path.join(spec["out"], f"{arch}.npz"),
                 ids=np.concatenate([r.topk_ids for r in rows]), lp=np.concatenate([r.topk_logprobs for r in rows]),
                 gold=np.concatenate([r.target_logprobs for r in rows]))
        with open(os.path.join(spec["out"], f"{arch}.json"), "w") as f:
            json.dump(info, f)
        print(f"{arch}: {dataclasses.asdict(summary)['shards_written']} shards, {info['description']}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
