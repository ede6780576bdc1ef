"""The output head atkd applies to final hidden states (stages/teacher/output_head.py), against
transformers' own forward in float64, for every architecture it lists; and the reasons it
gives for the checkpoints it cannot reproduce."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.support.architectures import ARCHITECTURES, make_tiny_model
from stages.teacher.output_head import HEADS, OutputHead, unsupported_reason

# Architectures whose head does more than a projection without bias: a plain projection must
# miss their logits, or the test would not show that the extra step is reproduced.
WITH_STEPS = {"Gemma2ForCausalLM", "Gemma3ForCausalLM", "CohereForCausalLM", "Cohere2ForCausalLM",
              "GraniteForCausalLM", "PhiForCausalLM"}


def test_every_listed_architecture_is_tested():
    assert set(HEADS) - {"Cohere2ForCausalLM"} == set(ARCHITECTURES)  # Cohere-2: Cohere's head (same code)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("heads")
    return {arch: make_tiny_model(root / arch, tiny_tokenizer, arch) for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_head_reproduces_transformers_logits_float64(model_dirs, arch):
    from transformers import AutoModelForCausalLM

    path = model_dirs[arch]
    assert unsupported_reason(str(path)) is None
    # experts_implementation: the default grouped matmul of MoE models has no float64 kernel
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()
    assert type(model).__name__ == arch
    ids = torch.arange(3, 60).unsqueeze(0)
    with torch.no_grad():
        reference = model(input_ids=ids).logits[0]
        hidden = model.base_model(input_ids=ids).last_hidden_state[0]
    loaded = OutputHead.load(str(path), dtype=torch.float64)  # from the checkpoint's tensors only
    assert loaded.weight.shape == (model.config.vocab_size, hidden.shape[-1])
    for head in (loaded, OutputHead.from_model(model)):
        torch.testing.assert_close(head(hidden), reference, rtol=0, atol=1e-10)
    plain = hidden @ loaded.weight.T
    if arch in WITH_STEPS:
        assert (plain - reference).abs().max() > 1e-2, "the extra step must matter on this model"
    else:
        torch.testing.assert_close(plain, reference, rtol=0, atol=1e-10)


def test_tied_head_is_read_from_the_embeddings(model_dirs):
    from safetensors import safe_open

    path = model_dirs["Qwen2ForCausalLM"]  # tie_word_embeddings: true
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    head = OutputHead.load(str(path))
    assert torch.equal(head.weight, embed) and "model.embed_tokens.weight" in head.describe()


def test_unknown_architecture_is_named(tmp_path, model_dirs):
    fake = tmp_path / "fake"
    shutil.copytree(model_dirs["LlamaForCausalLM"], fake)
    config = json.loads((fake / "config.json").read_text())
    (fake / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    assert "NoSuchModelForCausalLM" in unsupported_reason(str(fake))


def test_checkpoint_without_a_usable_head(tmp_path, model_dirs):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "headless"
    shutil.copytree(model_dirs["LlamaForCausalLM"], path)  # not tied: needs lm_head.weight
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    assert "none of lm_head.weight" in unsupported_reason(str(path))


def test_other_reasons(tmp_path, model_dirs):
    assert "not a local model directory" in unsupported_reason(str(tmp_path / "missing"))
    st = tmp_path / "st"
    shutil.copytree(model_dirs["LlamaForCausalLM"], st)
    (st / "modules.json").write_text("[]")
    assert "modules.json" in unsupported_reason(str(st))
    binary = tmp_path / "bin"
    shutil.copytree(model_dirs["LlamaForCausalLM"], binary)
    (binary / "model.safetensors").unlink()
    assert "no safetensors" in unsupported_reason(str(binary))


def test_sharded_checkpoint_index(tmp_path, tiny_tokenizer):
    """A checkpoint saved in several files: the head is found through model.safetensors.index.json."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path / "m", tiny_tokenizer, "LlamaForCausalLM")
    model = AutoModelForCausalLM.from_pretrained(path)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(OutputHead.load(str(tmp_path / "sharded")).weight, model.lm_head.weight, rtol=0,
                               atol=0)


def test_transformers_engine_scores_a_soft_capped_head(model_dirs):
    """Gemma-2's head is not a plain projection: the transformers engine (which refused it
    before it used this module) now passes its self-check and scores the capped log-probs."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from stages.data import TokenizedExample
    from stages.teacher.engine_hf import HFTeacherEngine

    path = str(model_dirs["Gemma2ForCausalLM"])
    ids = list(range(3, 40))
    example = TokenizedExample(0, ids, np.arange(len(ids) - 1, dtype=np.int32))
    engine = HFTeacherEngine(path, dtype="float32", device="cpu")
    try:
        rows = engine.score([example], 5)[0]
    finally:
        engine.close()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    top = reference.topk(5)
    np.testing.assert_allclose(rows.topk_logprobs, top.values.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(rows.topk_ids, top.indices.numpy())
    np.testing.assert_allclose(rows.target_logprobs, reference[torch.arange(len(ids) - 1), torch.tensor(ids[1:])],
                               rtol=0, atol=1e-5)
