"""The embedded demo task: generated instruction data with a measurable answer.

Every response is one *phrasing* (free choice, picked at random) wrapped around
one *answer* (a pure function of the prompt):

    prompt:   "Add 37 and 58."
    response: "Sure! The answer is 95."      answer: "95"
              "95 is the answer."
              "Answer: 95"

So a trained teacher is confident on the answer tokens and uncertain on the
phrasing tokens (several continuations are all correct), as on real
instruction data, and the answer can be checked exactly (`extract_answer`).

Generation is a pure function of (seed, split, count): `random.Random` seeded
with a string is stable across Python runs and platforms. Evaluation rows
(validation and test) are never training rows, nor even training prompts:
- `sort`, `count` and `reverse` test computation on unseen inputs: their
  held-out prompts repeat no training prompt;
- the *fact* tasks (`add` of two digits and `lookup` in a fixed table) have a
  small input space that training covers by design (they test recall), so each
  fact is asked in one of several question wordings (`ADD_WORDINGS`,
  `LOOKUP_WORDINGS`), and one wording per fact, picked by the seed, is held
  out: training (and the teacher's pool) asks the fact only in its other
  wordings, evaluation only in the held-out one. A fact recurs in a new wording,
  as in a benchmark; the row does not. Every wording is seen in training, with
  other facts.
The sizes are chosen so a ~3M-parameter teacher learns them in a few CPU minutes.

The optional `teacher` split is the teacher's own, larger training pool (as in
the paper, the teacher knows more than the students' distillation data): its
prompts repeat none of the other three splits (the fact tasks' training
wordings aside), so the teacher cannot memorise the phrasing picked for a
student's example and its soft labels spread over the valid phrasings.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from storage.files import atomic_open

# Bump when the generator changes what it writes: cached data made by an older
# generator is then refused instead of silently mixed.
GENERATOR_VERSION = 2  # 2: fact tasks in several wordings, one per fact held out

TASKS = ("add", "sort", "count", "reverse", "lookup")
SPLITS = ("train", "validation", "test", "teacher")
EVAL_SPLITS = ("validation", "test")  # ask each fact in its held-out wording

# Free-choice parts. An answer never contains '.', so every phrasing parses back.
OPENERS = ("", "Sure! ", "OK. ", "Let me see. ")
PHRASINGS = ("The answer is {answer}.", "Answer: {answer}", "It is {answer}.", "{answer} is the answer.")

# A small fixed table for the lookup task (memorised, not computed).
LOOKUP_TABLE: dict[tuple[str, str], str] = {
    **{("color", k): v for k, v in {
        "banana": "yellow", "grass": "green", "sky": "blue", "snow": "white",
        "coal": "black", "tomato": "red", "orange": "orange", "plum": "purple",
    }.items()},
    **{("capital", k): v for k, v in {
        "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
        "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo",
    }.items()},
    **{("legs", k): v for k, v in {
        "a spider": "8", "an ant": "6", "a dog": "4", "a bird": "2",
        "a snake": "0", "a crab": "10", "a cat": "4", "a fish": "0",
    }.items()},
}
LOOKUP_WORDINGS: dict[str, tuple[str, ...]] = {
    "color": ("What color is {key}?", "Name the color of {key}.", "Which color does {key} have?"),
    "capital": ("What is the capital of {key}?", "Name the capital of {key}.", "Which city is the capital of {key}?"),
    "legs": ("How many legs does {key} have?", "Name the number of legs of {key}.", "How many legs has {key}?"),
}
ADD_WORDINGS = ("Add {a} and {b}.", "What is {a} plus {b}?", "Compute {a} + {b}.")
WORDINGS = len(ADD_WORDINGS)  # every fact task has this many; one per fact is held out for evaluation
FACT_TASKS = ("add", "lookup")  # small input spaces, fully covered by training (in other wordings)

_LETTERS = "abcdefghij"
_COUNT_LETTERS = "abc"

MAX_ADDEND = 9
ADD_FACTS = [(a, b) for a in range(MAX_ADDEND + 1) for b in range(MAX_ADDEND + 1)]
_LOOKUP_KEYS = sorted(LOOKUP_TABLE)


def held_out_wording(seed: int, task: str) -> dict:
    """fact -> index of its held-out wording. The facts (per relation for `lookup`) are shuffled by the
    seed and the wordings dealt in turn, so each wording is held out for about a third of them and seen
    in training with the rest."""
    groups = [ADD_FACTS] if task == "add" else [[f for f in _LOOKUP_KEYS if f[0] == r] for r in LOOKUP_WORDINGS]
    held = {}
    for g, facts in enumerate(groups):
        facts = list(facts)
        random.Random(f"atkd-demo-v{GENERATOR_VERSION}/{seed}/held-out/{task}/{g}").shuffle(facts)  # noqa: S311
        held.update({fact: i % WORDINGS for i, fact in enumerate(facts)})
    return held


def _wording(rng: random.Random, held_out: int, evaluation: bool) -> int:
    return held_out if evaluation else rng.choice([w for w in range(WORDINGS) if w != held_out])


def _add(rng: random.Random, held_out: dict, evaluation: bool) -> tuple[str, str]:
    a, b = rng.randint(0, MAX_ADDEND), rng.randint(0, MAX_ADDEND)
    wording = ADD_WORDINGS[_wording(rng, held_out[(a, b)], evaluation)]
    return wording.format(a=a, b=b), str(a + b)


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    return f"Sort: {' '.join(map(str, digits))}", " ".join(map(str, sorted(digits)))


def _count(rng: random.Random) -> tuple[str, str]:
    letter = rng.choice(_COUNT_LETTERS)
    seq = [rng.choice(_COUNT_LETTERS) for _ in range(rng.randint(3, 6))]
    return f"Count the letter {letter} in: {' '.join(seq)}", str(seq.count(letter))


def _reverse(rng: random.Random) -> tuple[str, str]:
    seq = [rng.choice(_LETTERS) for _ in range(rng.randint(3, 5))]
    return f"Reverse: {' '.join(seq)}", " ".join(reversed(seq))


def _lookup(rng: random.Random, held_out: dict, evaluation: bool) -> tuple[str, str]:
    relation, key = rng.choice(_LOOKUP_KEYS)
    wording = LOOKUP_WORDINGS[relation][_wording(rng, held_out[(relation, key)], evaluation)]
    return wording.format(key=key), LOOKUP_TABLE[(relation, key)]


_COMPUTED: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "sort": _sort, "count": _count, "reverse": _reverse,
}
_FACTS = {"add": _add, "lookup": _lookup}


def make_example(rng: random.Random, task: str, held_out: dict | None = None, evaluation: bool = False) -> dict:
    """One row: the prompt and answer of `task`, wrapped in a random phrasing.

    Fact tasks need `held_out` (held_out_wording's map): an `evaluation` row asks
    the fact in its held-out wording, any other row in one of the others."""
    if task in _FACTS:
        prompt, answer = _FACTS[task](rng, held_out, evaluation)
    else:
        prompt, answer = _COMPUTED[task](rng)
    response = rng.choice(OPENERS) + rng.choice(PHRASINGS).format(answer=answer)
    return {"prompt": prompt, "response": response, "answer": answer, "task": task}


def generate_split(seed: int, split: str, count: int, exclude_prompts: Iterable[str] = ()) -> list[dict]:
    """`count` rows of `split`, tasks in equal shares (round robin, then shuffled).

    Prompts in `exclude_prompts` (the training prompts, for held-out splits) are
    redrawn, except for FACT_TASKS, whose wordings keep evaluation and training
    apart instead (the module doc).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    rng = random.Random(f"atkd-demo-v{GENERATOR_VERSION}/{seed}/{split}")  # noqa: S311 - seeded demo data, no secret
    held_out = {task: held_out_wording(seed, task) for task in FACT_TASKS}
    excluded = set(exclude_prompts)
    rows = []
    for i in range(count):
        task = TASKS[i % len(TASKS)]
        for _ in range(1000):
            row = make_example(rng, task, held_out.get(task), split in EVAL_SPLITS)
            if task in FACT_TASKS or row["prompt"] not in excluded:
                break
        else:  # pragma: no cover - the input spaces are far larger than any split
            raise RuntimeError(f"could not draw a fresh {task!r} prompt for {split}")
        rows.append(row)
    rng.shuffle(rows)
    return rows


def generate_splits(seed: int, train: int, validation: int, test: int, teacher: int = 0) -> dict[str, list[dict]]:
    """The students' three splits, plus the teacher's pool when `teacher` > 0.

    No held-out prompt is a training prompt (or a teacher prompt), and teacher
    prompts repeat none of the three splits (the fact tasks' training wordings
    aside). Adding the teacher's pool leaves the other splits unchanged (each
    split draws from its own random stream).
    """
    rows = {"train": generate_split(seed, "train", train)}
    seen = {r["prompt"] for r in rows["train"]}
    rows["validation"] = generate_split(seed, "validation", validation, seen)
    seen |= {r["prompt"] for r in rows["validation"]}
    rows["test"] = generate_split(seed, "test", test, seen)
    if teacher:
        seen |= {r["prompt"] for r in rows["test"]}
        rows["teacher"] = generate_split(seed, "teacher", teacher, seen)
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    """Write rows as JSON lines, atomically (temporary file, then rename)."""
    path = Path(path)
    with atomic_open(path, encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------ answers

_OPENER_RE = "|".join(re.escape(o) for o in OPENERS if o)
_PHRASING_RES = [
    re.compile(rf"^(?:{_OPENER_RE})?" + re.escape(p).replace(re.escape("{answer}"), r"(?P<answer>[^.]+?)") + r"$")
    for p in PHRASINGS
]


def normalize_answer(answer: str) -> str:
    """Collapse runs of whitespace; the answers themselves are case-sensitive."""
    return " ".join(answer.split())


def extract_answer(text: str, task: str | None = None) -> str | None:
    """The answer inside a response in any of the task's phrasings, else None.

    Only the first line counts (a model that goes on after its answer has not
    given a clean response, but its first line is still judged). `task` is
    accepted for task-specific rules; every current task shares the phrasings.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown demo task {task!r}; expected one of {', '.join(TASKS)}")
    line = text.strip().split("\n", 1)[0].strip()
    for pattern in _PHRASING_RES:
        m = pattern.match(line)
        if m:
            return normalize_answer(m.group("answer"))
    return None


def compute_answer(prompt: str, task: str) -> str:
    """Recompute the answer from a prompt alone (a check on the generator)."""
    if task == "add":
        for wording in ADD_WORDINGS:
            pattern = re.escape(wording).replace(re.escape("{a}"), r"(\d+)").replace(re.escape("{b}"), r"(\d+)")
            m = re.fullmatch(pattern, prompt)
            if m:
                return str(int(m.group(1)) + int(m.group(2)))
        raise ValueError(f"prompt {prompt!r} is not an addition in a known wording")
    if task == "sort":
        return " ".join(sorted(prompt.removeprefix("Sort: ").split(), key=int))
    if task == "count":
        letter, seq = re.fullmatch(r"Count the letter (\w) in: (.*)", prompt).groups()
        return str(seq.split().count(letter))
    if task == "reverse":
        return " ".join(reversed(prompt.removeprefix("Reverse: ").split()))
    if task == "lookup":
        for (relation, key), value in LOOKUP_TABLE.items():
            if any(w.format(key=key) == prompt for w in LOOKUP_WORDINGS[relation]):
                return value
        raise ValueError(f"prompt {prompt!r} is not in the lookup table")
    raise ValueError(f"unknown demo task {task!r}")
