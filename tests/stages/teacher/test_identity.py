"""The cache identity and the checks around it: model names offline, stage two's comparison."""

from __future__ import annotations

import time

import pytest

from pipeline.config import CacheConfig, DataConfig, TeacherConfig
from stages.teacher.identity import check_for_students, load_tokenizer


def test_a_bare_model_name_offline_fails_at_once_saying_what_was_tried(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as info:
        load_tokenizer("no-such-teacher-model")
    assert time.perf_counter() - t0 < 5
    message = str(info.value)
    assert "tried a local directory" in message and str(tmp_path / "no-such-teacher-model") in message
    assert "the Hugging Face cache (not there)" in message and "offline or unreachable" in message


def test_a_missing_local_path_is_named_as_a_directory(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        load_tokenizer(str(tmp_path / "teacher"))


def _capture(tmp_path, data_cfg, model):
    from stages.teacher.capture import run_capture
    from storage.cache import Cache

    cfg = TeacherConfig(model=str(model), backend="transformers", top_k=4, dtype="float32", device="cpu")
    run_capture(data_cfg, cfg, CacheConfig(path=str(tmp_path / "cache"), sequences_per_shard=20), progress=False)
    return Cache.open(str(tmp_path / "cache")), cfg


def test_stage_two_names_each_setting_that_differs(tmp_path, train_jsonl, tiny_llama_dir):
    data_cfg = DataConfig(path=str(train_jsonl), max_seq_len=64)
    cache, teacher_cfg = _capture(tmp_path, data_cfg, tiny_llama_dir)
    assert check_for_students(cache, data_cfg, teacher_cfg) == (4, [])
    other = DataConfig(path=str(train_jsonl), max_seq_len=48, template="Q: {prompt}\nA: ")
    from storage.errors import CacheMismatchError

    with pytest.raises(CacheMismatchError) as info:
        check_for_students(cache, other, teacher_cfg)
    message = str(info.value)
    assert "(cache -> config)" in message and "\n  max_seq_len: 64 -> 48\n" in message
    assert 'template: "### Instruction' in message and '-> "Q: {prompt}\\nA: "' in message
    assert "data_fingerprint" not in message  # the source is the same; only settings differ
    fewer = TeacherConfig(**{**teacher_cfg.__dict__, "top_k": 2})
    assert check_for_students(cache, data_cfg, fewer) == (2, [
        "teacher.top_k=2 is below the cache's top-4: students without loss.top_k train on the first 2 entries per "
        "position (deprecated: teacher.top_k says what stage one caches; set loss.top_k: 2 on those students "
        "instead)"])
