"""Tiny, hub-free models, tokenizers and data files for tests (and benchmarks).

Everything here is built locally and saved with `save_pretrained`, so vLLM and
transformers load it from a directory like any hub model. Functions only; the
session-scoped pytest fixtures that call them live in tests/conftest.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_WORDS = (
    "the a one two three red green blue cat dog bird fish runs jumps sees eats "
    "big small fast slow and or but not is are was were here there today now "
    "add sum of plus minus equals answer question please tell me what why how"
).split()


def generated_text(n: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-sentences over a small word list (plus digits)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) if rng.random() > 0.15 else str(rng.randint(0, 99)) for _ in range(rng.randint(3, 14))]
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ""]))
    return lines


def make_tokenizer(out_dir: str | Path, vocab_size: int = 512, *, add_bos: bool = True, pad_is_eos: bool = True):
    """Train a byte-level BPE tokenizer on generated text, wrap it, save it.

    BOS is added by the tokenizer (TemplateProcessing) when `add_bos`; pad is the
    EOS token when `pad_is_eos` (the common Llama setup, and the case where a
    loss mask derived from token ids would wrongly drop EOS).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<unk>"] + ([] if pad_is_eos else ["<pad>"])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(generated_text(3000, seed=1) + ["### Instruction:\n### Response:\n"], trainer=trainer)
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>" if pad_is_eos else "<pad>",
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out)
    return wrapped


def make_tiny_llama(
    out_dir: str | Path,
    tokenizer,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 2,
    head_dim: int = 64,
    seed: int = 0,
    init_std: float = 0.2,
    max_positions: int = 512,
):
    """A random-weight LlamaConfig model saved (with its tokenizer) to `out_dir`.

    head_dim >= 32 because vLLM's CPU attention kernels refuse 16. `init_std`
    is large on purpose so the next-token distributions are peaked rather than
    near-uniform: top-k orders are then well separated and comparable between
    engines.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        initializer_range=init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return p


def prompt_response_rows(n: int, seed: int = 0) -> list[dict]:
    """Instruction rows of varied length (some long, for truncation tests)."""
    rng = random.Random(seed)
    prompts = generated_text(n, seed=seed + 10)
    responses = generated_text(n, seed=seed + 20)
    rows = []
    for i in range(n):
        resp = responses[i]
        if rng.random() < 0.2:
            resp = " ".join([resp] * rng.randint(2, 5))
        rows.append({"prompt": prompts[i], "response": " " + resp})
    return rows
