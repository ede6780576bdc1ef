"""teacher.vllm_route: which vLLM route a teacher gets, the one line saying why it falls back,
the refusals naming the architecture, and the dry run's plan (no engine starts here)."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import yaml

from pipeline.config import ConfigError, load_config
from stages.errors import TeacherError
from stages.teacher.config import TeacherConfig
from stages.teacher.engines import planned_engine, resolve_route

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")


@pytest.fixture(scope="module")
def unknown_arch_dir(tmp_path_factory, tiny_llama_dir):
    """The tiny Llama relabelled as an architecture whose head atkd does not reproduce."""
    path = tmp_path_factory.mktemp("unknown") / "model"
    shutil.copytree(tiny_llama_dir, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["MysteryForCausalLM"]}))
    return path


def test_logprobs_is_taken_as_asked():
    assert resolve_route(TeacherConfig(model="anything", vllm_route="logprobs"))[0] == "logprobs"


def test_auto_falls_back_to_logprobs_with_one_line_naming_the_architecture(unknown_arch_dir, capsys):
    route, why = resolve_route(TeacherConfig(model=str(unknown_arch_dir)))
    err = capsys.readouterr().err
    assert route == "logprobs" and "MysteryForCausalLM" in why
    assert err.count("\n") == 1 and "[teacher] vLLM route: logprobs, because the output head of " \
        "MysteryForCausalLM is not one atkd reproduces" in err


def test_hidden_refuses_an_unreproduced_head_naming_it(unknown_arch_dir):
    with pytest.raises(TeacherError, match="teacher.vllm_route=hidden cannot serve .*MysteryForCausalLM"):
        resolve_route(TeacherConfig(model=str(unknown_arch_dir), vllm_route="hidden"))


@needs_vllm
def test_auto_takes_hidden_for_a_reproduced_head(tiny_llama_dir):
    route, why = resolve_route(TeacherConfig(model=str(tiny_llama_dir)))
    assert route == "hidden" and "hidden states as tensors" in why


def write(tmp_path, teacher: dict):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "data": {"path": "train.jsonl"},
                                    "teacher": teacher}))
    return path


def test_config_checks(tmp_path, unknown_arch_dir, tiny_llama_dir):
    with pytest.raises(ConfigError, match="teacher.vllm_route: hidden is a vLLM route, but teacher.backend is "
                                          "transformers"):
        load_config(write(tmp_path, {"model": str(tiny_llama_dir), "backend": "transformers", "vllm_route": "hidden"}))
    with pytest.raises(ConfigError, match="teacher.vllm_route: hidden cannot serve .*MysteryForCausalLM.*"
                                          "set teacher.vllm_route: auto"):
        load_config(write(tmp_path, {"model": str(unknown_arch_dir), "vllm_route": "hidden"}))
    with pytest.raises(ConfigError, match="teacher.vllm_route"):
        load_config(write(tmp_path, {"model": str(tiny_llama_dir), "vllm_route": "tensors"}))
    assert load_config(write(tmp_path, {"model": str(tiny_llama_dir), "vllm_route": "hidden"})).teacher.vllm_route \
        == "hidden"


@needs_vllm
@pytest.mark.parametrize("teacher, expected", [
    ({"backend": "transformers"}, "transformers (teacher.backend=transformers)"),
    ({}, "vLLM, hidden-state route"),
    ({"targets": "sampled"}, "vLLM, hidden-state route"),
    ({"vllm_route": "logprobs"}, "vLLM, prompt log-probs route (teacher.vllm_route=logprobs)"),
    ({"vllm_route": "logprobs", "targets": "sampled"}, "transformers (sampled targets with teacher.vllm_route"),
    ({"unknown": True}, "vLLM, prompt log-probs route (no hidden-state route: the output head of MysteryFor"),
    ({"unknown": True, "targets": "topk+sampled"}, "transformers (sampled targets need vLLM's hidden-state route"),
    ({"model": "not/built/yet"}, "decided once teacher.model exists: vLLM's hidden-state route if"),
    ({"model": "not/built/yet", "targets": "sampled"}, "decided once"),
])
def test_dry_run_plan(teacher, expected, tiny_llama_dir, unknown_arch_dir):
    model = str(unknown_arch_dir if teacher.pop("unknown", False) else tiny_llama_dir)
    assert planned_engine(TeacherConfig(**{"model": model, **teacher})).startswith(expected)


@needs_vllm
def test_auto_keeps_logprobs_where_vllm_has_no_native_model(tmp_path, tiny_tokenizer, capsys):
    """Pythia (GPTNeoX): atkd reproduces its head, but vLLM 0.32 serves it through its transformers
    backend, whose pooling runner does not start; auto says so and keeps the logprobs route."""
    from tests.support.architectures import make_tiny_model

    path = make_tiny_model(tmp_path / "pythia", tiny_tokenizer, "GPTNeoXForCausalLM")
    route, why = resolve_route(TeacherConfig(model=str(path)))
    assert route == "logprobs" and "through its generic transformers backend" in why
    assert "GPTNeoXForCausalLM" in capsys.readouterr().err


def test_token_pieces_bound_the_hidden_states_held_at_once():
    from stages.teacher.engine_vllm_hidden import token_pieces

    lengths = [5, 50, 7, 50, 20, 3, 64, 200, 1]
    pieces = token_pieces(lengths, 100)
    assert [i for p in pieces for i in p] == list(range(len(lengths)))  # consecutive, all, in order
    for p in pieces:
        assert sum(lengths[i] for i in p) <= 100 or len(p) == 1
    assert [list(p) for p in pieces] == [[0, 1, 2], [3, 4, 5], [6], [7], [8]]
