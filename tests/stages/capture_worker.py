"""A capture worker process for the kill/resume and concurrency tests.

`run(spec)` is the target of a process started from a "forkserver" context
that preloads this module (so each worker starts in well under a second
instead of re-importing torch and transformers). It runs
stages.teacher.capture.run_capture with the transformers engine; `delay`
seconds are added to each shard's scoring so a test can kill the process in
the middle of a run or overlap two workers. The summary is written as JSON to
spec["summary_path"].
"""

from __future__ import annotations

import json
import time

# Imported here so the fork server holds them and each worker starts warm
# (transformers imports lazily: name the classes to load their modules).
import datasets  # noqa: F401
import torch  # noqa: F401
import zarr  # noqa: F401
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401

import storage.cache  # noqa: F401

from pipeline.config import CacheConfig, DataConfig, TeacherConfig
from stages.teacher import engine_hf
from stages.teacher.capture import run_capture

_score = engine_hf.HFTeacherEngine.score


def run(spec: dict) -> None:
    torch.set_num_threads(1)  # as the in-process references (test_teacher.one_thread)
    delay = float(spec.get("delay", 0.0))

    def slow_score(self, examples, top_k):
        time.sleep(delay)
        return _score(self, examples, top_k)

    engine_hf.HFTeacherEngine.score = slow_score
    summary = run_capture(
        DataConfig(**spec["data"]), TeacherConfig(**spec["teacher"]), CacheConfig(**spec["cache"]), progress=False
    )
    with open(spec["summary_path"], "w") as f:
        json.dump(summary.as_dict(), f)
