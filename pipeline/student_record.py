"""What a finished student was trained from, and whether that still matches the config.

The trainer writes the record into a finished student's done.json
(`trained_from`, in the same atomic write that marks it finished):

    model / init / init_from, loss, optim, seed, dtype   the settings that shape its weights
    model_fingerprint   a `model:` student's weights (stages.fingerprint.model_fingerprint)
    tokenizer           the fingerprint of the tokenizer it read the ids with
    source              where its sequences came from: cache | rows
    data                {"cache": <the cache's fingerprint>, "top_k": k} (k: the entries it trains on,
                        loss.top_k or else teacher.top_k, so loss.top_k itself is not in `loss`) or
                        {"rows": <the training rows' identity: content fingerprint, row count, data settings>}
    continues_from      {"name", "record", "finished_at"}: the student it started from (init_from), as it
                        was when this one trained

Not recorded, so changing them keeps a finished student finished: log_every,
checkpoint_every, keep_checkpoints, num_workers (how often it logs and saves),
gradient_checkpointing, fsdp and trust_remote_code (how it computes, not what).

`student_states(cfg)` compares each student's record with the one the config
would write now:
  done          it matches
  continues     it matches, but optim.max_steps / epochs was raised: training goes on from the last
                checkpoint (the learning-rate schedule is recomputed, stages.training.resume)
  stale         anything else differs, or the student it continues from is stale, not trained, about
                to train further or was trained again since: refused until retrained (`--retrain NAME`,
                or delete students/<name>), never skipped as done
  unchecked     done.json of an atkd from before the record: kept as done, and said so (nothing to
                compare; `--retrain NAME` retrains it)
  in progress / not started

A record's training data is compared once the training cache is complete; before
that a cache student's data counts as unknown (not as different).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field

from pipeline.config import ConfigError, PipelineConfig, StudentConfig
from pipeline.orchestrator import open_cache, reads_rows, student_dir, student_top_k
from storage.diff import changes
from storage.errors import AtkdError

# StudentConfig fields that do not shape the weights (module doc), or are recorded otherwise.
_NOT_RECORDED = ("name", "log_every", "checkpoint_every", "keep_checkpoints", "num_workers",
                 "gradient_checkpointing", "fsdp", "trust_remote_code", "tokenizer", "data")
_LENGTH = ("optim.max_steps", "optim.epochs")
USABLE = ("done", "unchecked")  # states whose final/ evaluation and continuing students may use


class StaleStudentError(AtkdError):
    """A finished student was trained from other data or settings than the config's."""


@dataclass
class StudentState:
    name: str
    kind: str  # done | continues | stale | unchecked | in progress | not started
    why: list[str] = field(default_factory=list)  # stale: what differs; continues: the raised setting
    checkpoint: str = ""  # in progress: the newest checkpoint's name

    def text(self) -> str:
        """For `atkd status` and --dry-run."""
        if self.kind == "stale":
            return f"stale, trained from something else ({'; '.join(self.why)}): retrain with --retrain {self.name}"
        if self.kind == "continues":
            return f"done, trains further ({'; '.join(self.why)})"
        if self.kind == "unchecked":
            return "done (by an atkd that did not record what it trained from: not checked against the config)"
        if self.kind == "in progress":
            return f"in progress (last checkpoint {self.checkpoint})"
        return self.kind


def _plain(value):
    return json.loads(json.dumps(value, default=str))


def _tokenizer_source(cfg: PipelineConfig, s: StudentConfig) -> str:
    """The trainer's choice (stages.student.model.load_student_tokenizer): `tokenizer`, else `model`
    (for init_from: the earlier student's final/, tokenizer included), else the teacher's."""
    if s.tokenizer or s.model:
        return s.tokenizer or s.model
    if s.init_from:
        return str(student_dir(cfg, s.init_from) / "final")
    return cfg.teacher.model


def _tokenizer_fingerprint(source: str, trust: bool, memo: dict) -> str:
    key = ("tokenizer", source)
    if key not in memo:
        from stages.fingerprint import tokenizer_fingerprint

        try:
            from transformers import AutoTokenizer

            memo[key] = tokenizer_fingerprint(AutoTokenizer.from_pretrained(source, trust_remote_code=trust))
        except Exception as e:  # noqa: BLE001 - a missing or broken tokenizer: the record says so
            memo[key] = f"<cannot load {source}: {type(e).__name__}>"
    return memo[key]


def _data(cfg: PipelineConfig, s: StudentConfig, memo: dict) -> dict | None:
    """The training data's identity; None while the training cache is not complete."""
    if reads_rows(cfg, s):
        if "rows" not in memo:
            from stages import data as data_mod

            source, n = data_mod.training_rows(cfg.data)
            memo["rows"] = data_mod.rows_identity(cfg.data, source, n)
        return {"rows": memo["rows"]}
    if "cache" not in memo:
        cache = open_cache(cfg.cache.path)
        memo["cache"] = cache.fingerprint if cache is not None and cache.is_complete() else None
    if memo["cache"] is None:
        return None
    return {"cache": memo["cache"], "top_k": student_top_k(cfg, s)}


def expected_record(cfg: PipelineConfig, s: StudentConfig, memo: dict | None = None) -> dict:
    """The record training `s` now would write (`data` None while the cache is incomplete)."""
    from stages.fingerprint import fingerprint_json, model_fingerprint
    from stages.training.layout import read_done

    memo = {} if memo is None else memo
    settings = dataclasses.asdict(s)
    record = {k: v for k, v in settings.items() if k not in _NOT_RECORDED}
    record["loss"].pop("top_k")  # recorded as data.top_k (the k it trains on, however it was set)
    if not s.rounds:  # single-pass students: records written before rounds existed still match
        record.pop("rounds", None)
    if s.model:
        record["model"] = os.path.basename(os.path.normpath(s.model))
        record["model_fingerprint"] = model_fingerprint(s.model)
    record["tokenizer"] = _tokenizer_fingerprint(_tokenizer_source(cfg, s), s.trust_remote_code, memo)
    record["source"] = "rows" if reads_rows(cfg, s) else "cache"
    record["data"] = _data(cfg, s, memo)
    if s.init_from:
        parent = read_done(student_dir(cfg, s.init_from)) or {}
        record["continues_from"] = {"name": s.init_from, "finished_at": parent.get("finished_at"),
                                    "record": fingerprint_json(parent.get("trained_from"))}
    return _plain(record)


def _length_change(have: dict, want: dict) -> tuple[list[str], list[str]]:
    """(stale lines, raised lines) for optim.max_steps / epochs: fewer than trained is stale, more trains on."""
    h, w = have.get("optim") or {}, want["optim"]
    if (h.get("epochs") is None) != (w.get("epochs") is None):
        return changes({"optim": {k: h.get(k) for k in ("max_steps", "epochs")}},
                       {"optim": {k: w.get(k) for k in ("max_steps", "epochs")}}), []
    key = "epochs" if w.get("epochs") is not None else "max_steps"
    old, new = h.get(key), w.get(key)
    if old == new:
        return [], []
    line = f"optim.{key}: {old} -> {new}"
    try:
        raised = float(new) > float(old)
    except (TypeError, ValueError):
        raised = False
    return ([], [line]) if raised else ([line + " (fewer than it was trained for)"], [])


def _parent_change(s: StudentConfig, have: dict, want: dict, states: dict) -> list[str]:
    if not s.init_from:
        return []
    parent = states.get(s.init_from)
    if parent is None or parent.kind not in USABLE:
        what = {"stale": "is stale", "continues": "trains further first"}.get(parent.kind if parent else "",
                                                                           "is not trained")
        return [f"continues from student {s.init_from!r}, which {what}"]
    if have.get("continues_from") != want.get("continues_from"):
        return [f"continues from student {s.init_from!r}, which was trained again since"]
    return []


def _state(cfg: PipelineConfig, s: StudentConfig, states: dict, memo: dict) -> StudentState:
    from stages.training.layout import is_done, last_checkpoint, read_done

    out = student_dir(cfg, s.name)
    done = read_done(out)
    if done is None:
        last = last_checkpoint(out)
        return StudentState(s.name, "in progress", checkpoint=last.name) if last else StudentState(s.name,
                                                                                                   "not started")
    have = done.get("trained_from")
    if not isinstance(have, dict):
        done_now = is_done(out, s.optim.max_steps, s.optim.epochs)
        return StudentState(s.name, "unchecked" if done_now else "continues",
                            [] if done_now else ["optim.max_steps / epochs raised"])
    want = expected_record(cfg, s, memo)
    skip = [*_LENGTH, "continues_from", *(["data"] if want["data"] is None else [])]
    stale = changes(have, want, skip=skip)
    shorter, raised = _length_change(have, want)
    stale += shorter + _parent_change(s, have, want, states)
    if stale:
        return StudentState(s.name, "stale", stale)
    return StudentState(s.name, "continues", raised) if raised else StudentState(s.name, "done")


def student_states(cfg: PipelineConfig) -> dict[str, StudentState]:
    """Every student's state (module doc), in config order (a student's init_from comes before it)."""
    states: dict[str, StudentState] = {}
    memo: dict = {}
    for s in cfg.students:
        states[s.name] = _state(cfg, s, states, memo)
    return states


# ---------------------------------------------------------------- --retrain


def retrain_set(cfg: PipelineConfig, names: list[str]) -> set[str]:
    """`--retrain` names (repeated or comma-separated) plus every student that continues from one of
    them (its weights came from the old ones)."""
    wanted = {n.strip() for item in names for n in item.split(",") if n.strip()}
    known = [s.name for s in cfg.students]
    unknown = sorted(wanted - set(known))
    if unknown:
        raise ConfigError(f"--retrain {unknown[0]}: no student named {unknown[0]!r} in the config; students: "
                          f"{', '.join(known) or '(none)'}")
    for s in cfg.students:  # config order: parents first
        if s.init_from in wanted:
            wanted.add(s.name)
    return wanted


def refuse_stale(cfg: PipelineConfig, states: dict[str, StudentState], retrain: set[str]) -> None:
    """StaleStudentError naming every stale student not being retrained, what differs, and the fix."""
    stale = [st for name, st in states.items() if st.kind == "stale" and name not in retrain]
    if not stale:
        return
    names = ",".join(st.name for st in stale)
    detail = "; ".join(f"{st.name!r}: {', '.join(st.why[:4])}{' ...' if len(st.why) > 4 else ''}" for st in stale)
    where = student_dir(cfg, stale[0].name).parent
    raise StaleStudentError(
        f"finished student(s) trained from something else than this config (recorded -> config): {detail}. "
        f"Retrain: rerun with --retrain {names} (students continuing from them are retrained too), or delete "
        f"their directories in {where}; or set the config back")


def clear_for_retrain(cfg: PipelineConfig, name: str) -> None:
    """`--retrain NAME`: remove the student's directory (checkpoints, final/, logs) before it trains anew."""
    out = student_dir(cfg, name)
    if out.exists():
        print(f"[atkd] --retrain {name}: removing {out} to train it anew", flush=True)
        shutil.rmtree(out)
