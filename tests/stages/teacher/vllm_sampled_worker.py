"""Runs the real vLLM engine with sampled targets for tests/stages/teacher/test_sampled_capture.py, in its
own process (vLLM pins this process's OpenMP threads, see vllm_worker.py):

    python -m tests.stages.teacher.vllm_sampled_worker <spec.json>

Starts the engine through make_engine (backend vllm, teacher.targets from the spec) and runs
run_capture into spec["cache"]["path"]; what it chose goes to spec["out"] as JSON.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    os.environ.setdefault("ATKD_VLLM_IN_PROCESS", "1")
    from pipeline.config import CacheConfig, DataConfig, TeacherConfig
    from stages.teacher.capture import run_capture
    from stages.teacher.engines import make_engine

    data_cfg, teacher_cfg = DataConfig(**spec["data"]), TeacherConfig(**spec["teacher"])
    engine = make_engine(teacher_cfg, max_seq_len=data_cfg.max_seq_len)
    try:
        summary = run_capture(data_cfg, teacher_cfg, CacheConfig(**spec["cache"]), progress=False, engine=engine)
    finally:
        engine.close()
    with open(spec["out"], "w") as f:
        json.dump({"engine": engine.name, "description": engine.description, **summary.as_dict()}, f)


if __name__ == "__main__":
    main()
