"""Stage two: train one student from the teacher-logit cache, in one explicit loop.

    train_student(student_cfg, cache_url=..., out_dir=...) -> TrainSummary
    train_student(student_cfg, cache_url=None, data_cfg=..., out_dir=...)   plain SFT from the rows

Without a cache (`cache_url=None`, loss.kind sft) the batches come straight from
the training rows (stages.training.rows_dataset.RowsDataset: same batch dicts
minus the teacher arrays, same order and resume rules); the teacher fine-tune
trains that way too (pipeline/orchestrator.py wires it: stages.teacher.finetune).
The pieces every training run shares (schedule and AdamW, checkpoints and
resume, the run directory's layout, signals, torchrun, export, the step log,
batches from the rows) are the training kit's, stages/training/.

The loop (nanoGPT style, no Trainer framework): for each optimiser step, take
`grad_accum` micro-batches from the cache reader, count what the global batch
holds (all-reduced across ranks), run forward/backward per micro-batch with the
loss divided by that global count, clip, step AdamW, log, and every
`checkpoint_every` steps write an atomic checkpoint. The learning rate is a pure
function of the step (linear warmup, cosine to lr * min_lr_ratio), so resuming
needs only the step, the optimiser state, the RNG states and the reader
position; with those restored a killed run continues bit-identically on CPU.

Under `torchrun` (RANK/WORLD_SIZE set) each rank reads its slice of every global
batch and the model is wrapped in DDP (or FSDP2 with `fsdp: true`). Rank 0
writes checkpoints, logs and the final model; the others wait at barriers.

Outputs in `out_dir`: `checkpoints/step_NNNNNN/`, `log.jsonl` (one line per
step), `tb/` (TensorBoard), `final/` (save_pretrained + tokenizer), and
`done.json`, written last, which marks the student finished.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from stages.data_config import DataConfig
from stages.errors import TrainingError
from stages.lm import pad_id
from stages.student.config import StudentConfig
from stages.student.model import (build_student, check_batch_ids, check_vocabulary, describe_size, embedding_rows,
                                  load_student_tokenizer, tokenizer_setting, warn_unknown_tokens)
from stages.student.objective import StudentObjective
from stages.training import checkpoint as ckpt
from stages.training import resume
from stages.training.distributed import Dist, init_distributed, load_states, model_state, optim_state, wrap_model
from stages.training.export import save_final, training_chat_template, write_json_atomic
from stages.training.interrupt import StopOnSignal, TrainingStopped
from stages.training.optim import (apply_config, build_optimizer, clip_and_step, lr_at, schedule_meta, set_lr,
                                   steps_for_epochs, warmup_for)
from stages.training.rows_dataset import open_rows_dataset
from stages.training.steplog import StepLog
from storage.schema import targets_of

log = logging.getLogger(__name__)

LOSS_TAIL = 200  # per-step losses kept in each checkpoint's meta.json


@dataclass
class TrainSummary:
    name: str
    out_dir: str
    final_dir: str
    steps: int  # optimiser steps completed (== max_steps when finished)
    start_step: int  # 0, or the step resumed from
    final_loss: float | None
    losses: list[float] = field(default_factory=list)  # per-step losses of this call
    tokens: int = 0  # input tokens processed in this call (all ranks)
    seconds: float = 0.0
    already_done: bool = False  # done.json was there: nothing trained


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_for(cfg: StudentConfig, device: torch.device):
    """bf16 autocast on GPU unless dtype: float32; float32 weights stay the optimiser's master copy."""
    if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------- data


class Batches:
    """Endless micro-batches from the cache reader, remembering the reader state after each.

    Each batch carries the reader state right after its global step
    (`epoch`, `consumed`), so the state at a step boundary is exact even when
    DataLoader workers have prefetched further.
    """

    def __init__(self, dataset, num_workers: int, seed: int) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.seed = seed
        self.position = (dataset.start_epoch, dataset.start_consumed)
        self._it = None

    def state_dict(self) -> dict:
        epoch, consumed = self.position
        return self.dataset.state_dict(consumed, epoch)

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self.position = (int(state["epoch"]), int(state["consumed"]))
        self._it = None

    def next(self) -> dict:
        if self._it is None:
            from torch.utils.data import DataLoader

            # A private generator: creating the iterator must not draw from the
            # global RNG, or a resumed run would see other random numbers.
            gen = torch.Generator().manual_seed(self.seed)
            self._it = iter(DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                       generator=gen, pin_memory=torch.cuda.is_available()))
        batch = next(self._it)  # the reader streams epochs forever
        self.position = (int(batch["epoch"]), int(batch["consumed"]))
        return batch


# ---------------------------------------------------------------- logging


def step_record(step: int, totals: dict, norm: float, lr: float, tokens: int, seconds: float, kind: str) -> dict:
    """One log line from the global sums of a step (StudentObjective's stats, summed)."""
    positions = max(totals["num_positions"], 1)
    rec = {"step": step, "loss": totals["loss"] / max(totals["normaliser"], 1), "lr": lr, "grad_norm": norm,
           "ce": totals["nll"] / positions, "positions": int(totals["num_positions"]),
           "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9), "step_s": seconds}
    if kind == "atkd":
        rec.update(tkd=totals["tkd_hard"] / max(totals["num_hard"], 1), dkd=totals["dkd"] / positions,
                   num_hard=int(totals["num_hard"]), num_easy=int(totals["num_easy"]),
                   unc=totals["unc"] / positions)
    return rec


# ---------------------------------------------------------------- the loop


def train_student(student_cfg: StudentConfig, *, cache_url: str | None, out_dir: str | os.PathLike,
                  tokenizer_path: str | None = None, progress: bool = True,
                  top_k: int | None = None, data_cfg: DataConfig | None = None,
                  record: dict | None = None) -> TrainSummary:
    """Train `student_cfg` from the cache at `cache_url` (or, with cache_url None, from the
    training rows of `data_cfg`: loss.kind sft only) into `out_dir`.

    Resumes from the newest valid checkpoint in `out_dir`; returns at once when
    `done.json` says the student already reached `optim.max_steps`. `top_k`: use the first
    top_k entries of the cache's rows (None: all). `record`: what it is trained from
    (pipeline.student_record), written into done.json as `trained_from`.
    """
    if cache_url is None and (data_cfg is None or student_cfg.loss.kind != "sft"):
        raise TrainingError(f"student {student_cfg.name!r}: training without a teacher cache is plain SFT from "
                            f"the rows: it needs loss.kind sft (got {student_cfg.loss.kind}) and the data config")
    out = Path(out_dir)
    name = student_cfg.name or out.name
    if ckpt.is_done(out, student_cfg.optim.max_steps, student_cfg.optim.epochs):
        done = ckpt.read_done(out)
        log.info("student %s: %s says it is finished; nothing to do", name, out / ckpt.DONE_FILE)
        return TrainSummary(name=name, out_dir=str(out), final_dir=str(out / "final"), steps=done["steps"],
                            start_step=done["steps"], final_loss=done.get("final_loss"), already_done=True)
    d = init_distributed()
    try:
        return _train(student_cfg, name, cache_url, out, tokenizer_path, progress, d, top_k, data_cfg, record)
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: StudentConfig, name: str, cache_url: str | None, out: Path, tokenizer_path, progress: bool,
           d: Dist, top_k: int | None = None, data_cfg: DataConfig | None = None,
           record: dict | None = None) -> TrainSummary:
    from stages.progress import tqdm

    from storage.cache import Cache
    from storage.dataset import CacheDataset

    optim = cfg.optim
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
    d.barrier()

    # Student, checked against the cache's vocabulary before any work (from the rows: its own tokenizer).
    cache = Cache.open(cache_url) if cache_url is not None else None
    identity = cache.manifest.identity if cache is not None else {}
    tokenizer = load_student_tokenizer(cfg, tokenizer_path, cache_identity=identity)
    student = build_student(cfg, tokenizer)
    check_vocabulary(student, tokenizer, identity, student_name=name, tokenizer_from=tokenizer_setting(cfg))
    if d.is_main:
        resume.say(f"{name}: {describe_size(student)}")
    rows = embedding_rows(student)
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.to(d.device).train()
    objective = StudentObjective(student, cfg.loss, targets_of(identity))

    if cache is not None:
        dataset = CacheDataset(cache_url, optim.batch_size, seed=cfg.seed, rank=d.rank,
                               world_size=d.world_size, shuffle=True, pad_id=pad_id(tokenizer), top_k=top_k)
        data_fingerprint, where = {"cache_fingerprint": cache.fingerprint}, "in the cache"
        chat_template = training_chat_template(identity)
    else:
        dataset, chat_template = open_rows_dataset(data_cfg, tokenizer, optim.batch_size, seed=cfg.seed,
                                                   name=name, out=out, d=d)
        data_fingerprint, where = {"rows_fingerprint": dataset.fingerprint}, "in the training rows"
    batches = Batches(dataset, cfg.num_workers, cfg.seed)
    if optim.epochs is not None:  # optim.epochs: resolved to steps from this data and world size
        total = (sum(cache.shard_num_sequences(i) for i in range(cache.num_shards)) if cache is not None
                 else dataset.num_sequences())
        per_step = optim.batch_size * optim.grad_accum * d.world_size
        optim = dataclasses.replace(optim, max_steps=steps_for_epochs(optim.epochs, total, per_step))
        if d.is_main:
            resume.say(f"{name}: optim.epochs={optim.epochs:g} -> {optim.max_steps} steps "
                       f"({total:,} sequences {where}, {per_step} per step)")
    if optim.warmup_ratio is not None:
        optim = dataclasses.replace(optim, warmup_steps=warmup_for(optim))

    # Resume: weights, optimiser, RNG, reader position and step from the newest good checkpoint.
    config_dict = dataclasses.asdict(cfg)
    step, loss_tail = 0, []
    resumed = resume.find_checkpoint(out, name, config_dict, is_main=d.is_main)
    if resumed is not None:
        if not cfg.fsdp:
            student.load_state_dict(ckpt.load_model_state(resumed.path))
    wrapped = wrap_model(objective, cfg.fsdp, d)
    optimizer = build_optimizer(student, optim)
    if resumed is not None:
        load_states(resumed.path, wrapped, student, optimizer, cfg.fsdp)
        apply_config(optimizer, optim)  # the current config's betas and weight decay win
        batches.load_state_dict(resumed.meta["reader"])
        step, loss_tail = resumed.step, list(resumed.meta.get("loss_tail", []))
        ckpt.set_rng_state(resumed.meta["rng"])
        d.barrier()  # every rank has read its files before rank 0 removes the unusable ones
        if d.is_main:
            resume.announce_resume(resumed, name, optim, lr_at)
            for path, _ in resumed.skipped:
                shutil.rmtree(path, ignore_errors=True)
    else:
        d.barrier()  # every rank has looked at the checkpoints before rank 0 moves them
        if d.is_main:
            resume.start_from_scratch(out, name)
        seed_everything(cfg.seed)

    start_step = step
    if d.is_main and start_step < optim.max_steps:
        (out / "done.json").unlink(missing_ok=True)  # training further than a finished run
    steplog = StepLog(out, start_step, d.is_main)
    bar = tqdm(total=optim.max_steps, initial=step, disable=not (progress and d.is_main),
               desc=f"student {name}", unit="step")
    amp = autocast_for(cfg, d.device)
    params = [p for p in student.parameters() if p.requires_grad]
    losses, tokens_run, t_run = [], 0, time.perf_counter()
    recent = collections.deque(maxlen=20)  # (tokens, seconds) of the last steps: a steady tok/s for the bar

    def save(at_step: int) -> None:
        model_sd = model_state(wrapped, student, cfg.fsdp)  # a collective under FSDP: every rank calls it
        optim_sd = optim_state(wrapped, optimizer, cfg.fsdp)
        if d.is_main:
            meta = {"name": name, "config": config_dict, "loss_tail": loss_tail[-LOSS_TAIL:],
                    "reader": batches.state_dict(), "rng": ckpt.rng_state(), "world_size": d.world_size,
                    **data_fingerprint,
                    "schedule": schedule_meta(at_step, optim)}
            ckpt.save_checkpoint(out, at_step, model_state=model_sd, optim_state=optim_sd, meta=meta,
                                 keep=cfg.keep_checkpoints)
        d.barrier()

    with StopOnSignal() as stop:
        while step < optim.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, optim)
            set_lr(optimizer, lr)
            micro = [_to_device(batches.next(), d.device) for _ in range(optim.grad_accum)]
            for batch in micro:
                check_batch_ids(batch, rows)
            if step == start_step and d.is_main:
                warn_unknown_tokens(micro, tokenizer, student_name=name)
            # Global normaliser first, so every micro-batch on every rank divides by the same count:
            # the summed gradient then equals the single-process gradient of the whole global batch.
            normaliser = float(d.all_sum(torch.tensor([float(sum(objective.normaliser(b) for b in micro))],
                                                      dtype=torch.float64))[0])
            scale = d.world_size / max(normaliser, 1.0)  # DDP/FSDP average over ranks; undo that
            sums = torch.zeros(len(_SUM_KEYS), dtype=torch.float64, device=d.device)
            for i, batch in enumerate(micro):
                last = i == len(micro) - 1
                with _grad_sync(wrapped, last):
                    with amp:
                        loss_sum, stats = wrapped(batch)
                    (loss_sum * scale).backward()
                stats["tokens"] = batch["attention_mask"].sum()
                sums += torch.stack([torch.as_tensor(stats.get(k, 0.0)).to(d.device, torch.float64)
                                     for k in _SUM_KEYS])  # stays on the device: no sync per micro-batch
            norm = clip_and_step(optimizer, params, optim.clip_grad_norm)
            if not math.isfinite(norm) and d.is_main:
                log.warning("student %s: step %d has a non-finite gradient norm; update skipped", name, step + 1)
            step += 1

            totals = dict(zip(_SUM_KEYS, d.all_sum(sums).tolist()))
            totals["normaliser"] = normaliser
            tokens = int(totals["tokens"])
            rec = step_record(step, totals, norm, lr, tokens, time.perf_counter() - t0, cfg.loss.kind)
            losses.append(rec["loss"])
            loss_tail.append([step, rec["loss"]])
            tokens_run += tokens
            if step % max(cfg.log_every, 1) == 0 or step == optim.max_steps:
                steplog.write(rec)
            recent.append((tokens, rec["step_s"]))
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}",
                            tok_s=f"{sum(t for t, _ in recent) / max(sum(s for _, s in recent), 1e-9):.0f}")
            if step % cfg.checkpoint_every == 0 or step == optim.max_steps:
                save(step)
            if step < optim.max_steps and _stop_requested(stop, d):
                if step % cfg.checkpoint_every:
                    save(step)  # the steps since the last regular checkpoint are kept
                bar.close()
                steplog.close()
                if d.is_main:
                    resume.say(f"{name}: stopped by {stop.name or 'a signal'} after step {step}; checkpoint "
                               f"{ckpt.step_dir(out, step)} written: rerun the same command to continue from there")
                raise TrainingStopped(f"student {name} stopped after step {step}")
    bar.close()
    steplog.close()

    final_state = model_state(wrapped, student, cfg.fsdp)
    summary = TrainSummary(name=name, out_dir=str(out), final_dir=str(out / "final"), steps=step,
                           start_step=start_step, final_loss=loss_tail[-1][1] if loss_tail else None,
                           losses=losses, tokens=tokens_run, seconds=time.perf_counter() - t_run)
    if d.is_main:
        save_final(out, student, tokenizer, final_state, chat_template=chat_template)
        write_json_atomic(out / "done.json", {"name": name, "steps": step, "epochs": optim.epochs,
                                              "final_loss": summary.final_loss, "final_dir": summary.final_dir,
                                              "finished_at": time.time(),
                                              **({"trained_from": record} if record is not None else {})})
    d.barrier()
    return summary


_SUM_KEYS = ("loss", "nll", "tkd_hard", "dkd", "num_positions", "num_hard", "num_easy", "unc", "tokens")


def _stop_requested(stop: StopOnSignal, d: Dist) -> bool:
    """Whether any rank got SIGINT/SIGTERM: every rank must stop (and checkpoint) at the same step."""
    return bool(d.all_sum(torch.tensor([1.0 if stop.signum else 0.0]))[0] > 0)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _grad_sync(wrapped, last: bool):
    """Reduce gradients across ranks only on the last micro-batch of a step."""
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync") and not last:  # DDP
        return wrapped.no_sync()
    return contextlib.nullcontext()
