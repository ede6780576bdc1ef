"""Prepare the demo: generate the data, train the tokenizer, train the teacher.

    paths = prepare_demo(demo_cfg, run_dir, data_cfg)   # -> DemoPaths

Everything lands in the run directory (next to the pipeline's cache/,
students/, eval/ and report/):

    data/{train,validation,test}.jsonl     the students' splits (stage one caches train)
    data/teacher.jsonl                     the teacher's own pool (demo.teacher_train_examples > 0)
    data/done.json
    tokenizer/                             save_pretrained + done.json
    lm_eval/atkd_demo_mc.{yaml,jsonl}      an lm-eval multiple-choice task over the test split
                                           (stages.demo.lm_eval_task; rewritten when it changes)
    teacher/                               save_pretrained (model + tokenizer),
                                           demo_teacher.json (metrics), done.json
    teacher.work/checkpoints/step_NNNNNN/  resume point while the teacher trains

Each step is idempotent: a directory is built under a temporary name, its
`done.json` (the settings it was made with) written last, and then renamed into
place, so a finished step is reused and a killed one is redone (the teacher
resumes from its last checkpoint; its data order is a pure function of the
seed and the step). A finished step made with other settings is an error, not
silently replaced: the teacher cache and students downstream depend on it.

The teacher is a small LlamaConfig causal LM (head_dim 64, which vLLM's CPU
attention accepts) trained with cross-entropy on exactly the positions stage
one caches (the response tokens and EOS, from stages.data.tokenize_examples).
The training pieces are the training kit's (stages/training/, which the
student trainer uses too): its schedule and AdamW (stages.training.optim), its
atomic checkpoints (stages.training.checkpoint), and the target-only logits of
stages.lm; this module only says what the demo
trains, on which batches, and when it stops.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.data_config import DataConfig
from stages.demo import task as demo_task
from stages.demo.config import DemoConfig
from stages.demo.lm_eval_task import write_demo_mc_task
from stages.errors import DemoError
from stages.training.config import OptimConfig
from storage.errors import AtkdError
from storage.files import pid_alive, usual_permissions

DEFAULT_TEACHER = {  # LlamaConfig fields; DemoConfig.teacher overrides any of them
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
WARMUP_FRACTION = 0.05
MIN_LR_RATIO = 0.1
WEIGHT_DECAY = 0.01
BETAS = (0.9, 0.95)
CLIP_GRAD_NORM = 1.0
CHECK_EXAMPLES = 150  # validation examples generated after training (exact-match sanity check)


class DemoMismatchError(AtkdError, RuntimeError):
    """A finished demo step exists but was made with other settings."""


@dataclass
class DemoPaths:
    root: str
    data_dir: str
    train_path: str
    validation_path: str
    test_path: str
    tokenizer_dir: str
    teacher_dir: str
    teacher_metrics: dict[str, Any] = field(default_factory=dict)  # demo_teacher.json


# ---------------------------------------------------------------- step markers


def _read_done(path: Path) -> dict | None:
    marker = path / "done.json"
    return json.loads(marker.read_text()) if marker.is_file() else None


def _reuse(path: Path, settings: dict, what: str) -> bool:
    """True when `path` is finished with these settings; raise when with others."""
    done = _read_done(path)
    if done is None:
        if path.exists():  # not ours to finish (atomic renames never leave this): redo
            shutil.rmtree(path)
        return False
    if done.get("settings") != settings:
        diff = sorted(k for k in set(settings) | set(done.get("settings", {}))
                      if settings.get(k) != done.get("settings", {}).get(k))
        raise DemoMismatchError(
            f"{path} holds a demo {what} made with other settings (differs in: {', '.join(diff)}). "
            f"Delete {path} (and what was built from it: the run's data/tokenizer/teacher, cache and "
            f"students) or use another run_dir."
        )
    return True


def _finish(tmp: Path, final: Path, settings: dict, extra: dict | None = None) -> None:
    """Write done.json last, then rename into place. If another process finished
    the same step meanwhile (same settings), keep its copy and drop ours."""
    (tmp / "done.json").write_text(json.dumps({"settings": settings, **(extra or {})}, indent=1, sort_keys=True))
    usual_permissions(tmp)  # safetensors writes 0600
    try:
        os.replace(tmp, final)
    except OSError:
        if (_read_done(final) or {}).get("settings") != settings:
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _fresh_tmp(final: Path) -> Path:
    """An empty `<final>.tmp-<pid>`; leftovers of dead processes on this host are removed."""
    for old in final.parent.glob(f"{final.name}.tmp-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
            shutil.rmtree(old, ignore_errors=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    return tmp


# ---------------------------------------------------------------- steps


def _data_settings(demo_cfg: DemoConfig) -> dict:
    return {
        "generator_version": demo_task.GENERATOR_VERSION,
        "seed": demo_cfg.seed,
        "train_examples": demo_cfg.train_examples,
        "validation_examples": demo_cfg.validation_examples,
        "test_examples": demo_cfg.test_examples,
        "teacher_train_examples": demo_cfg.teacher_train_examples,
    }


def write_demo_data(demo_cfg: DemoConfig, out_dir: str | Path) -> Path:
    """Generate the three splits into out_dir (idempotent)."""
    final = Path(out_dir)
    settings = _data_settings(demo_cfg)
    if _reuse(final, settings, "data set"):
        return final
    tmp = _fresh_tmp(final)
    splits = demo_task.generate_splits(
        demo_cfg.seed, demo_cfg.train_examples, demo_cfg.validation_examples, demo_cfg.test_examples,
        demo_cfg.teacher_train_examples,
    )
    for name, rows in splits.items():
        demo_task.write_jsonl(rows, tmp / f"{name}.jsonl")
    _finish(tmp, final, settings, {"counts": {k: len(v) for k, v in splits.items()}})
    return final


def _check_data_cfg(data_cfg: DataConfig) -> None:
    if data_cfg.kind != "prompt_response" or data_cfg.prompt_field != "prompt" or data_cfg.response_field != "response":
        raise DemoError(
            "the demo writes prompt/response rows: set data.kind=prompt_response, data.prompt_field=prompt "
            f"and data.response_field=response (got kind={data_cfg.kind!r}, prompt_field="
            f"{data_cfg.prompt_field!r}, response_field={data_cfg.response_field!r})"
        )


def write_demo_tokenizer(demo_cfg: DemoConfig, data_cfg: DataConfig, train_path: Path, out_dir: str | Path):
    """Train the tokenizer on the rendered training examples (idempotent); returns it."""
    from transformers import AutoTokenizer

    from stages.data import render_prompt
    from stages.demo.tokenizer import train_tokenizer

    final = Path(out_dir)
    settings = _tokenizer_settings(demo_cfg, data_cfg)
    if not _reuse(final, settings, "tokenizer"):
        tmp = _fresh_tmp(final)
        rows = demo_task.read_jsonl(train_path)
        texts = [render_prompt(r, data_cfg) + r["response"] for r in rows]
        tokenizer = train_tokenizer(texts, demo_cfg.vocab_size)
        tokenizer.save_pretrained(str(tmp))
        _finish(tmp, final, settings, {"tokens": len(tokenizer)})
    return AutoTokenizer.from_pretrained(str(final))


def _tokenizer_settings(demo_cfg: DemoConfig, data_cfg: DataConfig) -> dict:
    return {**_data_settings(demo_cfg), "vocab_size": demo_cfg.vocab_size, "template": data_cfg.template}


def _max_positions(demo_cfg: DemoConfig, max_seq_len: int) -> int:
    """Room for data.max_seq_len (vLLM refuses a longer max_model_len), at least 512."""
    return int((demo_cfg.teacher or {}).get("max_position_embeddings", max(512, int(max_seq_len))))


def teacher_config(demo_cfg: DemoConfig, tokenizer, max_seq_len: int):
    """The LlamaConfig of the demo teacher (defaults + DemoConfig.teacher overrides)."""
    from transformers import LlamaConfig

    overrides = dict(demo_cfg.teacher or {})
    if "num_attention_heads" in overrides and "num_key_value_heads" not in overrides:
        overrides["num_key_value_heads"] = overrides["num_attention_heads"]  # plain multi-head by default
    fields = {**DEFAULT_TEACHER, **overrides}
    heads, kv = fields["num_attention_heads"], fields["num_key_value_heads"]
    if heads % kv:
        raise DemoError(f"demo.teacher: num_attention_heads ({heads}) must be a multiple of "
                        f"num_key_value_heads ({kv})")
    fields["max_position_embeddings"] = _max_positions(demo_cfg, max_seq_len)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **fields,
    )


def teacher_optim(demo_cfg: DemoConfig) -> OptimConfig:
    """The demo teacher's optimiser settings for stages.training.optim: linear warmup over
    WARMUP_FRACTION of the steps, then cosine to lr * MIN_LR_RATIO."""
    steps = demo_cfg.teacher_steps
    return OptimConfig(lr=demo_cfg.teacher_lr, warmup_steps=max(1, int(WARMUP_FRACTION * steps)),
                       max_steps=steps, min_lr_ratio=MIN_LR_RATIO, weight_decay=WEIGHT_DECAY, betas=list(BETAS),
                       clip_grad_norm=CLIP_GRAD_NORM, batch_size=demo_cfg.teacher_batch_size)


def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> list[int]:
    """Example indices of one step: a pure function of (seed, step), so a resume
    sees the same order. Epoch e is a permutation seeded by (seed, e)."""
    import torch

    perms: dict[int, list[int]] = {}
    out = []
    for j in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(j, num_examples)
        if epoch not in perms:
            gen = torch.Generator().manual_seed(seed * 100003 + epoch)
            perms[epoch] = torch.randperm(num_examples, generator=gen).tolist()
        out.append(perms[epoch][pos])
    return out


def _teacher_settings(demo_cfg: DemoConfig, data_cfg: DataConfig) -> dict:
    return {
        **_tokenizer_settings(demo_cfg, data_cfg),
        "teacher": {**DEFAULT_TEACHER, **dict(demo_cfg.teacher or {})},
        "teacher_steps": demo_cfg.teacher_steps,
        "teacher_batch_size": demo_cfg.teacher_batch_size,
        "teacher_lr": demo_cfg.teacher_lr,
        "max_position_embeddings": _max_positions(demo_cfg, data_cfg.max_seq_len),
    }


def train_demo_teacher(demo_cfg: DemoConfig, data_cfg: DataConfig, tokenizer, train_path: Path,
                       validation_path: Path, out_dir: str | Path, settings: dict, *, progress: bool = True,
                       stop_after: int | None = None, check_examples: int = CHECK_EXAMPLES) -> dict | None:
    """Train (or resume) the teacher and save it to out_dir; returns its metrics.

    `stop_after`: checkpoint and return None once that many steps are done (a
    stand-in for a kill, used by the resume test)."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    from stages.data import tokenize_examples
    from stages.lm import collate_for_lm, pad_id, target_logits
    from stages.progress import tqdm
    from stages.training import checkpoint as ckpt
    from stages.training.optim import build_optimizer, clip_and_step, lr_at, set_lr

    final = Path(out_dir)
    if _reuse(final, settings, "teacher"):
        return json.loads((final / "demo_teacher.json").read_text())

    examples, _ = tokenize_examples(demo_task.read_jsonl(train_path), tokenizer, data_cfg)
    optim = teacher_optim(demo_cfg)
    steps, batch_size = optim.max_steps, demo_cfg.teacher_batch_size

    torch.manual_seed(demo_cfg.seed)
    model = LlamaForCausalLM(teacher_config(demo_cfg, tokenizer, data_cfg.max_seq_len)).float()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, optim)

    # Resume from the last checkpoint of a run with the same settings; anything else starts over.
    work = final.with_name(final.name + ".work")
    found = ckpt.latest_valid_checkpoint(work)
    start, losses, seconds = 0, [], 0.0
    if found is not None and found.meta.get("settings") == json.loads(json.dumps(settings)):
        model.load_state_dict(ckpt.load_model_state(found.path))
        optimizer.load_state_dict(ckpt.load_optim_state(found.path))
        start, losses, seconds = found.step, list(found.meta["losses"]), float(found.meta["seconds"])
    else:
        shutil.rmtree(work, ignore_errors=True)
    checkpoint_every = max(50, steps // 5)

    def save(step: int) -> None:
        meta = {"settings": settings, "losses": losses, "seconds": seconds + time.perf_counter() - t0}
        ckpt.save_checkpoint(work, step, model_state=model.state_dict(), optim_state=optimizer.state_dict(),
                             meta=meta, keep=1)

    model.train()
    bar = tqdm(total=steps, initial=start, desc="demo teacher", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    for step in range(start, steps):
        set_lr(optimizer, lr_at(step, optim))
        batch = [examples[i] for i in batch_indices(step, batch_size, len(examples), demo_cfg.seed)]
        ids, mask, rows, positions = collate_for_lm(batch, pad_id(tokenizer))
        logits = target_logits(model, ids, mask, rows, positions)  # only the trained positions
        loss = F.cross_entropy(logits, ids[rows, positions + 1])
        loss.backward()
        clip_and_step(optimizer, params, optim.clip_grad_norm)
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if stop_after is not None and step + 1 >= stop_after and step + 1 < steps:
            save(step + 1)
            bar.close()
            return None
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save(step + 1)
    bar.close()
    elapsed = time.perf_counter() - t0
    seconds += elapsed

    model.eval()
    metrics = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_examples": len(examples),  # the teacher's own pool (demo.teacher_train_examples) or the students'
        "steps": steps,
        "train_seconds": round(seconds, 1),
        "steps_per_second": round((steps - start) / max(elapsed, 1e-9), 3),
        "final_loss": round(sum(losses[-20:]) / max(len(losses[-20:]), 1), 4),
        "losses": [round(x, 4) for x in losses],
    }
    metrics.update(_validation_check(model, tokenizer, data_cfg, validation_path, check_examples))

    tmp = _fresh_tmp(final)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / "demo_teacher.json").write_text(json.dumps(metrics, indent=1))
    _finish(tmp, final, settings)
    shutil.rmtree(work, ignore_errors=True)
    return metrics


def _validation_check(model, tokenizer, data_cfg: DataConfig, validation_path: Path, limit: int) -> dict:
    """Greedy exact match on the first `limit` validation rows, per task."""
    from stages.demo.evaluation import DemoAnswer
    from stages.lm import generate_greedy

    rows = demo_task.read_jsonl(validation_path)[:limit]
    t0 = time.perf_counter()
    texts = generate_greedy(model, tokenizer, rows, data_cfg, max_new_tokens=32, batch_size=64)
    rule, hits = DemoAnswer(), {}
    for row, text in zip(rows, texts):
        hits.setdefault(rule.group(row), []).append(rule.score(row, text))
    total = [h for v in hits.values() for h in v]
    return {
        "validation_examples": len(rows),
        "validation_exact_match": round(sum(total) / max(len(total), 1), 4),
        "validation_exact_match_by_task": {k: round(sum(v) / len(v), 4) for k, v in sorted(hits.items())},
        "validation_seconds": round(time.perf_counter() - t0, 1),
    }


# ---------------------------------------------------------------- entry point


def prepare_demo(demo_cfg: DemoConfig, run_dir: str | os.PathLike, data_cfg: DataConfig, *,
                 progress: bool = True) -> DemoPaths:
    """Make (or reuse) the demo data, tokenizer and teacher in run_dir (see the module doc).

    `data_cfg` supplies the template, fields and max_seq_len the pipeline will
    use, so the teacher is trained on exactly the tokens stage one caches.
    """
    _check_data_cfg(data_cfg)
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    data_dir = write_demo_data(demo_cfg, root / "data")
    train_path, validation_path = data_dir / "train.jsonl", data_dir / "validation.jsonl"
    teacher_train_path = data_dir / "teacher.jsonl" if demo_cfg.teacher_train_examples else train_path
    tokenizer = write_demo_tokenizer(demo_cfg, data_cfg, train_path, root / "tokenizer")
    write_demo_mc_task(data_dir, root / "lm_eval", data_cfg, demo_cfg.seed)  # eval.lm_eval's demo task
    teacher_dir = root / "teacher"
    metrics = train_demo_teacher(
        demo_cfg, data_cfg, tokenizer, teacher_train_path, validation_path, teacher_dir,
        _teacher_settings(demo_cfg, data_cfg), progress=progress,
    )
    return DemoPaths(
        root=str(root),
        data_dir=str(data_dir),
        train_path=str(train_path),
        validation_path=str(validation_path),
        test_path=str(data_dir / "test.jsonl"),
        tokenizer_dir=str(root / "tokenizer"),
        teacher_dir=str(teacher_dir),
        teacher_metrics=metrics,
    )

