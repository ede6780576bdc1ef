"""The teacher's output head, exactly as transformers applies it: final hidden states -> logits.

Both engines turn hidden states into logits here: the transformers engine on its
base model's output, vLLM's hidden-state route (engine_vllm_hidden.py) on the final
hidden states vLLM's pooling runner returns. Those are what transformers' base
model returns as `last_hidden_state` (after the final norm and, for OPT, its
`project_out`; checked in vLLM 0.32's model files and by the tests), so the head
below is the whole rest of the forward.

`HEADS` lists every architecture whose step from the final hidden state to the
logits was read in transformers' modeling code (5.19) and is tested against the
model's own forward (tests/stages/teacher/test_output_head.py):

    logits = hidden @ W.T (+ b)     W: `lm_head.weight` (Pythia: `embed_out`), or the input embeddings when
                                    config.tie_word_embeddings; b: Phi's head bias
    then  Gemma-2 / Gemma-3         cap * tanh(logits / cap), cap = config.final_logit_softcapping (if set)
          Cohere / Cohere-2         logits * config.logit_scale
          Granite                   logits / config.logits_scaling

in the weights' dtype, as transformers does (callers upcast to float32 for the
log-softmax). An architecture outside the table is not guessed:
`unsupported_reason` says why, and the route falls back or refuses (engines.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

_EMBED = "model.embed_tokens.weight"


@dataclass(frozen=True)
class HeadSteps:
    """What one architecture does after the final hidden state (config attribute names)."""

    embed: str = _EMBED  # checkpoint key of the input embeddings (the head when tied)
    head: tuple[str, ...] = ("lm_head.weight",)  # checkpoint keys the untied head may have
    bias: bool = False  # lm_head has a bias
    softcap: str | None = None  # cap * tanh(logits / cap)
    multiply: str | None = None  # logits * value
    divide: str | None = None  # logits / value


_PLAIN = HeadSteps()
HEADS: dict[str, HeadSteps] = {
    "LlamaForCausalLM": _PLAIN,
    "MistralForCausalLM": _PLAIN,
    "MixtralForCausalLM": _PLAIN,
    "Qwen2ForCausalLM": _PLAIN,
    "Qwen3ForCausalLM": _PLAIN,
    "GemmaForCausalLM": _PLAIN,  # Gemma scales the *input* embeddings by sqrt(hidden), not the head
    "Gemma2ForCausalLM": HeadSteps(softcap="final_logit_softcapping"),
    "Gemma3ForCausalLM": HeadSteps(softcap="final_logit_softcapping"),
    "CohereForCausalLM": HeadSteps(multiply="logit_scale"),
    "Cohere2ForCausalLM": HeadSteps(multiply="logit_scale"),
    "GraniteForCausalLM": HeadSteps(divide="logits_scaling"),
    "PhiForCausalLM": HeadSteps(bias=True),
    "Phi3ForCausalLM": _PLAIN,
    "OPTForCausalLM": HeadSteps(embed="model.decoder.embed_tokens.weight"),
    "GPT2LMHeadModel": HeadSteps(embed="transformer.wte.weight"),
    # Pythia; transformers 5 loads `embed_out` as lm_head and saves it back under that name
    "GPTNeoXForCausalLM": HeadSteps(embed="gpt_neox.embed_in.weight", head=("lm_head.weight", "embed_out.weight")),
}


class OutputHead:
    """hidden [n, H] -> logits [n, V] in the weights' dtype; `.weight` [V, H] on the head's device."""

    def __init__(self, weight, bias=None, *, softcap: float | None = None, multiply: float | None = None,
                 divide: float | None = None, architecture: str = "", source: str = ""):
        self.weight, self.bias = weight, bias
        self.softcap, self.multiply, self.divide = softcap, multiply, divide
        self.architecture, self.source = architecture, source

    def __call__(self, hidden):
        import torch.nn.functional as F

        logits = F.linear(hidden.to(self.weight.dtype), self.weight, self.bias)
        if self.softcap is not None:
            logits = (logits / self.softcap).tanh() * self.softcap
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.divide is not None:
            logits = logits / self.divide
        return logits

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias) if t is not None)

    def describe(self) -> str:
        steps = [f"softcap {self.softcap:g}" if self.softcap is not None else "",
                 f"x {self.multiply:g}" if self.multiply is not None else "",
                 f"/ {self.divide:g}" if self.divide is not None else "", "bias" if self.bias is not None else ""]
        extra = ", ".join(s for s in steps if s)
        return f"{self.architecture} head ({self.source}{', ' + extra if extra else ''})"

    @classmethod
    def from_model(cls, model) -> "OutputHead":
        """The head of a loaded transformers model of an architecture in HEADS (its own weights)."""
        arch = type(model).__name__
        layer = model.get_output_embeddings()
        return cls(layer.weight, getattr(layer, "bias", None), architecture=arch, source="the loaded model",
                   **_scalars(HEADS[arch], model.config))

    @classmethod
    def load(cls, model_dir: str, *, device: str = "cpu", dtype=None) -> "OutputHead":
        """Only the head's tensors, read from the checkpoint's safetensors files (call after
        `unsupported_reason(model_dir)` returned None)."""
        import torch

        arch, steps, config = _architecture(model_dir)
        tensors = _checkpoint_index(model_dir)
        w_key = _weight_key(steps, config, tensors)
        weight = _read(model_dir, tensors, w_key)
        bias = _read(model_dir, tensors, "lm_head.bias") if steps.bias else None
        dtype = dtype or weight.dtype
        move = dict(device=device, dtype=dtype)
        return cls(weight.to(**move), None if bias is None else bias.to(**move), architecture=arch,
                   source=f"{w_key}, {str(dtype).replace('torch.', '')} on {torch.device(device)}",
                   **_scalars(steps, config))


def unsupported_reason(model_dir: str) -> str | None:
    """Why atkd cannot reproduce this checkpoint's logits from its final hidden states (None: it can)."""
    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        return (f"teacher.model {model_dir!r} is not a local model directory (the hidden route reads the output "
                "head from its checkpoint files: download it first)")
    archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    if len(archs) != 1 or archs[0] not in HEADS:
        return (f"the output head of {', '.join(archs) or 'a model without config.architectures'} is not one atkd "
                f"reproduces (stages/teacher/output_head.py knows {len(HEADS)} architectures)")
    if (path / "modules.json").is_file():
        return "the directory has a sentence-transformers modules.json: vLLM's pooling runner would add its layers"
    _, steps, config = _architecture(model_dir)
    tensors = _checkpoint_index(model_dir)
    if not tensors:
        return "the checkpoint has no safetensors files (the hidden route reads the head from them)"
    try:
        _weight_key(steps, config, tensors)
    except KeyError as e:
        return str(e.args[0])
    if steps.bias and "lm_head.bias" not in tensors:
        return f"{archs[0]}'s head has a bias but the checkpoint holds no lm_head.bias"
    return None


# ---------------------------------------------------------------- internals
def _scalars(steps: HeadSteps, config) -> dict:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = {name: getattr(text, attr, None) if attr else None
             for name, attr in (("softcap", steps.softcap), ("multiply", steps.multiply), ("divide", steps.divide))}
    return {k: (None if v is None else float(v)) for k, v in value.items()}


def _architecture(model_dir: str):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)  # class defaults for what config.json leaves out
    arch = (config.architectures or [""])[0]
    return arch, HEADS[arch], config


def _checkpoint_index(model_dir: str) -> dict[str, str]:
    """tensor name -> safetensors file (relative), from the index or the single file's header."""
    path = Path(model_dir).expanduser()
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    if (path / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            return {k: "model.safetensors" for k in f.keys()}
    return {}


def _weight_key(steps: HeadSteps, config, tensors: dict[str, str]) -> str:
    """The checkpoint key of the head's weight: the embeddings when tied (as transformers ties
    them), else lm_head.weight. Old checkpoints may lack the base model prefix ("model.")."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))
    short = steps.embed.split(".", 1)[1]
    candidates = [steps.embed, short, *steps.head] if tied else list(steps.head)
    for key in candidates:
        if key in tensors:
            return key
    raise KeyError(f"the checkpoint holds none of {', '.join(candidates)} (the output head"
                   f"{', tied to the input embeddings' if tied else ''}): no usable head")


def _read(model_dir: str, tensors: dict[str, str], key: str):
    from safetensors import safe_open

    with safe_open(str(Path(model_dir).expanduser() / tensors[key]), framework="pt") as f:
        return f.get_tensor(key)
