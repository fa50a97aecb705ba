"""The pieces tests/test_serve.py serves from: a model folder with a byte-level tokenizer and eight
adapters, a uvicorn server on a free loopback port, and an independent reference model.

Imported only after test_serve.py has skipped itself when fastapi, uvicorn, openai or httpx is missing.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import torch
import uvicorn
from model_zoo import tiny_llama

import lorakit

KEY = "test-key"
ADAPTERS = [f"a{k}" for k in range(8)]
PROMPTS = ["hello", "The quick brown fox", "lorem ipsum dolor sit amet", "x", "0123456789", "Zürich, é!",
           "one two three four five six", "ab" * 9]


def byte_tokenizer():
    """A real HF fast tokenizer (byte-level BPE with no merges: one token per byte, BOS first)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>"])}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_adapter(adapted: lorakit.AdaptedModel, name: str, k: int) -> None:
    config = lorakit.AdapterConfig(method="dora" if k == 3 else "lora", r=2 + 2 * (k % 3), alpha=8,
                                   target_modules=("q_proj", "v_proj", "o_proj"))
    adapted.add_adapter(name, config, activate=False)
    g = torch.Generator().manual_seed(100 + k)
    with torch.no_grad():
        for module in adapted.adapter_modules(name).values():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.5)


def build_folder(root: Path) -> None:
    model = tiny_llama(vocab=264)
    for config in (model.config, model.generation_config):
        config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    tokenizer = byte_tokenizer()
    readable = [i for i in range(3, 259) if 32 <= ord(tokenizer.decode([i])[0]) < 127]
    keep = torch.zeros(model.lm_head.weight.shape[0], 1)
    keep[[*readable, 2]] = 20.0
    with torch.no_grad():  # readable text (printable ASCII or EOS), logits spread far from ties
        model.lm_head.weight.mul_(keep)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapted = lorakit.AdaptedModel(model)
    for k, name in enumerate([*ADAPTERS, "spare"]):
        make_adapter(adapted, name, k)
        folder = root / ("outside" if name == "spare" else "adapters") / name
        lorakit.save_adapter(adapted, folder, name=name)


@contextlib.contextmanager
def running(app):
    """uvicorn in a background thread on a free loopback port; yields the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


class Reference:
    """Independent single-request greedy generation with transformers' own generate()."""

    def __init__(self, root: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = lorakit.AdaptedModel(AutoModelForCausalLM.from_pretrained(root / "base").eval())
        for name in ADAPTERS:
            lorakit.load_adapter(self.model, root / "adapters" / name, name=name, activate=False)
        self.tokenizer = byte_tokenizer()
        self.cache: dict[tuple, str] = {}

    def ids(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def greedy(self, adapter: str, prompt: str | list[int], max_tokens: int) -> str:
        ids = self.ids(prompt) if isinstance(prompt, str) else prompt
        key = (adapter, tuple(ids), max_tokens)
        if key not in self.cache:
            x = torch.tensor([ids])
            with torch.no_grad():
                out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), adapter_names=[adapter],
                                          max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
            self.cache[key] = self.tokenizer.decode(out[0, x.shape[1]:], skip_special_tokens=True)
        return self.cache[key]
