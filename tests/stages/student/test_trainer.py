"""Student trainer: learning, bit-identical resume after SIGKILL, checkpoint fallback,
vocabulary checks, the saved model, chunked-loss gradients, and DDP == single process.

Everything runs on CPU on a synthetic cache: a tiny random Llama teacher scores
generated sentences (top-8 over a 300-token BPE vocabulary) and a 2-layer,
hidden-64 Llama student trains on it for a few steps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support import harness as fh
from pipeline.config import LossConfig, OptimConfig, StudentConfig
from stages.training import checkpoint as ckpt
from stages.student.model import VocabularyMismatchError, build_student, check_vocabulary
from stages.student.trainer import lr_at, train_student
from tests.support import fixtures

REPO = Path(__file__).resolve().parents[3]
TOP_K = 8
STUDENT_INIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=32, max_position_embeddings=64)


# ---------------------------------------------------------------- the synthetic cache


def build_teacher_cache(root: Path, tokenizer, *, num_sequences: int = 48, num_shards: int = 2,
                        top_k: int = TOP_K, max_len: int = 24, seed: int = 0, unk_every: int = 0) -> str:
    """Score generated sentences with a tiny random teacher and write a format-v1 cache.

    The last two thirds of each sequence (and its EOS) are the trained targets;
    the teacher's logits are sharpened so its uncertainty varies across positions.
    `unk_every=n` turns every n-th token into the unknown token (text the tokenizer does not cover).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.fingerprint import tokenizer_fingerprint
    from storage.cache import Cache
    from storage.schema import SequenceRecord, ShardData

    torch.manual_seed(seed + 100)
    teacher = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, initializer_range=0.2)).eval()
    records = []
    for i, text in enumerate(fixtures.generated_text(num_sequences, seed=seed + 3)):
        ids = tokenizer(text)["input_ids"][: max_len - 1] + [tokenizer.eos_token_id]
        if unk_every:
            ids = [tokenizer.unk_token_id if j % unk_every == 1 else t for j, t in enumerate(ids)]
        positions = np.arange(max(len(ids) // 3, 1) - 1, len(ids) - 1)
        with torch.no_grad():
            logprobs = (4.0 * teacher(torch.tensor([ids])).logits[0].float()).log_softmax(-1)
        rows = logprobs[torch.from_numpy(positions)]
        gold = torch.tensor(ids)[torch.from_numpy(positions) + 1]
        top_lp, top_ids = rows.topk(top_k)
        records.append(SequenceRecord(i, np.array(ids, np.int32), positions.astype(np.int32),
                                      top_ids.numpy().astype(np.int32), top_lp.numpy().astype(np.float16),
                                      rows.gather(1, gold[:, None])[:, 0].numpy()))
    per_shard = -(-num_sequences // num_shards)
    plan = [{"index": j, "example_start": j * per_shard, "example_end": min((j + 1) * per_shard, num_sequences)}
            for j in range(num_shards)]
    identity = {"teacher": "tiny-random", "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                "vocab_size": len(tokenizer), "top_k": top_k}
    url = str(root / ("cache" if not unk_every else f"cache-unk{unk_every}"))
    cache = Cache.create_or_open(url, identity, plan)
    for entry in plan:
        rows = records[entry["example_start"]:entry["example_end"]]
        cache.write_shard(entry["index"], ShardData.from_sequences(rows))
    return url


def student_config(kind: str = "atkd", *, name: str | None = None, loss: dict | None = None, **optim) -> StudentConfig:
    optim = {"lr": 3e-3, "warmup_steps": 2, "max_steps": 8, "batch_size": 4, **optim}
    return StudentConfig(name=name or kind, init=dict(STUDENT_INIT),
                         loss=LossConfig(kind=kind, chunk_size=16, **(loss or {})),
                         optim=OptimConfig(**optim), checkpoint_every=2, keep_checkpoints=2, seed=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)  # same kernels in this process and in the subprocesses below
    root = tmp_path_factory.mktemp("trainer")
    tokenizer = fixtures.make_tokenizer(root / "tokenizer", vocab_size=300)
    url = build_teacher_cache(root, tokenizer)
    return {"root": root, "url": url, "tokenizer": tokenizer, "tok_dir": str(root / "tokenizer")}


def run(setup, cfg: StudentConfig, out: Path):
    return train_student(cfg, cache_url=setup["url"], out_dir=out, tokenizer_path=setup["tok_dir"], progress=False)


def logged_losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


RESUME_CFG = dict(kind="atkd", loss={"ce_weight": 0.1}, grad_accum=2, batch_size=3)


@pytest.fixture(scope="module")
def reference(setup):
    """An uninterrupted atkd run (8 steps, 2 micro-batches per step, checkpoints every 2)."""
    out = setup["root"] / "reference"
    summary = run(setup, student_config(**RESUME_CFG), out)
    return out, summary


# ---------------------------------------------------------------- learning


@pytest.mark.parametrize("kind", ["sft", "kd", "atkd"])
def test_loss_decreases(setup, kind):
    summary = run(setup, student_config(kind, max_steps=12, lr=5e-3), setup["root"] / f"learn_{kind}")
    assert len(summary.losses) == 12 and all(np.isfinite(summary.losses))
    assert np.mean(summary.losses[-3:]) < 0.9 * np.mean(summary.losses[:3]), summary.losses


def test_log_has_loss_parts(reference):
    out, summary = reference
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tkd", "dkd", "num_hard", "num_easy", "unc", "ce"):
        assert key in records[-1], key
    assert records[-1]["num_hard"] >= records[-1]["num_easy"] > 0  # ceil(0.5 n) hard per sequence
    assert any((out / "tb").iterdir())
    assert summary.steps == 8 and summary.start_step == 0


def test_workers_and_gradient_checkpointing_keep_the_run(setup, reference):
    """DataLoader workers and activation checkpointing change how, not what, is computed."""
    cfg = student_config(**RESUME_CFG)
    cfg.num_workers, cfg.gradient_checkpointing, cfg.optim.max_steps = 2, True, 4
    out = setup["root"] / "workers"
    summary = run(setup, cfg, out)
    np.testing.assert_allclose(summary.losses, logged_losses(reference[0])[:4], rtol=1e-5)


# ---------------------------------------------------------------- resume


def train_child(url: str, out: str, tok: str) -> None:
    """The resume test's run in a worker process (tests/support/harness.call), one thread as in this process."""
    torch.set_num_threads(1)
    train_student(student_config(**RESUME_CFG), cache_url=url, out_dir=out, tokenizer_path=tok, progress=False)


@pytest.mark.integration
def test_sigkill_then_resume_is_bit_identical(setup, reference):
    ref_out, _ = reference
    out = setup["root"] / "killed"
    # SIGKILL in the middle of writing the step-6 checkpoint (the 3rd): weights written, optimiser not
    proc = fh.call(train_child, (setup["url"], str(out), setup["tok_dir"]), setup["root"] / "killed.log",
                   env={"ATKD_FAULT_POINT": "ckpt.model:3"})
    assert proc.wait(300) in fh.KILLED, proc.output()[-3000:]
    steps = [s for s, _ in ckpt.list_checkpoints(out)]
    assert steps == [2, 4]  # step 6 never became visible
    assert any(".partial-" in p.name for p in (out / "checkpoints").iterdir())
    assert len(logged_losses(out)) == 6 and not (out / "done.json").exists()

    summary = run(setup, student_config(**RESUME_CFG), out)
    assert summary.start_step == 4 and summary.steps == 8
    assert logged_losses(out) == logged_losses(ref_out)  # bit-identical, steps 1..8
    ref_w, w = final_weights(ref_out), final_weights(out)
    assert ref_w.keys() == w.keys() and all(torch.equal(ref_w[k], w[k]) for k in w)
    assert not any(".partial-" in p.name for p in (out / "checkpoints").iterdir())  # debris cleaned


def test_corrupt_latest_checkpoint_falls_back(setup, reference, caplog):
    ref_out, _ = reference
    out = setup["root"] / "corrupt"
    shutil.copytree(ref_out, out)
    (out / "done.json").unlink()
    model_file = out / "checkpoints" / "step_000008" / "model.safetensors"
    data = bytearray(model_file.read_bytes())
    data[-10] ^= 0xFF
    model_file.write_bytes(bytes(data))

    found = ckpt.latest_valid_checkpoint(out)
    assert found.step == 6 and "sha256" in found.skipped[0][1]
    caplog.clear()
    summary = run(setup, student_config(**RESUME_CFG), out)
    # what the user reads: which checkpoint, what is wrong with it, what happens instead
    assert (f"checkpoint {ckpt.step_dir(out, 8)} is unusable: model.safetensors does not match its sha256"
            in caplog.text), caplog.text
    assert "falling back to the previous one" in caplog.text
    assert summary.start_step == 6 and (out / "done.json").is_file()
    assert logged_losses(out) == logged_losses(ref_out)
    ref_w, w = final_weights(ref_out), final_weights(out)
    assert ref_w.keys() == w.keys() and all(torch.equal(ref_w[k], w[k]) for k in w)


def test_resume_config_changes(setup, reference, caplog):
    out = setup["root"] / "changed"
    shutil.copytree(reference[0], out)
    (out / "done.json").unlink()
    shutil.rmtree(out / "checkpoints" / "step_000008")
    cfg = student_config(**RESUME_CFG)
    cfg.optim.lr = 1e-3
    summary = run(setup, cfg, out)
    assert summary.start_step == 6
    assert "config differs from checkpoint step 6, the current value wins" in caplog.text
    assert "optim.lr: checkpoint 0.003 -> now 0.001" in caplog.text

    # A change that makes the checkpoint meaningless is refused, naming the key; nothing is deleted.
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    cfg = student_config(**RESUME_CFG, max_steps=10)
    cfg.loss.kind = "kd"
    with pytest.raises(ckpt.ResumeError) as e:
        run(setup, cfg, out)
    assert "cannot resume" in str(e.value) and "loss.kind: checkpoint 'atkd', now 'kd'" in str(e.value)
    assert "Train into a new output directory" in str(e.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == kept


def test_raising_max_steps_says_where_it_resumes_and_what_the_lr_does(setup, reference, capsys, caplog):
    out = setup["root"] / "longer"
    shutil.copytree(reference[0], out)
    cfg = student_config(**RESUME_CFG)
    cfg.optim.max_steps = 12
    summary = run(setup, cfg, out)
    assert summary.start_step == 8 and summary.steps == 12
    printed = capsys.readouterr().out
    count = sum(p.numel() for p in build_student(cfg, setup["tokenizer"]).parameters())
    assert f"[student] atkd: {count / 1e6:.2f}M parameters (llama, hidden 64, 2 layers)" in printed
    assert f"[student] resuming atkd from step 8 (checkpoint {ckpt.step_dir(out, 8)})" in printed
    old, new = lr_at(8, student_config(**RESUME_CFG).optim), lr_at(8, cfg.optim)
    assert old < new / 2  # finished: the old cosine sits at its floor, the new one is mid-way
    assert "the learning-rate schedule changed (optim.max_steps 8 -> 12)" in caplog.text
    assert f"the learning rate jumps from {old:.3g} to {new:.3g} at step 9" in caplog.text


def test_every_checkpoint_corrupt_starts_from_scratch_and_sets_them_aside(setup, reference, capsys):
    ref_out, _ = reference
    out = setup["root"] / "all-corrupt"
    shutil.copytree(ref_out, out)
    (out / "done.json").unlink()
    for step in (6, 8):
        optim_file = ckpt.step_dir(out, step) / ckpt.OPTIM_FILE
        data = bytearray(optim_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        optim_file.write_bytes(bytes(data))
    capsys.readouterr()
    summary = run(setup, student_config(**RESUME_CFG), out)
    assert summary.start_step == 0 and summary.steps == 8
    printed = capsys.readouterr().out
    assert (f"[student] starting atkd from scratch: every checkpoint in {out / 'checkpoints'} is unusable (see "
            "the warnings above); moved aside as corrupt-step_000006, corrupt-step_000008") in printed
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["corrupt-step_000006", "corrupt-step_000008", "step_000006", "step_000008"]
    assert ckpt.checkpoint_problem(out / "checkpoints" / "corrupt-step_000008") is not None  # kept as it was
    assert logged_losses(out) == logged_losses(ref_out)
    assert ckpt.latest_valid_checkpoint(out).step == 8


def test_unknown_tokens_in_the_data_are_warned_about(setup, caplog):
    url = build_teacher_cache(setup["root"], setup["tokenizer"], unk_every=5)
    train_student(student_config("kd", name="unk", max_steps=1), cache_url=url, out_dir=setup["root"] / "unk",
                  tokenizer_path=setup["tok_dir"], progress=False)
    share = re.search(r"student 'unk': (\d+\.\d)% of the tokens in the first batch are the unknown token '<unk>'",
                      caplog.text)
    assert share and 15 < float(share.group(1)) < 25, caplog.text  # every 5th token
    assert "the tokenizer does not cover this data (or the chat template's role words)" in caplog.text
    caplog.clear()
    run(setup, student_config("kd", name="no-unk", max_steps=1), setup["root"] / "no-unk")
    assert "unknown token" not in caplog.text


# ---------------------------------------------------------------- vocabulary


def test_vocab_mismatch_is_refused(setup):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(setup["tok_dir"])
    other.add_tokens(["<extra_token>"])
    other_dir = setup["root"] / "other_tokenizer"
    other.save_pretrained(other_dir)
    cfg = student_config("kd", name="mismatch", max_steps=1)
    before = fh.cache_snapshot(setup["url"])
    with pytest.raises(VocabularyMismatchError) as e:
        train_student(cfg, cache_url=setup["url"], out_dir=setup["root"] / "mismatch", tokenizer_path=str(other_dir),
                      progress=False)
    msg = str(e.value)
    assert "student 'mismatch' does not match the cache's vocabulary" in msg, msg
    assert "tokenizer size 301 vs cache vocab_size 300" in msg
    assert "its tokenizer (from teacher.model (the default for an `init` student)) is not the one" in msg  # where
    assert "set students.mismatch.tokenizer to teacher.model's directory" in msg  # what to do
    assert not (setup["root"] / "mismatch" / "checkpoints").exists()  # refused before any training
    assert fh.compare_caches(fh.cache_snapshot(setup["url"]), before) == []


def test_padded_embedding_ok_smaller_refused(setup):
    from storage.cache import Cache

    tokenizer, identity = setup["tokenizer"], Cache.open(setup["url"]).manifest.identity
    padded = student_config("kd", name="padded", max_steps=2)
    padded.init["vocab_size"] = len(tokenizer) + 20  # e.g. rounded up to a multiple of 64
    summary = run(setup, padded, setup["root"] / "padded")
    assert summary.steps == 2 and np.isfinite(summary.final_loss)

    small = student_config("kd", name="small")
    small.init["vocab_size"] = len(tokenizer) - 10
    with pytest.raises(VocabularyMismatchError, match=r"embedding has 290 rows"):
        check_vocabulary(build_student(small, tokenizer), tokenizer, identity)


# ---------------------------------------------------------------- the saved student


def test_final_model_loads_and_done_marker(setup, reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary = reference
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert len(tokenizer) == len(setup["tokenizer"])
    saved = ckpt.load_model_state(ckpt.latest_valid_checkpoint(out).path)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        logits = model(**tokenizer(["the cat runs"], return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    done = json.loads((out / "done.json").read_text())
    assert done["steps"] == 8 and done["final_loss"] == summary.final_loss
    again = run(setup, student_config(**RESUME_CFG), out)  # orchestration re-runs: nothing to do
    assert again.already_done and again.steps == 8


# ---------------------------------------------------------------- chunked loss


@pytest.mark.parametrize("kind", ["sft", "kd", "atkd"])
def test_chunked_gradient_equals_unchunked(setup, kind):
    from stages.student.losses import atkd_loss, kd_loss
    from stages.student.objective import StudentObjective
    from storage.dataset import CacheDataset

    tokenizer = setup["tokenizer"]
    batch = next(iter(CacheDataset(setup["url"], batch_size=6, pad_id=tokenizer.pad_token_id)))
    model = build_student(student_config(kind), tokenizer)
    results = []
    for chunk in (5, 10**6):
        loss_cfg = LossConfig(kind=kind, chunk_size=chunk, ce_weight=0.3 if kind != "sft" else 0.0)
        model.zero_grad()
        total, _ = StudentObjective(model, loss_cfg)(batch)
        total.backward()
        results.append((total.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (small, g_small), (whole, g_whole) = results
    torch.testing.assert_close(small, whole, rtol=1e-5, atol=1e-6)
    for name in g_whole:
        torch.testing.assert_close(g_small[name], g_whole[name], rtol=1e-4, atol=1e-6, msg=name)
    # ... and both are the public losses' "sum" on full logits.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows = logits[batch["row_batch"], batch["row_pos"]]
    args = (rows, batch["topk_ids"], batch["topk_logprobs"], batch["target_ids"], batch["target_logprobs"],
            torch.ones_like(batch["target_ids"], dtype=torch.bool))
    if kind == "sft":
        expected = torch.nn.functional.cross_entropy(rows, batch["target_ids"], reduction="sum")
    elif kind == "kd":
        expected = kd_loss(*args, ce_weight=0.3, reduction="sum")
    else:
        expected = atkd_loss(*args, group_ids=batch["group_ids"], ce_weight=0.3, reduction="sum")
    torch.testing.assert_close(whole, expected.detach(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- DDP


DDP_SCRIPT = """
import sys, torch
import torch.distributed as dist
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
from tests.stages.student.test_trainer import student_config
from stages.student.trainer import train_student
batch_size, names = int(sys.argv[1]), sys.argv[2:]
dist.init_process_group("gloo")  # the trainer joins an existing group and leaves it to us
for name in names:
    cfg = student_config("atkd", name=name, max_steps=3, batch_size=batch_size)
    cfg.fsdp = name == "fsdp"
    train_student(cfg, cache_url={url!r}, out_dir={root!r} + "/" + name, tokenizer_path={tok!r}, progress=False)
dist.destroy_process_group()
"""
RANKS = 2


def torchrun(script: Path, nproc: int, *args: str) -> None:
    """Run `script` under torchrun on CPU when fewer GPUs than RANKS are visible (one GPU cannot host rank 1)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if torch.cuda.device_count() < RANKS:
        env["CUDA_VISIBLE_DEVICES"] = ""  # every run of the comparison on the same device type
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(script), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.integration
def test_ddp_and_fsdp_two_processes_equal_single_process(setup):
    """2 ranks x 2 sequences == 1 process x 4 sequences (the same global batches), on CPU unless 2 GPUs."""
    script_file = setup["root"] / "ddp_main.py"
    script_file.write_text(DDP_SCRIPT.format(repo=str(REPO), url=setup["url"], root=str(setup["root"]),
                                             tok=setup["tok_dir"]))
    torchrun(script_file, 1, "4", "single")  # the reference, on the same device type as the ranks
    torchrun(script_file, RANKS, "2", "ddp", "fsdp")
    single_out = setup["root"] / "single"
    ref_w = final_weights(single_out)
    for name in ("ddp", "fsdp"):
        out = setup["root"] / name
        np.testing.assert_allclose(logged_losses(out), logged_losses(single_out), rtol=1e-5, atol=1e-7,
                                   err_msg=name)
        # Adam turns float noise in near-zero gradients into steps of ~lr * noise / eps-scale:
        # a few elements differ by ~5e-6 after 3 steps; a wrong gradient would differ by ~lr.
        w = final_weights(out)
        for k in ref_w:
            torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=2e-5, msg=f"{name}: {k}")


def test_device_is_the_local_gpu_cpu_or_a_clear_error():
    from stages.training.distributed import pick_device

    assert pick_device(0, 0) == torch.device("cpu") and pick_device(1, 0) == torch.device("cpu")
    assert pick_device(0, 1) == torch.device("cuda:0") and pick_device(1, 2) == torch.device("cuda:1")
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=1 but only 1 CUDA device\(s\) are visible: start at most "
                                           r"1 process\(es\) per node \(torchrun --nproc_per_node 1\), or hide "
                                           r"the GPUs \(CUDA_VISIBLE_DEVICES=\)"):
        pick_device(1, 1)


def test_epochs_resolve_to_steps_from_the_cache_and_mark_done_by_epochs(setup, tmp_path, capsys):
    from stages.errors import TrainingError
    from stages.training.layout import is_done, read_done
    from stages.training.optim import steps_for_epochs

    cfg = student_config("sft", name="epochs", batch_size=8, grad_accum=2)
    cfg.optim.epochs = 1.5
    cfg.optim.warmup_ratio = 0.5  # of the resolved 5 steps: ceil(2.5) = 3 warmup steps, not warmup_steps' 2
    run(setup, cfg, tmp_path / "epochs")
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "epochs" / "log.jsonl").read_text().splitlines()]
    assert lrs[:4] == pytest.approx([cfg.optim.lr / 3, cfg.optim.lr * 2 / 3, cfg.optim.lr, cfg.optim.lr])
    done = read_done(tmp_path / "epochs")
    assert done["steps"] == steps_for_epochs(1.5, 48, 16) == 5  # 48 sequences: 3 full steps per epoch
    assert done["epochs"] == 1.5 and len(logged_losses(tmp_path / "epochs")) == 5
    assert "optim.epochs=1.5 -> 5 steps (48 sequences in the cache, 16 per step)" in capsys.readouterr().out
    assert is_done(tmp_path / "epochs", max_steps=1000, epochs=1.5)  # done by epochs, whatever max_steps says
    assert not is_done(tmp_path / "epochs", max_steps=1, epochs=2.0)
    with pytest.raises(TrainingError, match="holds 48 sequences, fewer than one step's 64"):
        steps_for_epochs(1, 48, 64)
