"""Tiny random-weight causal LMs of several architectures, saved with their tokenizer like
a hub model: the output-head tests (tests/stages/teacher/test_output_head.py,
tests/stages/teacher/test_vllm_hidden.py) and the benchmarks build them here.

Every config has head_dim 64 (vLLM's CPU attention refuses 16; 64 is safe) and a
vocabulary of exactly the tokenizer's size unless `vocab` says otherwise.
`ARCHITECTURES` maps each transformers class name to (config class, config kwargs):
the kwargs are what that architecture needs beyond the shared sizes, chosen so
that its own step between the final hidden state and the logits is exercised
(Gemma-2's soft-capping, Cohere's logit_scale, Granite's logits_scaling, Phi's
head bias, OPT's project_out, tied embeddings).
"""

from __future__ import annotations

from pathlib import Path

HIDDEN, HEADS, HEAD_DIM = 128, 2, 64

_DECODER = dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                num_key_value_heads=HEADS, head_dim=HEAD_DIM, max_position_embeddings=512)

ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "LlamaForCausalLM": ("LlamaConfig", dict(_DECODER, tie_word_embeddings=False)),
    "MistralForCausalLM": ("MistralConfig", dict(_DECODER, tie_word_embeddings=False)),
    "MixtralForCausalLM": ("MixtralConfig", dict(_DECODER, num_local_experts=2, num_experts_per_tok=1,
                                                 tie_word_embeddings=False)),
    "Qwen2ForCausalLM": ("Qwen2Config", dict(_DECODER, tie_word_embeddings=True)),
    "Qwen3ForCausalLM": ("Qwen3Config", dict(_DECODER, tie_word_embeddings=False)),
    "GemmaForCausalLM": ("GemmaConfig", dict(_DECODER, tie_word_embeddings=True)),
    # final_logit_softcapping 3.0: random logits reach well past it, so the cap changes them
    "Gemma2ForCausalLM": ("Gemma2Config", dict(_DECODER, final_logit_softcapping=3.0, attn_logit_softcapping=None,
                                               query_pre_attn_scalar=HEAD_DIM, sliding_window=256,
                                               tie_word_embeddings=True)),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", dict(_DECODER, final_logit_softcapping=3.0,
                                                   query_pre_attn_scalar=HEAD_DIM, sliding_window=256,
                                                   tie_word_embeddings=True)),
    "CohereForCausalLM": ("CohereConfig", dict(_DECODER, logit_scale=0.37, tie_word_embeddings=True)),
    "GraniteForCausalLM": ("GraniteConfig", dict(_DECODER, logits_scaling=2.5, tie_word_embeddings=False)),
    "PhiForCausalLM": ("PhiConfig", dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                                         num_attention_heads=HEADS, max_position_embeddings=512,
                                         tie_word_embeddings=False)),
    "Phi3ForCausalLM": ("Phi3Config", dict(_DECODER, tie_word_embeddings=False, pad_token_id=None)),
    # OPT-350m's layout: no final layer norm (post-LN), a projection out of the hidden size
    "OPTForCausalLM": ("OPTConfig", dict(hidden_size=HIDDEN, ffn_dim=2 * HIDDEN, num_hidden_layers=2,
                                         num_attention_heads=HEADS, word_embed_proj_dim=HIDDEN // 2,
                                         do_layer_norm_before=False, max_position_embeddings=512,
                                         tie_word_embeddings=True)),
    "GPT2LMHeadModel": ("GPT2Config", dict(n_embd=HIDDEN, n_layer=2, n_head=HEADS, n_positions=512,
                                           tie_word_embeddings=True)),
    # Pythia's layout (the paper's other family): an untied head, hub checkpoints call it embed_out
    "GPTNeoXForCausalLM": ("GPTNeoXConfig", dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                                                 num_hidden_layers=2, num_attention_heads=HEADS,
                                                 max_position_embeddings=512, tie_word_embeddings=False)),
}


def make_tiny_model(out_dir: str | Path, tokenizer, architecture: str, *, seed: int = 0, init_std: float = 0.2,
                    vocab: int | None = None, dtype=None) -> Path:
    """A random-weight `architecture` (a key of ARCHITECTURES) saved with `tokenizer` to `out_dir`.

    `init_std` is large so next-token distributions are peaked (top-k orders well
    separated, comparable between engines). `dtype` (torch): the saved weights'."""
    import torch
    import transformers

    config_name, kwargs = ARCHITECTURES[architecture]
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if kwargs.get("pad_token_id", 0) is not None:
        special["pad_token_id"] = tokenizer.pad_token_id
    config = getattr(transformers, config_name)(**{**kwargs, **special, "vocab_size": vocab or len(tokenizer),
                                                   "initializer_range": init_std})
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():  # some architectures start norms/biases at constants; perturb so every step shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    if dtype is not None:
        model = model.to(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
