"""--shard on CUDA (NCCL): skipped without a GPU.

With one GPU, torchrun runs one process: FSDP still shards (across one rank), so the code that
moves shards to the device, gathers them and keeps NF4 scales beside them runs for real. With two
or more GPUs, two processes split the weights. Either way the adapter must match an unsharded
one-process run on the same GPU."""

from __future__ import annotations

import subprocess

import pytest
import torch
from test_train import write_classification
from test_train_processes import BERT, env, lorakit_cmd, tensors, torchrun
from torch.testing import assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_sharded_run_on_cuda_matches_one_unsharded_process(tmp_path, quantize):
    processes = 2 if torch.cuda.device_count() >= 2 else 1
    train = write_classification(tmp_path / "train.csv", 40)
    evaluation = write_classification(tmp_path / "eval.csv", 16, seed=1)
    model = BERT.replace("layers=1", "layers=2") + ",hidden_dropout_prob=0,attention_probs_dropout_prob=0"
    args = ["train", "--quiet", "--model", model, "--data", str(train), "--eval-data", str(evaluation),
            "--targets", "query,value", "--batch-size", "8", "--max-steps", "4", "--max-length", "32",
            "--lr", "5e-3", "--dropout", "0", "--bf16", "off", "--quantize", quantize]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    subprocess.run(lorakit_cmd(*args, "--out", str(single)), env=env(), check=True, timeout=600)
    done = subprocess.run([*torchrun(processes), *args, "--shard", "--out", str(sharded)], env=env(),
                          check=True, timeout=600, capture_output=True, text=True)
    assert f"--shard: {processes} process(es)" in done.stdout
    got, want = tensors(sharded), tensors(single)
    assert got.keys() == want.keys()
    for key in want:
        assert_close(got[key], want[key], atol=1e-4, rtol=1e-3)  # TF32 and reduction order on the GPU
