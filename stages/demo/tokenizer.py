"""A small byte-level BPE tokenizer trained on the demo data.

Digits are always single tokens (optionally with their leading space, e.g.
"Ġ7"), so numbers are spelled digit by digit and arithmetic stays learnable by
a tiny model; words get merged BPE tokens. Byte-level pre-tokenisation keeps
decoding exact (spaces and newlines round-trip). Only bytes seen in the data
enter the base alphabet; any other byte maps to <unk>.

Special tokens: <s> (bos), </s> (eos), <pad> (pad, distinct from eos), <unk>.
Like Llama's tokenizer it puts BOS in front of every encoded text (when
add_special_tokens is on); templating and the closing EOS are the data
stage's job (stages.data).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from stages.errors import DemoError

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0..3 in this order


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train the demo tokenizer on `texts` and return a PreTrainedTokenizerFast."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 64:
        raise DemoError(f"demo vocab_size must be >= 64, got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # Isolate each digit (with its optional leading space) before BPE sees it.
        pre_tokenizers.Split(Regex(r" ?[0-9]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_demo_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path):
    """Train and `save_pretrained` into out_dir; returns the tokenizer."""
    tokenizer = train_tokenizer(texts, vocab_size)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
