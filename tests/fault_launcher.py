"""`python -m tests.fault_launcher ARGS` = `python -m pipeline ARGS` plus stage-two crash points.

Stage one's crash points live in storage (storage/faults.py). The trainer and
its checkpoint module are left untouched; this launcher wraps the functions
they call so that ATKD_FAULT_POINT can also name:

    student.step    after a step's log line is written (before its checkpoint)
    ckpt.model      checkpoint: model.safetensors written, nothing else yet
    ckpt.optim      checkpoint: optim.pt written, no meta.json / marker yet
    ckpt.rename     checkpoint: complete in its temporary directory, not renamed
    ckpt.renamed    checkpoint: renamed into place, older ones not yet pruned
    log.rewrite     resume: the kept lines of log.jsonl written to its temporary copy, not yet
                    renamed over it (storage.files.atomic_write)

and ATKD_COMMIT_LOG=FILE appends "shard_index pid" to FILE after each shard commit.

It is also the forkserver preload module of tests/fault_harness.py: importing
it imports torch, transformers and the pipeline once, so forked children start warm.
"""

from __future__ import annotations

import os
import pathlib
import sys

import datasets  # noqa: F401
import safetensors.torch  # noqa: F401
import torch
import zarr  # noqa: F401
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401

import pipeline.orchestrator  # noqa: F401
import stages.teacher.capture  # noqa: F401
import stages.teacher.engine_hf  # noqa: F401
import storage.dataset  # noqa: F401
from pipeline import cli
from storage.faults import fault_point

_installed = False


def install_fault_points() -> None:
    """Wrap the trainer's checkpoint and log writes with crash points (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    from stages.student import checkpoint as ckpt
    from stages.student import trainer

    save_file = ckpt.save_file

    def save_file_then_point(*args, **kwargs):
        save_file(*args, **kwargs)
        fault_point("ckpt.model")

    ckpt.save_file = save_file_then_point

    torch_save = torch.save

    def torch_save_then_point(obj, f, *args, **kwargs):
        torch_save(obj, f, *args, **kwargs)
        if str(f).endswith(ckpt.OPTIM_FILE):
            fault_point("ckpt.optim")

    torch.save = torch_save_then_point

    fsync_dir = ckpt._fsync_dir

    def fsync_dir_then_point(path):
        fsync_dir(path)
        # save_checkpoint syncs the temporary directory before the rename, the parent after it
        fault_point("ckpt.rename" if pathlib.Path(path).name.startswith(".step_") else "ckpt.renamed")

    ckpt._fsync_dir = fsync_dir_then_point

    write = trainer.StepLog.write

    def write_then_point(self, record):
        write(self, record)
        fault_point("student.step")

    trainer.StepLog.write = write_then_point

    atomic_write = trainer.atomic_write

    def atomic_write_with_point(path, data, **kwargs):
        if pathlib.Path(path).name == "log.jsonl":  # the resume's rewrite of the step log
            return atomic_write(path, data, before_replace=lambda: fault_point("log.rewrite"))
        return atomic_write(path, data, **kwargs)

    trainer.atomic_write = atomic_write_with_point

    from storage import lease as leases

    remove_leases = leases.remove_leases

    def remove_leases_and_record(fs, index):
        # Cache.write_shard calls this right after a shard's commit: ATKD_COMMIT_LOG
        # collects "index pid" lines so a test can see that no shard was committed twice.
        record = os.environ.get("ATKD_COMMIT_LOG")
        if record:
            fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.write(fd, f"{index} {os.getpid()}\n".encode())
            os.close(fd)
        remove_leases(fs, index)

    leases.remove_leases = remove_leases_and_record


def child_main(argv: list[str], env: dict, log_path: str) -> None:
    """Target of a forkserver child: the CLI with stdout+stderr to `log_path`; exits with its code."""
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # tqdm's default lock is a multiprocessing semaphore, which a SIGKILLed child would leak.
    import threading

    from tqdm.std import tqdm

    tqdm.set_lock(threading.RLock())
    install_fault_points()
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    install_fault_points()
    sys.exit(cli.main(sys.argv[1:]))
