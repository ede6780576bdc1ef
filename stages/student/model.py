"""Load or initialise a student, and check its vocabulary against the cache.

The cache stores token ids, so a student can only learn from it if it speaks
the same vocabulary as the teacher that wrote it: the student's tokenizer must
carry the cache's tokenizer fingerprint. The embedding matrix may be larger
than the tokenizer (models pad it to a multiple of 8/64, e.g. 50272 rows for
50265 tokens) but never smaller than the largest id the cache can hold.
"""

from __future__ import annotations

import logging

import torch

from stages.errors import ModelError
from stages.student.config import StudentConfig
from storage.errors import AtkdError

log = logging.getLogger(__name__)


class VocabularyMismatchError(AtkdError, ValueError):
    """The student cannot read the cache's token ids; the message says what differs."""


def load_student_tokenizer(student_cfg: StudentConfig, tokenizer_path: str | None = None, *,
                           cache_identity: dict | None = None):
    """The student's tokenizer: its own `tokenizer` setting, else its `model` path,
    else `tokenizer_path` (the pipeline passes the teacher's, which wrote the cache).

    Whichever is loaded is then checked against the cache's fingerprint.
    """
    from transformers import AutoTokenizer

    source = (student_cfg.tokenizer or student_cfg.model or tokenizer_path
              or (cache_identity or {}).get("tokenizer") or "")
    if not source:
        raise ModelError(
            f"student {student_cfg.name!r}: no tokenizer to load; it is initialised from `init`, so set "
            f"students.{student_cfg.name}.tokenizer (or teacher.model, whose tokenizer it then uses)"
        )
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=student_cfg.trust_remote_code)
    except (OSError, ValueError) as e:  # missing files, an unreachable hub, an unknown tokenizer class
        raise ModelError(f"student {student_cfg.name!r}: cannot load the tokenizer {source!r} of "
                         f"{tokenizer_setting(student_cfg)} ({type(e).__name__}: {_first_line(e)})") from e


def build_student(student_cfg: StudentConfig, tokenizer=None) -> torch.nn.Module:
    """A float32 causal LM: pretrained from `model`, or randomly initialised from `init`.

    Weights stay float32 (the optimiser's master copy); bf16 comes from autocast
    in the trainer. Random initialisation is seeded with the student's seed so
    every rank and every rerun starts from the same weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    trust = student_cfg.trust_remote_code
    if student_cfg.model:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                student_cfg.model, dtype=torch.float32, trust_remote_code=trust)
        except (OSError, ValueError) as e:  # missing files, an unreachable hub, an unknown architecture
            where = (f"the final model of student {student_cfg.init_from!r}" if student_cfg.init_from
                     else f"students.{student_cfg.name}.model")
            raise ModelError(f"student {student_cfg.name!r}: cannot load the model {student_cfg.model!r} of {where} "
                             f"({type(e).__name__}: {_first_line(e)})") from e
    elif student_cfg.init is not None:
        init = dict(student_cfg.init)
        # Fill what the tokenizer knows and the config dict left out, so the
        # saved student generates and stops like its tokenizer expects.
        if tokenizer is not None:
            init.setdefault("vocab_size", len(tokenizer))
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                value = getattr(tokenizer, key, None)
                if value is not None:
                    init.setdefault(key, value)
        model_type = init.pop("model_type", None)
        config = AutoConfig.for_model(model_type, **init) if model_type else LlamaConfig(**init)
        with torch.random.fork_rng(devices=[]):  # initialise without disturbing the caller's RNG
            torch.manual_seed(student_cfg.seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                     trust_remote_code=trust)
    else:
        raise ModelError(f"student {student_cfg.name!r}: set `model` (path or hub name) or `init` (a model config)")
    return model


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else ""


def embedding_rows(model: torch.nn.Module) -> int:
    """How many token ids the student can embed and predict (the smaller of input and output)."""
    rows = model.get_input_embeddings().weight.shape[0]
    head = model.get_output_embeddings()
    if head is not None:
        rows = min(rows, head.weight.shape[0])
    return int(rows)


def tokenizer_setting(student_cfg: StudentConfig) -> str:
    """Which setting gave a student its tokenizer (load_student_tokenizer's order), for messages."""
    name = student_cfg.name or "NAME"
    if student_cfg.tokenizer:
        return f"students.{name}.tokenizer"
    if student_cfg.init_from:
        return f"the final model of student {student_cfg.init_from!r} (students.{name}.init_from)"
    if student_cfg.model:
        return f"students.{name}.model"
    return "teacher.model (the default for an `init` student)"


def check_vocabulary(model: torch.nn.Module, tokenizer, identity: dict, *, student_name: str = "",
                     tokenizer_from: str = "") -> None:
    """Refuse a student that cannot read the cache's ids, naming what differs.

    `identity` is the cache manifest's identity (`tokenizer_fingerprint`,
    `vocab_size`, optionally `max_token_id`). A padded embedding (more rows
    than tokens) is fine as long as the tokenizers match.
    """
    from stages.fingerprint import describe_tokenizer_difference, tokenizer_fingerprint, tokenizer_info

    who = f"student {student_name!r}" if student_name else "the student"
    problems = []
    info = tokenizer_info(tokenizer)
    cache_fp = identity.get("tokenizer_fingerprint")
    cache_vocab = identity.get("vocab_size")
    if cache_fp is not None and cache_fp != tokenizer_fingerprint(info):
        cache_info = identity.get("tokenizer_info")
        detail = describe_tokenizer_difference(info, cache_info) if isinstance(cache_info, dict) else ""
        if not detail:  # only the fingerprint is recorded: name what can still be compared
            facts = []
            if cache_vocab is not None and int(cache_vocab) != len(tokenizer):
                facts.append(f"tokenizer size {len(tokenizer)} vs cache vocab_size {cache_vocab}")
            cache_special = identity.get("special_ids") or {}
            for name, value in info["special_ids"].items():
                if name in cache_special and cache_special[name] != value:
                    facts.append(f"{name} token id {value} vs cache {cache_special[name]}")
            detail = "; ".join(facts) or "same size, but token ids or special tokens differ"
        problems.append(f"its tokenizer{f' (from {tokenizer_from})' if tokenizer_from else ''} is not the one "
                        f"the cache was written with: {detail} (student vs cache)")
    elif cache_fp is None and cache_vocab is not None and int(cache_vocab) != len(tokenizer):
        problems.append(f"tokenizer size {len(tokenizer)} != cache vocab_size {cache_vocab}")
    # Every id the cache holds needs a row. The tokenizer's ids certainly occur;
    # `max_token_id`, when recorded, bounds the teacher's top-k ids too (which
    # range over its possibly padded logits). Batches are checked as they come
    # (check_batch_ids) for caches that record no bound.
    needed = max(int(identity.get("max_token_id", -1)) + 1, len(tokenizer))
    rows = embedding_rows(model)
    if rows < needed:
        problems.append(f"embedding has {rows} rows but the cache holds ids up to {needed - 1}")
    if problems:
        key = f"students.{student_name or 'NAME'}.tokenizer"
        raise VocabularyMismatchError(
            f"{who} does not match the cache's vocabulary: " + "; ".join(problems)
            + f". Give it the teacher's tokenizer: set {key} to teacher.model's directory (or leave it empty for "
            "an `init` student), or use a student model that shares the teacher's vocabulary")
    if rows > len(tokenizer):
        log.info("%s: embedding padded to %d rows for %d tokens (ids match: fine)", who, rows, len(tokenizer))


def check_batch_ids(batch: dict, rows: int) -> None:
    """Refuse a batch holding an id the student has no embedding row for."""
    for key in ("input_ids", "topk_ids", "target_ids"):
        t = batch.get(key)  # batches from the rows (plain SFT) carry no topk_ids
        if t is not None and t.numel() and int(t.max()) >= rows:
            raise VocabularyMismatchError(
                f"the cache holds token id {int(t.max())} in {key}, but the student's embedding has only "
                f"{rows} rows; use a student whose vocabulary covers the teacher's")


def describe_size(model: torch.nn.Module) -> str:
    """`0.53M parameters (llama, hidden 128, 2 layers)`: what a user checks first when a run looks off."""
    count = sum(p.numel() for p in model.parameters())  # tied weights are one parameter, counted once
    size = f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.2f}M"
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    facts = [getattr(config, "model_type", "") or type(model).__name__]
    if getattr(text, "hidden_size", None):
        facts.append(f"hidden {text.hidden_size}")
    if getattr(text, "num_hidden_layers", None):
        layers = text.num_hidden_layers
        facts.append(f"{layers} layer{'s' if layers != 1 else ''}")
    return f"{size} parameters ({', '.join(facts)})"


UNK_WARN_SHARE = 0.01


def unknown_token_share(batches: list[dict], unk_id: int | None) -> float:
    """The share of real (unpadded) input tokens that are the tokenizer's unknown token."""
    if unk_id is None:
        return 0.0
    total = sum(int(b["attention_mask"].sum()) for b in batches)
    unk = sum(int(((b["input_ids"] == unk_id) & b["attention_mask"].bool()).sum()) for b in batches)
    return unk / max(total, 1)


def warn_unknown_tokens(batches: list[dict], tokenizer, *, student_name: str = "") -> float:
    """Warn when more than 1% of a batch's tokens are `unk`: the tokenizer does not cover the data."""
    share = unknown_token_share(batches, getattr(tokenizer, "unk_token_id", None))
    if share > UNK_WARN_SHARE:
        who = f"student {student_name!r}" if student_name else "the student"
        log.warning("%s: %.1f%% of the tokens in the first batch are the unknown token %r: the tokenizer does "
                    "not cover this data (or the chat template's role words); the student learns little from "
                    "them. Use a tokenizer that covers the text (e.g. byte-level BPE) or a template in its "
                    "vocabulary.", who, 100 * share, tokenizer.unk_token)
    return share
