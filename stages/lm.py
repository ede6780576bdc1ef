"""Model-side helpers shared by stage two, evaluation and the demo teacher.

    pad_id(tokenizer)                        the id to pad with (pad, else EOS, else 0)
    collate_for_lm(examples, pad_id)         right-padded ids/mask + (row, position) of each target
    hidden_at_targets(model, ids, mask, row_batch, row_pos)   last hidden state at the targets [P, H]
    target_logits(model, ids, mask, row_batch, row_pos)       float32 logits at the targets [P, V]
    generate_greedy(model, tokenizer, rows, data_cfg)         greedy continuations of each row's prompt

Everything works on the trained targets only (gathered before the output
head), never on [B, L, V] logits: the vocabulary of a real model makes those
the largest tensor of a step.
"""

from __future__ import annotations

import torch


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id; tokenizers without one (GPT-2, Llama) pad with EOS, else 0.

    Padded positions are masked out and never targets, so the choice only has to be a valid id."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def collate_for_lm(examples, pad_id: int):
    """Right-padded input_ids/attention_mask of TokenizedExamples and the
    (row, position) of each trained target."""
    length = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    rows, positions = [], []
    for b, ex in enumerate(examples):
        ids[b, : len(ex.input_ids)] = torch.as_tensor(ex.input_ids)
        mask[b, : len(ex.input_ids)] = 1
        rows.extend([b] * len(ex.target_positions))
        positions.extend(int(t) for t in ex.target_positions)
    return ids, mask, torch.tensor(rows, dtype=torch.long), torch.tensor(positions, dtype=torch.long)


def hidden_at_targets(model, input_ids, attention_mask, row_batch, row_pos) -> torch.Tensor:
    """The base model's last hidden state [P, H] at positions (row_batch[i], row_pos[i]).

    Tensors are moved to the model's device (a no-op when they are there already)."""
    device = next(model.parameters()).device
    hidden = model.base_model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                              use_cache=False).last_hidden_state
    return hidden[row_batch.to(device), row_pos.to(device)]


def target_logits(model, input_ids, attention_mask, row_batch, row_pos) -> torch.Tensor:
    """float32 logits [P, V] at the given positions only (never [B, L, V])."""
    hidden = hidden_at_targets(model, input_ids, attention_mask, row_batch, row_pos)
    logits = model.get_output_embeddings()(hidden).float()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return softcap * torch.tanh(logits / softcap) if softcap else logits


@torch.no_grad()
def generate_greedy(model, tokenizer, rows: list[dict], data_cfg, *, max_new_tokens: int = 64,
                    batch_size: int = 32) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped) of each row's prompt, via
    transformers: batches of similar length, left padding, KV cache."""
    from stages.data import prompt_ids

    prompts = [prompt_ids(row, tokenizer, data_cfg, i) for i, row in enumerate(rows)]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    device = next(model.parameters()).device
    pad, eos = pad_id(tokenizer), tokenizer.eos_token_id
    texts: list[str] = [""] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        length = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, i in enumerate(idx):
            ids[b, length - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[b, length - len(prompts[i]) :] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                             use_cache=True)
        for b, i in enumerate(idx):
            texts[i] = decode_until_eos(tokenizer, out[b, length:].tolist(), eos)
    return texts


def decode_until_eos(tokenizer, ids: list[int], eos: int | None) -> str:
    """Decode up to (not including) the first EOS, special tokens dropped."""
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)
