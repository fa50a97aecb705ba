"""Real processes: a run killed with SIGKILL resumes to the same adapter; torchrun with 2 ranks
matches one process with the same global batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def test_torchrun_two_ranks_match_one_process(tmp_path):
    train = write_classification(tmp_path / "train.csv", 40)
    evaluation = write_classification(tmp_path / "eval.csv", 16, seed=1)
    # No dropout anywhere: ranks draw other random numbers than one process would. float32: bf16
    # autocast (the default on AMX CPUs) rounds sums over a rank's rows differently from one process.
    model = BERT + ",hidden_dropout_prob=0,attention_probs_dropout_prob=0"
    args = ["train", "--quiet", "--model", model, "--data", str(train), "--eval-data", str(evaluation),
            "--targets", "query,value", "--batch-size", "8", "--grad-accum", "2", "--max-steps", "6",
            "--max-length", "32", "--lr", "5e-3", "--dropout", "0", "--bf16", "off"]
    single = tmp_path / "single"
    subprocess.run(lorakit_cmd(*args, "--out", str(single)), env=env(), check=True)
    ddp = tmp_path / "ddp"
    torchrun = [str(VENV_BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", "29533", "-m", "lorakit"]
    subprocess.run([*torchrun, *args, "--out", str(ddp)], env=env(), check=True, timeout=600)
    got, want = tensors(ddp), tensors(single)
    assert got.keys() == want.keys()
    for key in want:
        assert_close(got[key], want[key], atol=1e-5, rtol=1e-4)
    assert (got["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"]).abs().sum() > 0
