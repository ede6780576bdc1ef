"""The cache identity: what a teacher cache was built from, computed the same way in every
worker and in stage two, and the checks that refuse a cache built from something else.

A teacher fine-tuned by `teacher.finetune` carries its fine-tune record
(stages.teacher.finetune: base model, settings, training rows), copied into
the identity beside the fingerprint of the fine-tuned weights.

The data is identified by its source content (stages.rows: a hash of the files,
or a hub dataset's fingerprint) plus every setting that shapes tokens, so it
costs one pass over the bytes, never a tokenisation of the whole set.
"""

from __future__ import annotations

import os
import socket

from stages import data as data_mod
from stages import split
from stages.data_config import DataConfig
from stages.errors import ModelError, TeacherError
from stages.fingerprint import (
    describe_tokenizer_difference,
    fingerprint_json,
    model_fingerprint,
    tokenizer_fingerprint,
    tokenizer_info,
    tokenizer_summary,
)
from stages.teacher.config import TeacherConfig

# Bumped when the code that turns rows into token sequences changes what it produces.
TOKENIZATION_VERSION = 2


def looks_local(model: str) -> bool:
    """A path rather than a hub name: absolute, starting with . or ~, or with more than one slash."""
    return os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1


def _hub_host() -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return endpoint.split("://", 1)[-1].split("/", 1)[0]


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline (HF_HUB_OFFLINE set, or the hub does not answer within `timeout` s)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = _hub_host()
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _in_hub_cache(model: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:
        return False


def check_model_reachable(model: str, what: str) -> None:
    """A model name that is not a local directory must be in the hub cache or on a reachable hub;
    say at once what was tried instead of letting transformers retry the hub for a minute."""
    if os.path.isdir(os.path.expanduser(model)):
        return
    if looks_local(model):
        raise ModelError(f"{what} {model!r}: no such directory; set {what} to the model's directory "
                         "(saved with save_pretrained) or a hub name")
    if _in_hub_cache(model) or hub_reachable():
        return
    raise ModelError(f"{what} {model!r}: tried a local directory {os.path.abspath(model)!r} (none), the Hugging "
                     f"Face cache (not there) and the hub ({_hub_host()}: offline or unreachable). Point {what} "
                     "at a local model directory, or download the model where the hub is reachable")


def load_tokenizer(model: str, trust_remote_code: bool = False):
    """The teacher's tokenizer; a missing directory or tokenizer is a clear error naming teacher.model."""
    from transformers import AutoTokenizer

    check_model_reachable(model, "teacher.model")
    try:
        return AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, ... with long messages
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(
            f"teacher.model {model!r}: cannot load its tokenizer ({type(e).__name__}: {first}). The directory "
            "needs the tokenizer files (tokenizer.json / tokenizer_config.json): save them next to the model "
            "with tokenizer.save_pretrained(...)"
        ) from None


def model_vocab_size(model: str, trust_remote_code: bool = False) -> int:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # no config.json, an unknown model type, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"teacher.model {model!r}: cannot load its config ({type(e).__name__}: {first}); the "
                         "directory needs the model's config.json (save the model with save_pretrained)") from e
    vocab = getattr(config, "vocab_size", None)
    if vocab is None and hasattr(config, "get_text_config"):
        vocab = getattr(config.get_text_config(), "vocab_size", None)
    if vocab is None:
        raise ModelError(f"teacher.model {model!r}: its config has no vocab_size")
    return int(vocab)


def data_fields(data_cfg: DataConfig) -> dict:
    """The row fields the data kind reads (part of what shapes the tokens)."""
    if data_cfg.kind == "prompt_response":
        fields = {"prompt": data_cfg.prompt_field, "response": data_cfg.response_field}
        if data_cfg.template_fields:
            fields["template_fields"] = list(data_cfg.template_fields)
        return fields
    if data_cfg.kind == "messages":
        return {"messages": data_cfg.messages_field}
    return {"text": data_cfg.text_field}


def cache_identity(data_cfg: DataConfig, teacher_cfg: TeacherConfig, tokenizer, source, vocab_size: int) -> dict:
    """Everything that decides the cache's content; a rerun must match it key by key.

    The data is identified by its source content (a hash of the files, or a hub
    dataset's fingerprint) and every setting that shapes tokens, so it costs
    one pass over the bytes, never a tokenisation of the whole set.
    """
    info = tokenizer_info(tokenizer)
    rows = data_mod.num_rows(data_cfg, source)
    identity = {
        "teacher": os.path.basename(os.path.normpath(teacher_cfg.model)),
        "teacher_fingerprint": model_fingerprint(teacher_cfg.model),
        "tokenizer_fingerprint": tokenizer_fingerprint(info),
        "tokenizer_info": tokenizer_summary(info),  # what describe_tokenizer_difference needs
        "vocab_size": vocab_size,
        "top_k": int(teacher_cfg.top_k),
        "data_kind": data_cfg.kind,
        "data_fields": data_fields(data_cfg),
        "template": data_cfg.template if data_cfg.kind == "prompt_response" else None,
        "chat_template": (getattr(tokenizer, "chat_template", None) or data_mod.BUILTIN_CHAT_TEMPLATE)
        if data_cfg.kind == "messages"
        else None,
        "max_seq_len": int(data_cfg.max_seq_len),
        "overlong": data_cfg.overlong,
        "data_format": source.format,
        "num_rows": rows,
        "data_fingerprint": fingerprint_json({"source": source.fingerprint, "rows": rows,
                                              "tokenization": TOKENIZATION_VERSION}),
        "topk_logprobs_dtype": "float16",
        "target_logprobs_dtype": "float32",
    }
    holdout = split.identity_key(data_cfg, rows)
    if holdout is not None:  # absent without a split, so caches written before splits still match
        identity["holdout"] = holdout
    from stages.teacher.finetune import read_record

    finetuned = read_record(teacher_cfg.model)
    if finetuned is not None:  # a teacher fine-tuned by teacher.finetune: what it was made from
        identity["teacher"] = f"{finetuned.get('base_model')} (fine-tuned)"
        identity["teacher_finetune"] = finetuned
    if teacher_cfg.targets != "topk":  # absent for top-k: every v1 cache keeps its identity
        identity.update(targets=teacher_cfg.targets, samples=int(teacher_cfg.samples), sampling="exact")
        if teacher_cfg.targets == "sampled":
            identity["top_k"] = 0
    return identity


def shard_plan(data_cfg: DataConfig, num_rows: int, sequences_per_shard: int) -> list[dict]:
    """Row ranges [row_start, row_end) of the source (stages.split.shard_plan): without a split,
    `sequences_per_shard` rows each, known from the row count alone. A shard holds the usable rows
    of its part in its range (skipped and held-out rows are counted in its attributes)."""
    return split.shard_plan(data_cfg, num_rows, sequences_per_shard)


def check_teacher(teacher_cfg: TeacherConfig):
    """The teacher's tokenizer and vocabulary size, checked against each other and top_k."""
    if not teacher_cfg.model:
        raise TeacherError("teacher.model is empty: set it to the teacher's path or hub name")
    tokenizer = load_tokenizer(teacher_cfg.model, teacher_cfg.trust_remote_code)
    vocab_size = model_vocab_size(teacher_cfg.model, teacher_cfg.trust_remote_code)
    if len(tokenizer) > vocab_size:
        raise ModelError(
            f"teacher.model {teacher_cfg.model!r}: the tokenizer has {len(tokenizer)} tokens but the model "
            f"only {vocab_size} logits; they do not belong together"
        )
    if teacher_cfg.targets != "sampled" and teacher_cfg.top_k > vocab_size:
        raise TeacherError(f"teacher.top_k={teacher_cfg.top_k} exceeds the vocabulary of teacher.model "
                           f"{teacher_cfg.model!r} ({vocab_size} tokens); set teacher.top_k to at most {vocab_size}")
    return tokenizer, vocab_size


def refuse_legacy(url: str) -> None:
    """A cache whose shard plan counts tokenised examples (written before row-range plans)
    cannot be extended or checked against the data without tokenising all of it: refuse it
    by name instead of reporting a confusing list of differing keys."""
    from storage.cache import Cache, CacheMismatchError
    from storage.errors import ManifestError

    try:
        plan = Cache.open(url).manifest.shard_plan
    except ManifestError:
        return  # no cache yet (or a damaged one: create_or_open says which)
    if plan and "example_start" in plan[0] and "row_start" not in plan[0]:
        raise CacheMismatchError(
            f"the cache at {url} was written by an older atkd whose shard plan counts tokenised examples; "
            "this version plans shards by row ranges and identifies the data by its content, so it can "
            "neither extend that cache nor check it against the data. Stage two still reads it as it is "
            "(`atkd student`). To rebuild it for this version, use a new cache.path or delete the old cache.")


def explain_mismatch(error, path, identity):
    """Add what differs between the tokenizers when the fingerprints alone say 'different'."""
    from storage.cache import Cache, CacheMismatchError

    try:
        old = Cache.open(path).manifest.identity.get("tokenizer_info")
    except Exception:
        return error
    if not isinstance(old, dict) or old == identity["tokenizer_info"]:
        return error
    detail = describe_tokenizer_difference(old, identity["tokenizer_info"])
    return CacheMismatchError(f"{error}\nTokenizer (cache vs now): {detail or 'differs'}")




def expected_identity(data_cfg: DataConfig, teacher_cfg: TeacherConfig) -> dict:
    """The identity a cache built from this config has (no tokenisation of the data)."""
    tokenizer, vocab_size = check_teacher(teacher_cfg)
    return cache_identity(data_cfg, teacher_cfg, tokenizer, data_mod.open_source(data_cfg), vocab_size)


# Keys an older cache (shard plan by tokenised examples) computed differently: not comparable.
_LEGACY_DATA_KEYS = ("data_fingerprint", "num_rows", "num_examples", "data_format", "data_fields")


def check_for_students(cache, data_cfg: DataConfig, teacher_cfg: TeacherConfig) -> tuple[int, list[str]]:
    """Stage two's check that the cache was built from this config's teacher, tokenizer and data.

    Returns (top_k to train with, notes to print). A config top_k below the cache's
    uses the first top_k entries (said in a note); above it, or any other
    difference, raises CacheMismatchError naming every key with both values.
    """
    from storage.diff import changes
    from storage.errors import CacheMismatchError
    from storage.manifest import normalize_json

    have = cache.manifest.identity
    want = expected_identity(data_cfg, teacher_cfg)
    notes = []
    legacy = "num_rows" not in have
    skip = {"top_k", *(_LEGACY_DATA_KEYS if legacy else ())}
    tokenizer_differs = have.get("tokenizer_fingerprint") != want["tokenizer_fingerprint"]
    if tokenizer_differs:  # described in words below instead of key by key
        skip |= {"tokenizer_info"}
    diffs = changes(normalize_json(have), normalize_json(want), skip=skip)
    cached_k, k = int(have.get("top_k", want["top_k"])), int(want["top_k"])
    if k > cached_k:
        diffs.append(f"top_k: the cache holds the teacher's top-{cached_k}, teacher.top_k={k} asks for more")
    if diffs:
        detail = ""
        if tokenizer_differs:
            detail = "\nTokenizer (cache vs config): " + (describe_tokenizer_difference(
                have.get("tokenizer_info", {}), want["tokenizer_info"]) or "differs")
        raise CacheMismatchError(
            f"the teacher cache at {cache.url} was not built from this config, so the students would learn "
            "from another teacher or other data (cache -> config):\n  " + "\n  ".join(diffs) + detail
            + "\nPoint cache.path at the cache of this config, or run `atkd teacher` with a new cache.path.")
    if k < cached_k:
        notes.append(f"teacher.top_k={k} is below the cache's top-{cached_k}: students without loss.top_k train on "
                     f"the first {k} entries per position (deprecated: teacher.top_k says what stage one caches; "
                     f"set loss.top_k: {k} on those students instead)")
    if legacy:
        notes.append("the cache was written by an older atkd: its data was not checked against data.path")
    return k, notes
