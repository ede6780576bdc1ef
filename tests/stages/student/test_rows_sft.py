"""Plain SFT without a cache: the student trainer fed by RowsDataset (stages/training/rows_dataset.py).

A 2-layer, hidden-64 Llama student trains a few steps on 37 generated rows on CPU.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipeline.config import LossConfig, OptimConfig, StudentConfig
from stages.data_config import DataConfig
from stages.errors import TrainingError
from stages.training import checkpoint as ckpt
from stages.training.layout import read_done
from stages.training.optim import steps_for_epochs
from stages.student.trainer import train_student
from stages.training.rows_dataset import ROWS_COUNTS
from tests.support import fixtures

STUDENT_INIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=32, max_position_embeddings=128)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer_dir):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rows_sft")
    data = fixtures.write_jsonl(root / "train.jsonl", fixtures.prompt_response_rows(37, seed=4))
    return {"root": root, "data": DataConfig(path=str(data), max_seq_len=64), "tok": str(tiny_tokenizer_dir)}


def config(name: str, **optim) -> StudentConfig:
    optim = {"lr": 5e-3, "warmup_steps": 2, "max_steps": 8, "batch_size": 4, "grad_accum": 2, **optim}
    return StudentConfig(name=name, init=dict(STUDENT_INIT), data="rows", loss=LossConfig(kind="sft", chunk_size=16),
                         optim=OptimConfig(**optim), checkpoint_every=2, keep_checkpoints=3, seed=0)


def run(setup, cfg: StudentConfig, out):
    return train_student(cfg, cache_url=None, data_cfg=setup["data"], out_dir=out, tokenizer_path=setup["tok"],
                         progress=False)


def log_lines(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def weights(out) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(setup):
    out = setup["root"] / "reference"
    return out, run(setup, config("ref"), out)


def test_sft_from_the_rows_learns_and_exports(reference):
    out, summary = reference
    assert summary.steps == 8 and all(np.isfinite(summary.losses))
    assert np.mean(summary.losses[-2:]) < 0.9 * np.mean(summary.losses[:2]), summary.losses
    assert (out / "final" / "model.safetensors").is_file() and read_done(out)["steps"] == 8
    assert json.loads((out / ROWS_COUNTS).read_text())["counts"] == [37]  # the counted pass, recorded


def test_resume_from_a_checkpoint_is_bit_identical(setup, reference):
    """Cut a finished run back to its step-4 checkpoint (as a kill after that step leaves it): the rerun
    continues from the reader position the checkpoint holds and ends bit-identical."""
    ref_out, _ = reference
    out = setup["root"] / "resumed"
    shutil.copytree(ref_out, out)
    for step, path in ckpt.list_checkpoints(out):
        if step > 4:
            shutil.rmtree(path)
    shutil.rmtree(out / "final")
    (out / "done.json").unlink()
    summary = run(setup, config("ref"), out)
    assert summary.start_step == 4 and summary.steps == 8
    timing = ("tokens_per_s", "step_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in log_lines(out)] == \
        [{k: v for k, v in r.items() if k not in timing} for r in log_lines(ref_out)]
    got, want = weights(out), weights(ref_out)
    assert all(torch.equal(got[k], want[k]) for k in want)
    meta = json.loads((ckpt.step_dir(out, 8) / "meta.json").read_text())
    assert meta["reader"]["order"]["source"] == "rows" and "rows_fingerprint" in meta


def test_epochs_resolve_to_steps_from_the_rows_after_tokenisation(setup, capsys):
    data = DataConfig(path=setup["data"].path, max_seq_len=50, overlong="skip", max_dropped_fraction=1.0)
    cfg = config("epochs", epochs=2.0, batch_size=3, grad_accum=1)
    out = setup["root"] / "epochs"
    train_student(cfg, cache_url=None, data_cfg=data, out_dir=out, tokenizer_path=setup["tok"], progress=False)
    kept = json.loads((out / ROWS_COUNTS).read_text())["counts"][0]
    assert 0 < kept < 37  # over-long rows skipped: the epoch is what is left
    steps = steps_for_epochs(2.0, kept, 3)
    assert read_done(out)["steps"] == steps and read_done(out)["epochs"] == 2.0
    said = capsys.readouterr().out
    assert f"optim.epochs=2 -> {steps} steps ({kept:,} sequences in the training rows, 3 per step)" in said
    assert f"{kept}/37 rows used" in said


def test_kd_without_a_cache_is_refused(setup):
    cfg = config("kd")
    cfg.loss.kind = "kd"
    with pytest.raises(TrainingError, match="loss.kind sft"):
        run(setup, cfg, setup["root"] / "kd")


def test_dataloader_workers_keep_the_run(setup, reference):
    ref_out, _ = reference
    cfg = config("ref")
    cfg.num_workers = 2
    out = setup["root"] / "workers"
    run(setup, cfg, out)
    got, want = weights(out), weights(ref_out)
    assert all(torch.equal(got[k], want[k]) for k in want)
