"""Real processes: a run killed with SIGKILL resumes to the same adapter; torchrun with 2 ranks
matches one process with the same global batch."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_train import BERT, write_classification
from torch.testing import assert_close

VENV_BIN = Path(sys.executable).parent


def base_args(out: Path, train: Path, evaluation: Path, steps: int) -> list[str]:
    return ["train", "--quiet", "--model", BERT, "--data", str(train), "--eval-data", str(evaluation),
            "--out", str(out), "--targets", "query,value", "--batch-size", "8", "--max-steps", str(steps),
            "--eval-every", "4", "--save-every", "2", "--max-length", "32", "--lr", "5e-3", "--dropout", "0.1",
            "--keep-last", "2"]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def lorakit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorakit", *args]


def tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_sigkill_then_resume_gives_the_uninterrupted_adapter(tmp_path):
    train = write_classification(tmp_path / "train.csv", 64)
    evaluation = write_classification(tmp_path / "eval.csv", 16, seed=1)
    steps = 40
    reference = tmp_path / "reference"
    subprocess.run(lorakit_cmd(*base_args(reference, train, evaluation, steps)), env=env(), check=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(lorakit_cmd(*base_args(out, train, evaluation, steps)), env=env())
    checkpoints = out / "checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        done = sorted(checkpoints.glob("step-*.pt")) if checkpoints.exists() else []
        if any(int(p.stem.split("-")[1]) >= 6 for p in done):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; make it longer"
    assert not (out / "summary.json").exists()

    subprocess.run(lorakit_cmd(*base_args(out, train, evaluation, steps), "--resume"), env=env(), check=True)
    got, want = tensors(out), tensors(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    assert metrics == (reference / "metrics.jsonl").read_text().splitlines()


# DoRA reads the gathered base weight for its norm; NF4 gathers 4-bit codes beside their scales;
# checkpointing recomputes each block's forward in backward, gathering it again.
VARIANTS = {"plain": [], "nf4": ["--quantize", "nf4"], "dora": ["--method", "dora"],
            "checkpointing": ["--gradient-checkpointing"]}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, Any]:
    """Data, flags and the adapter of one process; torchrun runs with the same global batch must match it.

    42 rows in batches of 8: the sixth step has 2 rows, so with 2 ranks × 2 micro-batches some
    ranks have no rows in it. No dropout anywhere: ranks draw other random numbers than one
    process would. float32: bf16 autocast (the default on AMX CPUs) rounds sums over a rank's rows
    differently from one process."""
    folder = tmp_path_factory.mktemp("one_process")
    train = write_classification(folder / "train.csv", 42)
    evaluation = write_classification(folder / "eval.csv", 16, seed=1)
    model = BERT.replace("layers=1", "layers=2") + ",hidden_dropout_prob=0,attention_probs_dropout_prob=0"
    args = ["train", "--quiet", "--model", model, "--data", str(train), "--eval-data", str(evaluation),
            "--targets", "query,value", "--batch-size", "8", "--grad-accum", "2", "--max-steps", "6",
            "--max-length", "32", "--lr", "5e-3", "--dropout", "0", "--bf16", "off", "--save-every", "2"]
    runs = {}
    for name, extra in VARIANTS.items():
        runs[name] = folder / name
        subprocess.run(lorakit_cmd(*args, *extra, "--out", str(runs[name])), env=env(), check=True)
    return {"args": args, "runs": runs}


def torchrun(processes: int) -> list[str]:
    """torchrun on a free port (--standalone): runs that follow each other never meet a port still held."""
    return [str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", str(processes), "-m", "lorakit"]


def assert_same_adapter(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert_close(got[key], want[key], atol=1e-5, rtol=1e-4)
    assert got["base_model.model.bert.encoder.layer.1.attention.self.query.lora_B.weight"].abs().sum() > 0


def test_torchrun_two_ranks_match_one_process(tmp_path, one_process):
    ddp = tmp_path / "ddp"
    subprocess.run([*torchrun(2), *one_process["args"], "--out", str(ddp)], env=env(), check=True,
                   timeout=600)
    assert_same_adapter(tensors(ddp), tensors(one_process["runs"]["plain"]))


@pytest.mark.parametrize("base", list(VARIANTS))
def test_sharded_two_ranks_match_one_process(tmp_path, one_process, base):
    """FSDP2 (--shard) over gloo: each rank holds half of every weight, base (NF4 too) and adapter."""
    out = tmp_path / "sharded"
    extra = VARIANTS[base]
    done = subprocess.run([*torchrun(2), *one_process["args"], *extra, "--shard", "--out", str(out)],
                          env=env(), check=True, timeout=600, capture_output=True, text=True)
    line = next(t for t in done.stdout.splitlines() if t.startswith("--shard: 2 process(es), each holding 1/2"))
    held, whole = (float(x) for x in re.search(r"([\d.]+) of ([\d.]+) KiB", line.replace(",", "")).groups())
    assert 0.45 < held / whole < 0.55, line  # each rank holds half of every weight (rounded up per tensor)
    # rank 1 builds the base's shapes only (4-bit ones too) and receives its shards from rank 0
    assert line.endswith("; the base was read by rank 0 only"), line
    assert_same_adapter(tensors(out), tensors(one_process["runs"][base]))
    # checkpoints hold whole tensors, in an unsharded run's layout
    checkpoint = torch.load(sorted((out / "checkpoints").glob("step-*.pt"))[-1], weights_only=False)
    reference = torch.load(sorted((one_process["runs"][base] / "checkpoints").glob("step-*.pt"))[-1],
                           weights_only=False)
    assert checkpoint["processes"] == 2
    for key, value in reference["trained"].items():
        assert checkpoint["trained"][key].shape == value.shape, key
    for index, state in reference["optimizer"]["state"].items():
        assert checkpoint["optimizer"]["state"][index]["exp_avg"].shape == state["exp_avg"].shape


def kill_processes_mentioning(text: str) -> int:
    """SIGKILL every process whose command line contains ``text``; how many there were."""
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command and "torchrun" not in command:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
    return killed


def test_sharded_run_killed_resumes_sharded_and_on_one_process(tmp_path, one_process):
    """A sharded run killed after a checkpoint resumes to the uninterrupted adapter, under torchrun
    with --shard or in one plain process (checkpoints do not depend on the number of processes)."""
    args = one_process["args"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*torchrun(2), *args, "--shard", "--out", str(killed)], env=env(),
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any(int(p.stem.split("-")[1]) >= 2 for p in (killed / "checkpoints").glob("step-*.pt")):
            # torchrun starts each worker in its own session: kill the workers too, not only the agent
            os.killpg(proc.pid, signal.SIGKILL)
            assert kill_processes_mentioning(str(killed)) == 2
            break
        time.sleep(0.01)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    copy = tmp_path / "copy"
    shutil.copytree(killed, copy)

    subprocess.run([*torchrun(2), *args, "--shard", "--resume", "--out", str(killed)], env=env(),
                   check=True, timeout=600)
    assert_same_adapter(tensors(killed), tensors(one_process["runs"]["plain"]))
    done = subprocess.run(lorakit_cmd(*args, "--resume", "--out", str(copy)), env=env(), check=True,
                          capture_output=True, text=True)
    assert "processes 2 → 1" in done.stdout + done.stderr
    assert_same_adapter(tensors(copy), tensors(one_process["runs"]["plain"]))
