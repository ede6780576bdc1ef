"""TeacherConfig and CacheConfig: the `teacher:` and `cache:` sections of pipeline.yaml (stage one).

Loaded by pipeline/config.py, which calls their `check()`; rules that join sections stay there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import os
import re
from typing import Any, Literal, Union

from stages.errors import ConfigError
from stages.training.config import OptimConfig


@dataclass
class FinetuneConfig:
    """`teacher.finetune`: plain SFT of teacher.model on the training rows before stage one
    caches it (stages/teacher/finetune.py); trained like a student (the training kit's
    OptimConfig, checkpoints and loop)."""

    enabled: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on GPU
    gradient_checkpointing: bool = False
    fsdp: bool = False  # shard the teacher over the GPUs of `torchrun -m pipeline finetune` (as a student's fsdp)
    chunk_size: int = 256  # positions per LM-head chunk (loss.chunk_size of a student)
    checkpoint_every: int = 50
    keep_checkpoints: int = 2

    def check(self) -> None:
        if not self.enabled:
            return
        self.optim.check("teacher.finetune.optim")
        if self.chunk_size <= 0 or self.checkpoint_every <= 0:
            raise ConfigError("teacher.finetune: chunk_size and checkpoint_every must be > 0")


@dataclass
class TeacherConfig:
    model: str = ""  # path or hub name of the teacher
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    # How vLLM hands back the numbers: "hidden" = final hidden states as tensors, head applied by
    # atkd (exact per architecture, stages/teacher/output_head.py); "logprobs" = vLLM's prompt
    # log-probs as python results; "auto" = hidden where the head is reproduced, else logprobs.
    vllm_route: Literal["auto", "hidden", "logprobs"] = "auto"
    top_k: int = 64
    # What the cache holds per target position: the top-k, n draws from the teacher's full
    # distribution (cache format v2, docs/cache-format.md), or both. The gold log-prob always.
    targets: Literal["topk", "sampled", "topk+sampled"] = "topk"
    samples: int = 16  # draws per position for sampled targets (1..255)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"  # transformers engine: auto | cpu | cuda | cuda:N
    batch_tokens: int = 16384  # transformers engine: tokens per forward pass; vLLM hidden route: per encode call
    logprob_chunk: int = 2048  # transformers engine and vLLM hidden route: positions per log-softmax chunk
    tensor_parallel_size: int = 1  # vLLM
    pipeline_parallel_size: int = 1  # vLLM
    gpu_memory_utilization: float = 0.85  # vLLM; on CPU: fraction of RAM for KV cache
    max_num_seqs: int = 256  # vLLM scheduler batch size
    enforce_eager: bool = False  # vLLM: skip CUDA graph capture
    trust_remote_code: bool = False
    # Worker processes `atkd teacher` starts on this node, each on its own GPUs; "auto": one
    # per group of tensor_parallel_size x pipeline_parallel_size visible GPUs.
    num_workers: Union[int, Literal["auto"]] = 1
    worker_id: str = ""  # default: host-pid
    max_restarts: int = 3  # `atkd teacher --ray`: times Ray restarts a dead worker actor before the command fails
    lease_seconds: float = 120.0  # a dead worker's shard is taken over after this (renewed every 1/4)
    # Build and write shard i on a background thread while shard i+1 is scored. auto: when the
    # engine computes on a GPU (on CPU the writer would compete with the engine's threads).
    overlap_writes: Union[bool, Literal["auto"]] = "auto"
    # Fine-tune teacher.model on the training rows first; stage one then caches the fine-tuned model.
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def check(self) -> None:
        """This section's own rules (whether a teacher is needed at all is pipeline/config.py's: it
        depends on the students)."""
        if self.top_k <= 0:
            raise ConfigError(f"teacher.top_k: must be > 0, got {self.top_k}")
        if self.targets != "topk":
            from stages.teacher.sampling import MAX_SAMPLES

            if not 1 <= self.samples <= MAX_SAMPLES:
                raise ConfigError(f"teacher.samples: must be in [1, {MAX_SAMPLES}], got {self.samples}")
        self.check_vllm_route()
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"teacher.device: expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        self.finetune.check()

    def check_vllm_route(self) -> None:
        """vllm_route=hidden needs vLLM and, for a teacher already on disk, a head atkd reproduces
        (a teacher built later, by the demo or the fine-tune, is checked when its engine starts)."""
        if self.vllm_route != "hidden":
            return
        if self.backend == "transformers":
            raise ConfigError("teacher.vllm_route: hidden is a vLLM route, but teacher.backend is transformers; "
                              "set teacher.backend: vllm or auto, or leave vllm_route at auto")
        if self.model and os.path.isdir(os.path.expanduser(self.model)) and not self.finetune.enabled:
            from stages.teacher.output_head import unsupported_reason

            why = unsupported_reason(self.model)
            if why is not None:
                raise ConfigError(f"teacher.vllm_route: hidden cannot serve teacher.model {self.model!r}: {why}; "
                                  "set teacher.vllm_route: auto (falls back to logprobs) or logprobs")


@dataclass
class CacheConfig:
    path: str = ""  # local/NFS path or fsspec URL (s3://, memory://); default <run_dir>/cache
    sequences_per_shard: int = 1024
    # exact: float16 log-probs as computed (format v1). u8-rel: 8-bit codes on a grid of
    # logprob_step nats below each row's top-1 (|error| <= step, KL <= step^2/8; storage/encoding.py).
    logprob_encoding: Literal["exact", "u8-rel"] = "exact"
    logprob_step: float = 0.08  # u8-rel only
    # fsspec storage options for an object-store cache.path, e.g. {endpoint_url: ..., profile: ...} for s3fs.
    # Applied to every filesystem of that URL's protocol in the run; secret-looking values (key, secret,
    # token, ...) are redacted in the config a run saves. The usual AWS variables work without them.
    storage_options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.sequences_per_shard <= 0:
            raise ConfigError("cache.sequences_per_shard: must be > 0")
        if self.logprob_encoding == "u8-rel" and not 0.0 < self.logprob_step <= 1.0:
            raise ConfigError(f"cache.logprob_step: must be in (0, 1] nats, got {self.logprob_step}")
