"""--shard's pieces that need no process group: which modules become FSDP units, and the runs it refuses.
Sharded training itself runs under torchrun in tests/test_train_processes.py (and on CUDA in test_cuda.py)."""

from __future__ import annotations

import pytest
from model_zoo import tiny_gpt2, tiny_llama
from torch import nn

from lorakit.errors import ConfigError
from lorakit.train.config import TrainConfig
from lorakit.train.sharding import check_shardable, transformer_blocks


def test_blocks_are_the_models_own_no_split_classes():
    llama = tiny_llama(layers=3)
    assert transformer_blocks(llama) == list(llama.model.layers)
    gpt2 = tiny_gpt2(layers=2)
    assert transformer_blocks(gpt2) == list(gpt2.transformer.h)


def test_blocks_of_a_plain_model_are_its_longest_list_of_identical_layers():
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.ModuleList([nn.Linear(4, 4), nn.ReLU()])  # mixed classes: not blocks
            self.body = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(3)])
            self.pair = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    model = Plain()
    assert transformer_blocks(model) == list(model.body)


@pytest.mark.parametrize("method", ["delta-lora", "full", "head"])
def test_shard_refuses_runs_that_write_or_train_the_base(method):
    with pytest.raises(ConfigError, match=f"--method {method}.*without --shard"):
        TrainConfig(shard=True, method=method)


def test_shard_refuses_an_int8_base_before_any_work():
    with pytest.raises(ConfigError, match=r"8-bit base.*nf4"):
        TrainConfig(shard=True, quantize="int8")


def test_an_int8_layer_is_refused_by_name():
    bnb = pytest.importorskip("bitsandbytes")
    model = nn.Sequential(bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=False))
    with pytest.raises(ConfigError, match="0 is bitsandbytes' Linear8bitLt"):
        check_shardable(model)
