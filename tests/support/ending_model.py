"""For the generation stage's tests and benches: a tiny Llama that answers and ends its answers, a
random one briefly fine-tuned on short prompt/response rows (a random model almost never emits EOS,
so all its responses would be over-long)."""

from __future__ import annotations

from pathlib import Path


def short_rows(n: int, seed: int = 0) -> list[dict]:
    """prompt_response_rows with responses cut to a few words (they end early, as a trained model's)."""
    from tests.support.harness import prompt_response_rows

    return [{"prompt": r["prompt"], "response": " " + " ".join(r["response"].split()[:4])}
            for r in prompt_response_rows(n, seed=seed)]


def make_ending_llama(root: Path, *, steps: int = 120, seed: int = 0) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from stages.data import tokenize_rows
    from stages.data_config import DataConfig
    from stages.lm import collate_for_lm, pad_id
    from tests.support.harness import make_tiny_llama, make_tokenizer

    root = Path(root)
    tok = make_tokenizer(root / "tokenizer")
    path = make_tiny_llama(root / "model", tok, seed=seed, init_std=0.02)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    examples, _ = tokenize_rows(short_rows(256, seed=seed + 100), tok, DataConfig(max_seq_len=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(examples), (16,), generator=gen).tolist()
        ids, mask, rows, positions = collate_for_lm([examples[i] for i in idx], pad_id(tok))
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits[rows, positions], ids[rows, positions + 1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(path)
    return str(path)


def rounds_workspace(root: Path) -> dict:
    """An answering teacher, an answering student (fewer steps: it knows less) and 24 short rows."""
    from tests.support.harness import write_jsonl

    root = Path(root)
    return {"teacher": make_ending_llama(root / "t", seed=0),
            "student": make_ending_llama(root / "s", seed=1, steps=60),
            "data": str(write_jsonl(root / "train.jsonl", short_rows(24, seed=4)))}


def rounds_list(steps: int) -> list[dict]:
    """data -> SeqKD -> on-policy (2 samples per prompt, a quarter of the prompts keep the data's response)."""
    gen = {"backend": "transformers", "max_new_tokens": 12, "rows_per_shard": 8, "batch_size": 8}
    return [{"source": "data", "steps": steps},
            {"source": "teacher", "steps": steps, "generate": gen},
            {"source": "student", "steps": steps, "data_fraction": 0.25, "generate": {**gen, "n": 2, "top_p": 0.9}}]


def write_rounds_config(path: Path, run_dir: Path, ws: dict, rounds: list[dict]) -> str:
    """A pipeline.yaml: the transformers teacher, a cache of 8 rows per shard, student `op` with `rounds`."""
    import yaml

    cfg = {"run_dir": str(run_dir), "data": {"path": ws["data"], "max_seq_len": 64},
           "teacher": {"model": ws["teacher"], "backend": "transformers", "top_k": 8, "dtype": "float32",
                       "device": "cpu", "batch_tokens": 256},
           "cache": {"sequences_per_shard": 8},
           "students": [{"name": "op", "model": ws["student"], "loss": {"kind": "atkd", "chunk_size": 16},
                         "optim": {"lr": 1e-3, "warmup_steps": 1, "batch_size": 4}, "checkpoint_every": 1,
                         "seed": 0, "rounds": rounds}]}
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)
