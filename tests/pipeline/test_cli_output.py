"""What the CLI prints (issue 23, item 11): help, prefixes, rates, reruns, both caches of a run."""

from __future__ import annotations

import logging

import pytest

from tests.support import harness as fh
from pipeline import cli
from tests.support.fixtures import atkd_here


@pytest.mark.parametrize("command", ["run", "teacher", "finetune", "student", "eval", "sweep", "status", "verify",
                                     "inspect"])
def test_every_subcommand_help_has_a_description_and_the_verbose_flag(capsys, command):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    usage, _, rest = text.partition("\n\n")
    description = rest.split("\n\n")[0]
    assert description and not description.startswith(("positional", "options")), text
    assert "-v, --verbose" in text and "engine and library logs" in text
    if command == "sweep":
        assert "SWEEP [key=value ...]" in usage and "[CONFIG]" not in usage
    if command in ("run", "student"):
        assert "--retrain NAME" in text


def test_sizes_and_rates_read_right():
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.progress import LineProgress, restart_clock
    from stages.student.model import describe_size

    one = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, head_dim=8))
    assert describe_size(one).endswith("(llama, hidden 16, 1 layer)")
    now = [0.0]
    bar = LineProgress(total=100, desc="teacher", unit="shard", file=None, silent=True, clock=lambda: now[0])
    now[0] = 30.0  # an engine start-up: no shard yet
    restart_clock(bar)
    now[0] = 40.0
    bar.n = 10
    assert "1 shard/s" in bar.line() and "ETA 1m30s" in bar.line()  # 10 shards in the 10 s since the start


def test_project_warnings_carry_the_stage_prefix(tmp_path, capsys):
    from stages.logs import stage_log

    with stage_log(tmp_path / "logs", "student"):
        logging.getLogger("stages.training.resume").warning("student s1: something to look at")
        logging.getLogger("stages.training.resume").info("[student] already prefixed")
    err = capsys.readouterr().err
    assert "[student] WARNING: student s1: something to look at" in err
    assert "[student] already prefixed" in err and "[student] [student]" not in err


def test_reruns_and_both_caches_of_a_run(tmp_path, tiny_llama_dir, train_jsonl, capsys):
    cfg = fh.write_config(tmp_path / "cfg.yaml", model=str(tiny_llama_dir), data=str(train_jsonl),
                          run_dir=str(tmp_path / "run"), cache=str(tmp_path / "run" / "cache"),
                          extra={"data": {"path": str(train_jsonl), "max_seq_len": 64,
                                          "holdout": {"validation": 5, "test": 5}}})
    rc, out = atkd_here(capsys, "teacher", str(cfg))
    assert rc == 0, out
    rc, out = atkd_here(capsys, "verify", str(cfg))
    assert rc == 0 and "validation cache" in out and "not written yet" in out, out
    rc, out = atkd_here(capsys, "eval", str(cfg))  # writes the validation cache first
    assert rc == 0, out
    rc, out = atkd_here(capsys, "teacher", str(cfg))
    assert rc == 0 and "wrote 0 shard(s)" not in out and "0 tok/s" not in out
    assert out.count("training cache") == 1 and "is complete and matches the config" in out
    rc, out = atkd_here(capsys, "verify", str(cfg))
    assert rc == 0 and out.count("OK") == 2 and f"cache {tmp_path / 'run' / 'cache-val'}" in out, out
    rc, out = atkd_here(capsys, "status", str(cfg))
    assert rc == 0 and "validation cache: cache" in out and "MISMATCH" not in out, out
    rc, out = atkd_here(capsys, "status", str(cfg), "data.max_seq_len=48")
    assert out.count("MISMATCH") == 2 and "identity.max_seq_len: 64 -> 48" in out
