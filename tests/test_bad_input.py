"""Bad input through the real CLI: a clear message (what, where, what to do), a
non-zero exit, and nothing completed lost. Plus the security rules of issue 6 (with
ruff's S rules and banned APIs, see pyproject.toml).

End-to-end cases run `python -m pipeline` as a subprocess; the many cheap
variations call `pipeline.cli.main` in this process (same code, exit code and
stderr); student runs use the warm forked processes of tests/support/harness.py. Those
that start processes are in the integration tier.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cli
from tests.support import harness as fh
from tests.support import fixtures
from tests.support.fixtures import atkd_here

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers


def atkd_subprocess(*args: str, timeout: float = 300) -> tuple[int, str]:
    env = {**os.environ, **fh.BASE_ENV, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=timeout)
    return p.returncode, p.stderr




@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_llama_dir, train_jsonl):
    """A complete reference cache (8 shards) built by `atkd teacher` in this process."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bad_input")
    ws = {"root": root, "model": str(tiny_llama_dir), "data": str(train_jsonl)}
    cfg = config(ws, "ref")
    assert cli.main(["teacher", str(cfg)]) == 0
    ws["ref_cache"] = str(root / "ref" / "cache")
    ws["ref_snapshot"] = fh.cache_snapshot(ws["ref_cache"])
    return ws


def config(ws, name: str, *, cache: str | None = None, **kw) -> Path:
    root = ws["root"]
    return fh.write_config(root / f"{name}.yaml", model=kw.pop("model", ws["model"]), data=kw.pop("data", ws["data"]),
                           run_dir=str(root / name), cache=cache or str(root / name / "cache"), **kw)


def copy_cache(ws, name: str) -> Path:
    dst = ws["root"] / name / "cache"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(ws["ref_cache"], dst)
    return dst


def chunk_files(shard_dir: Path, array: str) -> list[Path]:
    return sorted(p for p in (shard_dir / array).rglob("*") if p.is_file() and p.name != "zarr.json")


# ---------------------------------------------------------------- config


# Every case but the one under test is valid (data.path and teacher.model set).
D = "data: {path: x.jsonl}\n"
CONFIG_CASES = {
    "yaml_syntax": ("teacher: {model: x, top_k: [1, 2\n", [], ["line", "YAML syntax error"]),
    "unknown_key": (D + "teacher: {topk: 4}\n", [], ["teacher: unknown key(s) 'topk'", "allowed:", "top_k"]),
    "wrong_type": (D + "teacher: {top_k: many}\n", [], ["teacher.top_k: expected an integer, got 'many'"]),
    "missing_model": ("data: {path: x.jsonl}\n", [], ["teacher.model", "set the teacher's path"]),
    "top_k_zero": (D + "teacher: {model: m, top_k: 0}\n", [], ["teacher.top_k: must be > 0, got 0"]),
    "top_k_negative": (D + "teacher: {model: m}\n", ["teacher.top_k=-3"], ["teacher.top_k: must be > 0, got -3"]),
    "override_without_equals": (D + "teacher: {model: m}\n", ["teacher.top_k"],
                                ["'teacher.top_k' is neither a config file nor an override", "key.path=value"]),
    "override_empty_key": (D + "teacher: {model: m}\n", ["teacher..top_k=3"], ["empty key path"]),
    "override_bad_yaml": (D + "teacher: {model: m}\n", ["teacher.top_k=[1"], ["not valid YAML"]),
    "override_unknown_student": (D + "students: [{name: a, init: {hidden_size: 8}}]\nteacher: {model: m}\n",
                                 ["students.nobody.optim.lr=1"], ["no list item with index or name 'nobody'"]),
    "student_name_escapes": (D + "teacher: {model: m}\nstudents: [{name: ../evil, init: {hidden_size: 8}}]\n", [],
                             ["students[0].name", "not a valid name"]),
    "student_name_absolute": (D + "teacher: {model: m}\nstudents: [{name: /tmp/evil, init: {hidden_size: 8}}]\n", [],
                              ["not a valid name"]),
    "student_init_misspelled_key": (D + "teacher: {model: m}\nstudents: [{name: a, init: {hiden_size: 64}}]\n", [],
                                    ["students[0].init.hiden_size: not a field of LlamaConfig",
                                     "(did you mean hidden_size?)"]),
    "student_init_invalid_value": (D + "teacher: {model: m}\nstudents: [{name: a, init: {hidden_size: 64}}]\n",
                                   ["students.a.init.num_attention_heads=3"],
                                   ["students[0].init: invalid LlamaConfig: The hidden size (64) is not a multiple "
                                    "of the number of attention heads (3)"]),
    # issue 23, item 2: a placeholder typo would be cached as literal text in every prompt
    "template_placeholder_typo": ("data: {path: x.jsonl, prompt_field: instruction, template_fields: [instruction, "
                                  "input], template: \"{instruction}\\n[[Input: {inptu}\\n]]Response:\\n\"}\n"
                                  "teacher: {model: m}\n", [],
                                  ["data.template: {inptu} names no field (did you mean input?)",
                                   "the template can use {prompt}, {instruction}, {input}",
                                   "write {{inptu}} for a literal {inptu}"]),
    "template_field_not_listed": (D + "teacher: {model: m}\n", ['data.template="{prompt} {context}"'],
                                  ["data.template: {context} names no field; the template can use {prompt} (add a "
                                   "row field to data.template_fields to use it"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_errors_in_process(tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(tmp_path)  # the default run_dir is relative
    text, overrides, expected = CONFIG_CASES[case]
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    rc, err = atkd_here(capsys, "teacher", str(path), *overrides)
    assert rc == 2, err
    assert err.startswith("atkd: config error:"), err
    for piece in expected:
        assert piece in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs" / "default" / "students").exists()  # nothing was started
    rc, err = atkd_here(capsys, "run", str(path), *overrides, "--dry-run")  # --dry-run sees it too
    assert rc == 2 and all(piece in err for piece in expected), err


@pytest.mark.integration
def test_config_errors_end_to_end(tmp_path):
    """The same through `python -m pipeline`: exit 2, one line on stderr naming file, line and key."""
    path = tmp_path / "pipeline.yaml"
    path.write_text("teacher:\n  model: m\n  top_k: [1, 2\n")
    rc, err = atkd_subprocess("teacher", str(path))
    assert rc == 2 and f"{path} line" in err and "YAML syntax error" in err and "Traceback" not in err
    path.write_text("data: {path: x.jsonl}\nteacher: {model: m, backend: tpu}\n")
    rc, err = atkd_subprocess("teacher", str(path))
    assert rc == 2 and "teacher.backend: 'tpu' is not one of 'auto', 'vllm', 'transformers'" in err
    rc, err = atkd_subprocess("teacher", str(tmp_path / "missing.yaml"))
    assert rc == 2 and "missing.yaml" in err and "not found" in err
    path.write_text(f"run_dir: {tmp_path / 'run'}\ndata: {{path: x.jsonl}}\nteacher: {{model: m}}\n"
                    "students: [{name: a, init: {hidden_size: 64, num_attention_heads: 2}}]\n")
    rc, err = atkd_subprocess("student", str(path), "--student", "../escape")
    assert rc == 2 and "no student named '../escape'" in err


@pytest.mark.integration
def test_top_k_larger_than_vocabulary_is_refused_before_any_shard(ws):
    cfg = config(ws, "topk")
    rc, err = atkd_subprocess("teacher", str(cfg), "teacher.top_k=100000")
    assert rc == 1, err
    assert "teacher.top_k=100000 exceeds the vocabulary of teacher.model" in err
    assert "set teacher.top_k to at most 512" in err
    assert not (ws["root"] / "topk" / "cache").exists()


# ---------------------------------------------------------------- data


def _write(tmp_path: Path, name: str, rows) -> str:
    if rows is None:
        (tmp_path / name).write_text("")
        return str(tmp_path / name)
    return str(fixtures.write_jsonl(tmp_path / name, rows))


DATA_CASES = {
    "missing_file": (None, ["data.path=/nonexistent/train.jsonl"], ["/nonexistent/train.jsonl", "file not found",
                                                                    "check data.path"]),
    # the file and its 1-based line, and the keys the row really has
    "wrong_field_names": ([{"question": "q", "answer": "a"}], [], ["train.jsonl:1: field 'prompt' is missing",
                                                                   "the row has ['answer', 'question']",
                                                                   "data.*_field", "data.bad_rows=skip"]),
    "missing_response": ([{"prompt": "q", "response": "a"}] * 3 + [{"prompt": "q", "answer": "a"}], [],
                         ["train.jsonl:4: field 'response' is missing", "the row has ['answer', 'prompt']"]),
    "non_string_field": ([{"prompt": "q", "response": "a"}, {"prompt": "q", "response": 7}], [],
                         ["train.jsonl:2: field 'response' must be a string, got int 7", "data.bad_rows=skip"]),
    "malformed_json_line": ("text:" + '{"prompt": "q", "response": "a"}\n\n{"prompt": "q", "resp\n', [],
                            ["train.jsonl:3: not valid JSON (Invalid control character at column 22)",
                             "Fix that line (one JSON object per line)", "data.bad_rows=skip",
                             "!data.*_field", "!line 1 column"]),  # "!": must not appear
    "empty_dataset": ("empty", [], ["has no rows", "check data.path"]),
    "all_rows_overlong": ("ref", ["data.max_seq_len=4", "data.overlong=skip"],
                          ["5 of 5 rows (100%) were dropped", "> data.max_seq_len=4",
                           "raise data.max_seq_len or set data.overlong=truncate", "data.max_dropped_fraction"]),
    # truncation is already on: the advice is to raise max_seq_len, not to set overlong=truncate
    "truncated_prompts_fill_max_seq_len": ("ref", ["data.max_seq_len=8"],
                                           ["rows (100%) were dropped", "no trained target is left",
                                            "raise data.max_seq_len (prompts alone fill it)"]),
    "most_rows_dropped": ("ref", ["data.max_seq_len=16"],
                          ["were dropped", "more than data.max_dropped_fraction=0.1",
                           "set data.max_dropped_fraction to a larger share"]),
    "response_tokenises_to_nothing": ([{"prompt": "q", "response": ""}], [],
                                      ["train.jsonl:1: field 'response' tokenises to nothing", "Fix that row"]),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_data_errors(ws, tmp_path, capsys, case):
    rows, overrides, expected = DATA_CASES[case]
    if rows == "empty":
        data = _write(tmp_path, "train.jsonl", None)
    elif isinstance(rows, str) and rows.startswith("text:"):
        (tmp_path / "train.jsonl").write_text(rows[len("text:"):])
        data = str(tmp_path / "train.jsonl")
    elif rows == "ref" or rows is None:
        data = ws["data"]
    else:
        data = _write(tmp_path, "train.jsonl", rows)
    cfg = config(ws, f"data-{case}", data=data)
    rc, err = atkd_here(capsys, "teacher", str(cfg), *overrides)
    assert rc == 1, err
    assert "atkd: DataError:" in err
    assert "Failed to load JSON" not in err  # no library noise before the project's message
    for piece in expected:
        assert (piece[1:] not in err) if piece.startswith("!") else (piece in err), err
    assert "set data.overlong=truncate" not in err or "overlong=skip" in " ".join(overrides)
    if rows not in (None, "ref"):
        assert data in err  # where: the file
    assert not (ws["root"] / f"data-{case}" / "cache").exists()  # refused before the cache exists


# ---------------------------------------------------------------- models


def test_teacher_model_path_missing(ws, capsys):
    rc, err = atkd_here(capsys, "teacher", str(config(ws, "nomodel", model="/nonexistent/teacher")))
    assert rc == 1
    assert "teacher.model '/nonexistent/teacher': no such directory" in err and "set teacher.model" in err


def test_missing_model_paths_name_their_setting(ws, capsys):
    """issue 23, item 8: before any engine starts (two caches: one engine would start first), not the hub's
    'Repo id must be in the form', nor 'vLLM failed to start'; a student's model, not 'the tokenizer'."""
    cfg = config(ws, "nomodel-run", model="/nonexistent/teacher",
                 extra={"data": {"path": ws["data"], "max_seq_len": 64, "holdout": {"validation": 5, "test": 5}},
                        "eval": {"max_examples": 4}})
    rc, err = atkd_here(capsys, "run", str(cfg), "teacher.backend=auto")
    assert rc == 1, err
    assert "teacher.model '/nonexistent/teacher': no such directory; set teacher.model" in err
    assert "Repo id" not in err and "vLLM failed to start" not in err and "not using vLLM" not in err
    cfg = config(ws, "nostudent", cache=ws["ref_cache"])
    rc, err = atkd_here(capsys, "student", str(cfg), "students.s1.init=null", "students.s1.model=/nonexistent/student")
    assert rc == 1, err
    assert "students[0].model '/nonexistent/student': no such directory" in err and "tokenizer" not in err
    assert not (ws["root"] / "nostudent" / "students").exists()


def test_messages_name_the_setting_that_is_wrong(ws, tmp_path, capsys):
    """issue 23, item 9: eval.path (not data.path); the student's tokenizer setting, said in words."""
    cfg = config(ws, "msgs", cache=ws["ref_cache"])
    rc, err = atkd_here(capsys, "eval", str(cfg), "eval.path=/nonexistent/test.jsonl")
    assert rc == 1 and "eval.path '/nonexistent/test.jsonl': file not found; check eval.path" in err, err
    assert "data.path" not in err
    other = tmp_path / "no-bos-tokenizer"
    fixtures.make_tokenizer(other, add_bos=False)
    rc, err = atkd_here(capsys, "student", str(cfg), f"students.s1.tokenizer={other}")
    assert rc == 1, err
    assert "VocabularyMismatchError: student 's1' does not match the cache's vocabulary: its tokenizer (from " \
           "students.s1.tokenizer) is not the one the cache was written with" in err
    assert "special tokens around a text: the first adds nothing, the second id(s) [0] before it" in err
    assert "set students.s1.tokenizer to teacher.model's directory" in err
    assert "tokenizer_path" not in err and "[[" not in err
    assert not (ws["root"] / "msgs" / "students").exists()  # a failed first attempt leaves no empty directory


def test_a_typo_in_a_sweep_variant_is_reported_where_it_was_made(ws, tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"config: {config(ws, 'sweep')}\nout_dir: {tmp_path / 'out'}\nseeds: [0]\n"
                     "variants:\n  - {name: s1-hr, from: s1, set: {loss.hard_ratoi: 0.3}}\n")
    rc, err = atkd_here(capsys, "sweep", str(sweep), "--dry-run")
    assert rc == 2, err
    assert f"{sweep}: variants[0].set.loss: unknown key(s) 'hard_ratoi'" in err and "students[" not in err


def test_a_deleted_shard_is_a_storage_problem_and_verify_names_it(ws, capsys):
    cache = copy_cache(ws, "deleted")
    shutil.rmtree(cache / "shards" / "shard-00003.zarr")  # the manifest still lists it as done
    cfg = config(ws, "deleted", cache=str(cache))
    rc, err = atkd_here(capsys, "student", str(cfg))
    assert rc == 1, err
    assert (f"atkd: CacheNotReadyError: the teacher cache {cache} is not complete: 7 of 8 shards, missing shard(s) 3; "
            "run `atkd teacher`") in err and "config error" not in err
    rc, report = atkd_here(capsys, "verify", str(cache))
    assert rc == 1
    assert f"BAD shard 3 ({cache}/shards/shard-00003.zarr)" in report and "(?)" not in report
    assert "the manifest lists it as done, but the shard is missing" in report


def test_teacher_tokenizer_missing(ws, tmp_path, capsys):
    model = tmp_path / "no-tokenizer"
    model.mkdir()
    for f in Path(ws["model"]).iterdir():
        if f.name in ("config.json", "generation_config.json", "model.safetensors"):
            shutil.copy(f, model / f.name)
    rc, err = atkd_here(capsys, "teacher", str(config(ws, "notok", model=str(model))))
    assert rc == 1
    assert f"teacher.model '{model}': cannot load its tokenizer" in err
    assert "tokenizer.save_pretrained" in err


@pytest.mark.parametrize("case", ["other_teacher", "other_data", "more_top_k"])
def test_student_refuses_a_cache_of_another_config(ws, tmp_path, capsys, other_llama_dir, case):
    rows = fixtures.prompt_response_rows(40)
    rows[3] = {"prompt": "another prompt", "response": "another answer"}
    kw = {"other_teacher": {"model": str(other_llama_dir)},
          "other_data": {"data": _write(tmp_path, "other.jsonl", rows)}}.get(case, {})
    cfg = config(ws, f"mismatch-{case}", cache=ws["ref_cache"], **kw)
    overrides = ["teacher.top_k=16"] if case == "more_top_k" else []
    rc, err = atkd_here(capsys, "student", str(cfg), *overrides)
    assert rc == 1, err
    assert "atkd: CacheMismatchError: the teacher cache at" in err and "was not built from this config" in err
    expected = {"other_teacher": '\n  teacher_fingerprint: "sha256:', "other_data": '\n  data_fingerprint: "sha256:',
                "more_top_k": "the cache holds the teacher's top-8, teacher.top_k=16 asks for more"}[case]
    assert expected in err, err
    assert not (ws["root"] / f"mismatch-{case}" / "students").exists()
    rc, out = atkd_here(capsys, "status", str(cfg), *overrides)
    assert rc == 0 and "MISMATCH:" in out and expected in out


def test_student_with_fewer_top_k_than_the_cache_says_so(ws, capsys):
    """The old way (teacher.top_k below the cache's) still trains on the first k, with a deprecation line;
    loss.top_k, the student's own setting, does the same without it and records the same k."""
    cfg = config(ws, "fewer-k", cache=ws["ref_cache"])
    rc, out = atkd_here(capsys, "student", str(cfg), "teacher.top_k=4", "students.s1.optim.max_steps=2")
    assert rc == 0, out
    assert "teacher.top_k=4 is below the cache's top-8" in out and "(deprecated: " in out
    old = json.loads((ws["root"] / "fewer-k" / "students" / "s1" / "done.json").read_text())["trained_from"]
    assert old["data"]["top_k"] == 4 and "top_k" not in old["loss"]
    cfg = config(ws, "own-k", cache=ws["ref_cache"])
    rc, out = atkd_here(capsys, "student", str(cfg), "students.s1.loss.top_k=4", "students.s1.optim.max_steps=2")
    assert rc == 0, out
    assert "deprecated" not in out and "trains on the first 4 top-k entries per position (loss.top_k)" in out
    own = json.loads((ws["root"] / "own-k" / "students" / "s1" / "done.json").read_text())["trained_from"]
    assert own["data"] == old["data"]  # same cache, same k: the same record whichever way k was set
    rc, out = atkd_here(capsys, "student", str(cfg), "students.s1.loss.top_k=16")
    assert rc == 2 and "students[0].loss.top_k: 16 is more than stage one caches (teacher.top_k=8)" in out


_VLLM_PROBE = """
import json, sys
from pipeline.config import TeacherConfig
from stages.teacher.engines import make_engine
model = sys.argv[1]
engine = make_engine(TeacherConfig(model=model, backend="auto", device="cpu", dtype="float32"))
out = {"auto": engine.name, "reason": engine.choice_reason}
try:
    make_engine(TeacherConfig(model=model, backend="vllm", device="cpu", dtype="float32"))
    out["vllm"] = "started"
except ValueError as e:
    out["vllm"] = str(e)
print(json.dumps(out))
"""


@pytest.mark.integration
@pytest.mark.vllm
def test_architecture_vllm_does_not_support_falls_back_or_says_so(ws, tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    model = tmp_path / "odd-arch"
    shutil.copytree(ws["model"], model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["AtkdTestOnlyForCausalLM"]  # transformers loads it by model_type (llama)
    (model / "config.json").write_text(json.dumps(cfg))
    env = {**os.environ, **fh.BASE_ENV, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", _VLLM_PROBE, str(model)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["auto"] == "transformers"
    assert "vLLM has no implementation of AtkdTestOnlyForCausalLM" in out["reason"]
    assert "not using vLLM: vLLM has no implementation of AtkdTestOnlyForCausalLM" in p.stderr
    assert "teacher.backend=vllm cannot serve" in out["vllm"] and "teacher.backend=transformers" in out["vllm"]


# ---------------------------------------------------------------- cache


def _truncate(cache: Path) -> str:
    f = chunk_files(cache / "shards" / "shard-00001.zarr", "topk_ids")[0]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return "array 'topk_ids' cannot be decoded"


def _flip(cache: Path) -> str:
    f = chunk_files(cache / "shards" / "shard-00001.zarr", "topk_logprobs")[0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return "array 'topk_logprobs' fails its checksum"


def _drop_array(cache: Path) -> str:
    shutil.rmtree(cache / "shards" / "shard-00001.zarr" / "target_logprobs")
    return "array 'target_logprobs' is missing"


@pytest.mark.parametrize("damage", [_truncate, _flip, _drop_array], ids=["truncated", "byte_flipped", "array_missing"])
def test_damaged_shard_is_named_and_the_advice_repairs_it(ws, capsys, damage):
    name = f"damaged-{damage.__name__.strip('_')}"
    cache = copy_cache(ws, name)
    problem = damage(cache)
    rc, report = atkd_here(capsys, "verify", str(cache))
    assert rc == 1
    cfg = config(ws, name, cache=str(cache))
    assert f"BAD shard 1 ({cache}/shards/shard-00001.zarr)" in report and problem in report
    assert "Delete each bad shard directory and rerun the teacher stage" in report and "FAILED" in report
    # The advice works and keeps everything else: delete the shard, rerun the teacher.
    untouched = (cache / "shards" / "shard-00000.zarr" / "zarr.json").stat().st_mtime_ns
    shutil.rmtree(cache / "shards" / "shard-00001.zarr")
    rc, err = atkd_here(capsys, "teacher", str(cfg))
    assert rc == 0, err
    assert (cache / "shards" / "shard-00000.zarr" / "zarr.json").stat().st_mtime_ns == untouched
    assert fh.compare_caches(fh.cache_snapshot(str(cache)), ws["ref_snapshot"]) == []


@pytest.mark.integration
def test_student_on_a_damaged_shard_names_it(ws):
    cache = copy_cache(ws, "student-damaged")
    _flip(cache)
    rc, out = fh.run_atkd(["student", str(config(ws, "student-damaged", cache=str(cache)))],
                          ws["root"] / "logs" / "student-damaged.log")
    assert rc == 1
    assert f"CorruptShardError: shard {cache}/shards/shard-00001.zarr is unusable" in out
    assert "Run `atkd verify`" in out


def test_manifest_missing(ws, capsys):
    cache = copy_cache(ws, "nomanifest")
    (cache / "manifest.json").unlink()
    rc, text = atkd_here(capsys, "verify", str(cache))
    assert rc == 1 and f"{cache}/manifest.json does not exist. Run the teacher stage" in text
    cfg = config(ws, "nomanifest", cache=str(cache))
    rc, err = atkd_here(capsys, "student", str(cfg))
    assert rc == 1 and f"CacheNotReadyError: the teacher cache {cache} does not exist (no manifest.json); run " \
        "`atkd teacher` first" in err
    # The teacher rebuilds the manifest around the committed shards without rewriting them.
    before = {p.parent.name: p.stat().st_mtime_ns for p in (cache / "shards").glob("*/zarr.json")}
    rc, err = atkd_here(capsys, "teacher", str(cfg))
    assert rc == 0, err
    assert {p.parent.name: p.stat().st_mtime_ns for p in (cache / "shards").glob("*/zarr.json")} == before
    assert fh.compare_caches(fh.cache_snapshot(str(cache)), ws["ref_snapshot"]) == []


@pytest.mark.parametrize("command", ["verify", "teacher", "student"])
def test_manifest_of_another_format_version(ws, capsys, command):
    cache = copy_cache(ws, f"version-{command}")
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["format_version"] = 99
    (cache / "manifest.json").write_text(json.dumps(manifest))
    target = str(cache) if command == "verify" else str(config(ws, f"version-{command}", cache=str(cache)))
    rc, text = atkd_here(capsys, command, target)
    assert rc == 1
    assert "cache format version 99; this code reads versions 1, 2" in text
    assert "Use the matching atkd release, or rebuild the cache" in text
    assert json.loads((cache / "manifest.json").read_text())["format_version"] == 99  # not overwritten


@pytest.mark.integration
def test_cache_written_by_another_teacher_is_refused(ws, other_llama_dir):
    cache = copy_cache(ws, "otherteacher")
    cfg = config(ws, "otherteacher", cache=str(cache), model=str(other_llama_dir))
    rc, err = atkd_subprocess("teacher", str(cfg))
    assert rc == 1, err
    assert "CacheMismatchError" in err and f"the cache at {cache} was built with a different configuration" in err
    assert '\n  identity.teacher_fingerprint: "sha256:' in err and "(cache -> requested)" in err
    assert "Use a new cache path for the new configuration" in err
    assert fh.compare_caches(fh.cache_snapshot(str(cache)), ws["ref_snapshot"]) == []


def test_disk_full_during_a_shard_write(ws, capsys, monkeypatch):
    import zarr.storage

    cfg = config(ws, "diskfull")
    cache = ws["root"] / "diskfull" / "cache"
    set_ = zarr.storage.LocalStore.set
    calls = {"n": 0}

    async def set_until_full(self, key, value):
        calls["n"] += 1
        if calls["n"] > 30:  # a few shards in, the disk fills up in the middle of one
            raise OSError(errno.ENOSPC, "No space left on device", str(self.root / key))
        return await set_(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", set_until_full)
    rc, err = atkd_here(capsys, "teacher", str(cfg))
    assert rc == 1
    assert "failed (No space left on device); nothing of this shard was committed" in err
    assert f"to {cache}/shards/shard-0000" in err
    assert "the disk (or quota) is full: free space" in err and "rerun the same command to continue" in err
    done = sorted(p.name for p in (cache / "shards").glob("shard-*.zarr"))
    assert done and len(done) < 8
    assert not [p for p in (cache / "shards").iterdir() if ".partial-" in p.name]  # the half shard is removed
    rc, _ = atkd_here(capsys, "verify", str(cache))
    assert rc == 0  # the committed shards are valid; the rest are pending
    monkeypatch.setattr(zarr.storage.LocalStore, "set", set_)
    snap = fh.cache_snapshot(str(cache))
    assert all(fh.compare_caches({"manifest": {}, "shards": {n: snap["shards"][n]}},
                                 {"manifest": {}, "shards": {n: ws["ref_snapshot"]["shards"][n]}}) == []
               for n in done)
    rc, err = atkd_here(capsys, "teacher", str(cfg))  # space freed: the rerun finishes the cache
    assert rc == 0, err
    assert fh.compare_caches(fh.cache_snapshot(str(cache)), ws["ref_snapshot"]) == []


@contextlib.contextmanager
def immutable(path: Path):
    """A directory tree even root cannot change (chattr +i); skip where unsupported."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not available")
    if subprocess.run(["chattr", "-R", "+i", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["chattr", "-R", "-i", str(path)], capture_output=True)
        pytest.skip("this filesystem does not support immutable files")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-R", "-i", str(path)], check=True)


@pytest.mark.integration
def test_read_only_cache_directory(ws, capsys):
    cache = copy_cache(ws, "readonly")
    shutil.rmtree(cache / "shards" / "shard-00007.zarr")
    partial = ws["root"] / "readonly-full" / "cache"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(ws["ref_cache"], partial)
    with immutable(cache), immutable(partial):
        if os.access(cache, os.W_OK) and _can_create(cache):
            pytest.skip("the immutable flag does not stop writes here")
        # Incomplete cache: stage one cannot write; it says where and what to do.
        rc, err = atkd_here(capsys, "teacher", str(config(ws, "readonly", cache=str(cache))))
        assert rc == 1
        assert "cannot write" in err and str(cache) in err and "make its directory writable" in err
        # Complete cache: reading needs no write access (verify, stage one's skip, students).
        rc, _ = atkd_here(capsys, "verify", str(partial))
        assert rc == 0
        cfg = config(ws, "readonly-full", cache=str(partial))
        rc, err = atkd_here(capsys, "teacher", str(cfg))
        assert rc == 0, err
        rc, out = fh.run_atkd(["student", str(cfg), "students.s1.optim.max_steps=2"],
                              ws["root"] / "logs" / "readonly-student.log")
        assert rc == 0, out
    assert sorted(p.name for p in (cache / "shards").iterdir()) == [f"shard-{i:05d}.zarr" for i in range(7)]


def _can_create(path: Path) -> bool:
    try:
        (path / ".probe").write_text("")
    except OSError:
        return False
    (path / ".probe").unlink()
    return True


# ---------------------------------------------------------------- security


@pytest.fixture(scope="module")
def ref_student(ws):
    """A finished student run (stage two's resume and checkpoint fallback: tests/stages/student/test_trainer.py)."""
    cfg = config(ws, "ref-student", cache=ws["ref_cache"])
    rc, out = fh.run_atkd(["student", str(cfg)], ws["root"] / "logs" / "ref-student.log")
    assert rc == 0, out
    return fh.student_snapshot(ws["root"] / "ref-student" / "students" / "s1")


# Unsafe calls (pickle and torch.load / np.load of user files, eval/exec, shell=True, yaml.load, ...)
# are ruff's S rules and banned APIs (pyproject.toml [tool.ruff], run by scripts/test.sh). What no
# linter rule can say: the hub-loading keywords below are never hard-coded unsafe.
UNSAFE_KEYWORDS = {"trust_remote_code": True, "use_safetensors": False}


def unsafe_keywords(paths) -> list[str]:
    bad = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                for k in node.keywords:
                    if k.arg in UNSAFE_KEYWORDS and isinstance(k.value, ast.Constant) \
                            and k.value.value is UNSAFE_KEYWORDS[k.arg]:
                        bad.append(f"{path}:{node.lineno}: {k.arg}={k.value.value}")
    return bad


def test_remote_code_and_pickled_weights_are_never_hard_coded_on(tmp_path):
    sources = sorted(p for d in ("pipeline", "stages", "storage") for p in (REPO / d).rglob("*.py"))
    assert len(sources) > 20 and unsafe_keywords(sources) == []
    (tmp_path / "bad.py").write_text("m = f(x, trust_remote_code=True)\nn = g(use_safetensors=False)\n")
    assert len(unsafe_keywords([tmp_path / "bad.py"])) == 2  # the check can fail
    from pipeline.config import TeacherConfig

    assert TeacherConfig().trust_remote_code is False


def test_optimizer_state_with_a_pickle_payload_is_refused(tmp_path):
    import pickle

    import torch

    from stages.training import checkpoint as ckpt

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    ckpt.save_checkpoint(tmp_path, 2, model_state={"w": torch.zeros(2)}, optim_state={"state": {}}, meta={}, keep=2)
    path = ckpt.step_dir(tmp_path, 2)
    (path / ckpt.OPTIM_FILE).write_bytes(pickle.dumps({"state": Payload()}))
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_optim_state(path)
    assert not marker.exists()


def test_remote_code_in_a_model_directory_is_not_run(ws, tmp_path, capsys):
    """A teacher directory carrying custom code (auto_map) is loaded without executing it."""
    marker = tmp_path / "remote-code-ran"
    model = tmp_path / "custom-code"
    shutil.copytree(ws["model"], model)
    (model / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                   "from transformers import LlamaConfig as EvilConfig\n"
                                   "from transformers import LlamaForCausalLM as EvilModel\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(cfg))
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    atkd_here(capsys, "teacher", str(config(ws, "remote-code", model=str(model))))
    assert not marker.exists()


def test_trust_remote_code_reaches_transformers_only_when_configured(ws, monkeypatch):
    import transformers

    from pipeline.config import TeacherConfig
    from stages.teacher import engines, identity

    seen = []

    def spy(cls_name, original):
        def call(*args, **kwargs):
            seen.append((cls_name, kwargs.get("trust_remote_code")))
            return original(*args, **kwargs)
        return call

    for cls in (transformers.AutoTokenizer, transformers.AutoConfig, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", spy(cls.__name__, cls.from_pretrained))
    for trust in (False, True):
        seen.clear()
        cfg = TeacherConfig(model=ws["model"], backend="transformers", device="cpu", dtype="float32",
                            trust_remote_code=trust)
        identity.load_tokenizer(cfg.model, cfg.trust_remote_code)
        identity.model_vocab_size(cfg.model, cfg.trust_remote_code)
        engines.make_hf_engine(cfg).close()
        assert {name for name, _ in seen} >= {"AutoTokenizer", "AutoConfig", "AutoModelForCausalLM"}
        assert all(value is trust for _, value in seen), seen


def test_student_and_shard_names_cannot_escape(ws, tmp_path):
    from pipeline.config import ConfigError, check_name, load_config
    from pipeline.orchestrator import student_dir
    from storage.cache import Cache

    for name in ("..", "../x", "a/../../b", "/etc", "~root", "a\\b", ""):
        with pytest.raises(ConfigError, match="not a valid name"):
            check_name(name, "students[0].name")
    cfg = load_config(config(ws, "names"))
    with pytest.raises(ConfigError):
        student_dir(cfg, "../../outside")
    # Shard paths come from the index alone, never from manifest text.
    cache = copy_cache(ws, "names")
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shard_plan"][0]["index"] = "../../outside"
    manifest["shard_plan"][1]["name"] = "/etc/passwd"
    (cache / "manifest.json").write_text(json.dumps(manifest))
    opened = Cache.open(str(cache))
    for i in range(opened.num_shards):
        loc = Path(opened.shard_location(i)).resolve()
        assert loc.parent == (cache / "shards").resolve() and loc.name == f"shard-{i:05d}.zarr"
    for bad in (-1, opened.num_shards):
        with pytest.raises(IndexError):
            opened.shard_rel(bad)


@pytest.mark.integration
def test_student_weights_are_written_as_safetensors(ws, ref_student):
    out = ws["root"] / "ref-student" / "students" / "s1"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and "tb" not in p.parts)
    assert "final/model.safetensors" in files
    assert [f for f in files if f.endswith(("model.safetensors",)) and f.startswith("checkpoints/")]
    # torch pickles appear only as optim.pt (read with weights_only=True); no *.bin / *.pth weights
    assert [f for f in files if f.endswith((".bin", ".pth", ".pkl", ".pt")) and not f.endswith("/optim.pt")] == []


@pytest.mark.integration
def test_pretrained_student_with_a_pickled_weights_file_runs_no_code(ws, tmp_path):
    """A `model:` student handed over as pytorch_model.bin holding a pickle payload: refused, nothing runs."""
    import pickle

    marker = tmp_path / "payload-ran"
    model = tmp_path / "pickled-student"
    model.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(Path(ws["model"]) / name, model / name)

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Payload()}))
    cfg = config(ws, "pickled-student", cache=ws["ref_cache"])
    rc, out = fh.run_atkd(["student", str(cfg), f"students.s1.model={model}", "students.s1.init=null",
                           f"students.s1.tokenizer={ws['model']}"], ws["root"] / "logs" / "pickled-student.log")
    assert rc != 0, out
    assert not marker.exists()
