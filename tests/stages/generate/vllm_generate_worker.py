"""Runs the generation stage on the real vLLM engine for tests/stages/test_generate_vllm.py, in its own process.

    python -m tests.stages.generate.vllm_generate_worker <spec.json>

One engine (in-process vLLM, which pins this process's threads: hence a process of its own)
generates the same prompts twice, into spec["a"] with 4 prompts per shard and into spec["b"] with 7,
so the two runs batch every prompt with different neighbours. Facts go to spec["info"].
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    os.environ.setdefault("ATKD_VLLM_IN_PROCESS", "1")
    from stages.data_config import DataConfig
    from stages.rounds_config import GenerateConfig
    from stages.generate.engines import make_generator
    from stages.generate.generation import GenerationJob, run_generation
    from stages.teacher.identity import load_tokenizer

    tok = load_tokenizer(spec["model"])
    t0 = time.perf_counter()
    engine = make_generator(spec["model"], "vllm", eos=tok.eos_token_id, pad=tok.pad_token_id, max_seq_len=64)
    info = {"startup_seconds": time.perf_counter() - t0, "description": engine.description, "runs": {}}
    for name, per_shard in (("a", 4), ("b", 7)):
        data_cfg = DataConfig(path=spec["data"], max_seq_len=64)
        job = GenerationJob(model=spec["model"], source="teacher", data_cfg=data_cfg,
                            gen=GenerateConfig(n=2, temperature=1.0, top_p=0.9, max_new_tokens=12, backend="auto",
                                               rows_per_shard=per_shard), seed=11, out=spec[name])
        summary = run_generation(job, engine=engine)
        info["runs"][name] = {"shards": summary.shards_written, "generated": summary.generated,
                              "seconds": summary.generate_seconds, "new_tokens": summary.new_tokens}
    engine.close()
    with open(spec["info"], "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main()
