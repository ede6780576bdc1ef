"""Build the laptop-size stand-ins for configs/laptop-dolly.yaml: the paper's recipe on a CPU.

    python scripts/laptop_recipe.py [--out runs/laptop-dolly/workspace] [--rows 1200]
    atkd run configs/laptop-dolly.yaml

Writes, under --out:
  dolly.jsonl        generated rows in databricks-dolly-15k's schema: instruction,
                     context (empty in about 40% of rows, as in Dolly), response, category
  teacher-base/      a random-weight Llama standing in for the pretrained teacher (OPT-6.7B)
  student-base/      a smaller random-weight Llama standing in for the pretrained student (OPT-125M)
both saved with `save_pretrained` with one tokenizer trained on the rows, exactly as
hub models are loaded. The rows come from the demo's task generator
(stages/demo/task.py): checkable answers in free-choice phrasings; the tasks that
read an input carry it in `context`, the others have none.

Idempotent: an existing workspace built with the same arguments is kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.demo.task import generate_split  # noqa: E402
from storage.files import atomic_write  # noqa: E402

VERSION = 1


def dolly_row(row: dict) -> dict:
    """A demo row in Dolly's schema: tasks that read an input carry it in `context`."""
    task, prompt = row["task"], row["prompt"]
    if task == "count":  # "Count the letter a in: a b c"
        head, _, context = prompt.partition(" in: ")
        instruction, category = f"{head} in the input.", "closed_qa"
    elif task == "sort":  # "Sort: 3 1 4"
        instruction, context = "Sort the digits in the input from smallest to largest.", prompt[len("Sort: "):]
        category = "classification"
    elif task == "reverse":  # "Reverse: a b c"
        instruction, context = "Reverse the order of the letters in the input.", prompt[len("Reverse: "):]
        category = "information_extraction"
    else:  # add, lookup: the question is the whole instruction
        instruction, context, category = prompt, "", "open_qa"
    return {"instruction": instruction, "context": context, "response": row["response"], "category": category}


def build(out: Path, rows: int, seed: int = 0) -> Path:
    from tests.support.harness import make_tiny_llama
    from stages.demo.tokenizer import train_tokenizer

    stamp = {"version": VERSION, "rows": rows, "seed": seed}
    done = out / "done.json"
    if done.exists() and json.loads(done.read_text()) == stamp:
        print(f"[laptop-recipe] {out} is up to date")
        return out
    out.mkdir(parents=True, exist_ok=True)
    # Distinct rows only, as in Dolly: the generator's fact tasks repeat, and a repeated row
    # would land on both sides of the held-out split (evaluation refuses that).
    unique = {json.dumps(r, sort_keys=True): r for r in map(dolly_row, generate_split(seed, "train", 3 * rows))}
    if len(unique) < rows:
        raise SystemExit(f"the generator gives only {len(unique)} distinct rows; ask for fewer than {rows}")
    data = list(unique.values())[:rows]
    atomic_write(out / "dolly.jsonl", "".join(json.dumps(r) + "\n" for r in data))
    texts = [f"{r['instruction']}\n{r['context']}\n{r['response']}" for r in data]
    texts.append("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n### Input:\n### Response:\n")
    tokenizer = train_tokenizer(texts, vocab_size=384)
    make_tiny_llama(out / "teacher-base", tokenizer, hidden=128, layers=2, heads=2, head_dim=64,
                    seed=seed, init_std=0.02, max_positions=256)
    make_tiny_llama(out / "student-base", tokenizer, hidden=64, layers=2, heads=2, head_dim=32,
                    seed=seed + 1, init_std=0.02, max_positions=256)
    atomic_write(done, json.dumps(stamp))
    print(f"[laptop-recipe] wrote {rows} Dolly-schema rows and two stand-in models to {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/laptop-dolly/workspace")
    ap.add_argument("--rows", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    build(Path(args.out), args.rows, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
