"""Parameter reports: PEFT's one-line form, exact on Llama-2-7B's shape, and the per-module table."""

from __future__ import annotations

import torch
from torch import nn

import lorakit


def test_llama2_7b_counts_match_peft_exactly():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    am = lorakit.adapt(model, lorakit.AdapterConfig(r=8, target_modules=["q_proj", "v_proj"]))
    assert am.parameter_summary() == (
        "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622"
    )


def test_module_table_lists_each_adapted_module():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    am = lorakit.adapt(model, lorakit.AdapterConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    table = lorakit.module_table(am).splitlines()
    assert table[0].split() == ["module", "adapter", "kind", "method", "rank", "scaling", "trainable"]
    assert table[2].split() == ["0", "default", "Linear", "lora", "2", "4", "24"]  # 2*4 + 8*2
    assert table[3].split() == ["2", "default", "Linear", "full", "copy", "-", "-", "18"]
    trainable = sum(p.numel() for p in am.trainable_parameters())
    assert am.parameter_summary().startswith(f"trainable params: {trainable:,d} ")
