"""`lorakit train --pack`: packed rows compute what unpacked rows compute, only with less padding."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_train import refused
from torch import nn

import lorakit
from lorakit.cli import main
from lorakit.train import batches as B
from lorakit.train import packing
from lorakit.train.config import TrainConfig
from lorakit.train.loop import batch_loss, resume_changes

LLAMA = "random:llama,hidden=32,layers=1,heads=2,kv_heads=2,intermediate=64"


def examples(lengths: list[int], prompt: int = 2, vocab: int = 128, seed: int = 0) -> list[B.Encoded]:
    """Encoded causal-LM examples: ``prompt`` tokens without loss, then answer tokens with it."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        cut = min(prompt, n - 1)
        out.append(B.Encoded(ids, [B.IGNORE] * cut + ids[cut:]))
    return out


# transformers' eager attention takes its softmax in float32 whatever the model's dtype, and rows of other
# widths sum it in another order: there packed and unpacked agree to float32 rounding only.
TOLERANCE = {"sdpa": 1e-10, "eager": 1e-5}


def tiny(arch: str, attention: str) -> nn.Module:
    """A float64 random Llama (grouped-query attention) or GPT-2 with the given attention implementation."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, attn_implementation=attention)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
                            attn_implementation=attention)
        model = GPT2LMHeadModel(config)
    assert model.config._attn_implementation == attention
    return model.double().eval()


# -- the layout -----------------------------------------------------------------------------
def test_first_fit_decreasing_places_longest_first_into_the_first_row_with_room():
    assert packing.first_fit_decreasing([2, 5, 3, 4], 7) == [[1, 0], [3, 2]]
    assert packing.first_fit_decreasing([3, 3, 3], 6) == [[0, 1], [2]]  # ties keep their order
    with pytest.raises(ValueError, match="8 tokens cannot fit a packed row of 7"):
        packing.first_fit_decreasing([2, 8], 7)


def test_rows_never_exceed_max_length_and_every_example_appears_once_with_its_labels():
    rng = random.Random(1)
    for trial in range(30):
        max_length = rng.randint(8, 40)
        items = examples([rng.randint(2, max_length) for _ in range(rng.randint(1, 12))], seed=trial)
        batch = packing.pack(items, max_length, pad_id=0)
        rows, width = batch["input_ids"].shape
        assert width <= max_length
        assert batch["attention_mask"].shape == (rows, 1, width, width)
        found = []
        for r in range(rows):
            starts = [*(batch["position_ids"][r] == 0).nonzero().flatten().tolist(), width]
            for start, end in itertools.pairwise(starts):
                ids = batch["input_ids"][r, start:end].tolist()
                labels = batch["labels"][r, start:end].tolist()
                found.append((ids, labels))
                assert batch["position_ids"][r, start:end].tolist() == list(range(end - start))
        for item in items:  # each example once, its first label masked, the rest kept
            match = [f for f in found if f[0] == item.input_ids]
            assert len(match) == 1
            assert match[0][1] == [B.IGNORE, *item.labels[1:]]
            found.remove(match[0])
        assert all(set(labels) == {B.IGNORE} for _, labels in found)  # only padding is left
        assert int((batch["labels"] != B.IGNORE).sum()) == B.loss_units(items)  # the same targets count


def test_the_mask_keeps_attention_causal_inside_each_example():
    items = examples([3, 2])
    mask = packing.pack(items, 8, 0)["attention_mask"][0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]])
    assert torch.equal(mask, expected.bool())
    additive = packing.pack(items, 8, 0, mask="additive", dtype=torch.float64)["attention_mask"][0, 0]
    assert torch.equal(additive == 0, expected.bool())
    assert additive.min() == torch.finfo(torch.float64).min


def test_padding_share_counts_the_positions_each_layout_occupies():
    train = examples([10, 2, 6, 4])
    assert packing.layout_size([10, 2, 6, 4], None) == 4 * 10
    assert packing.layout_size([10, 2, 6, 4], 12) == 2 * 12  # rows [10, 2] and [6, 4]
    # two ranks, two micro-batches each: every rank's layout counted, without communication
    tokens, positions = packing.step_tokens(train, [0, 1, 2, 3], accumulation=2, world=2, max_length=None)
    assert (tokens, positions) == (22, 10 + 2 + 6 + 4)


# -- what the model computes ----------------------------------------------------------------
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_logits_equal_each_examples_unpacked_logits(arch, attention):
    model = tiny(arch, attention)
    items = examples([7, 3, 5, 2, 6], seed=2)
    packer = packing.Packer.for_model(model, max_length=12, pad_id=0)
    assert packer.mask == packing.MASK_KINDS[attention]
    batch = packer.batch(items)
    assert batch["input_ids"].shape[0] < len(items)  # several examples do share a row
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        unpacked = model(**{k: v for k, v in B.collate(items, 0).items() if k != "labels"}).logits
    rows = packing.first_fit_decreasing([len(i.input_ids) for i in items], 12)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = len(items[i].input_ids)
            torch.testing.assert_close(packed[r, start:start + n], unpacked[i, :n], atol=TOLERANCE[attention], rtol=0)
            start += n


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_loss_and_gradients_equal_unpacked_on_the_same_micro_batch_in_float64(attention):
    adapted = lorakit.adapt(tiny("llama", attention), lorakit.AdapterConfig(r=4, target_modules="all-linear"))
    adapted.double()  # the adapter's own tensors start in float32
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:  # B starts at zero: make A's gradient non-zero too
                p.normal_(0, 0.5)
    adapted.train()
    # with a prompt (first label ignored anyway), and without (plain text: its first label is an answer token)
    items = examples([9, 4, 6], prompt=3, seed=3) + examples([3, 8, 5], prompt=0, seed=4)
    trainable = [p for p in adapted.parameters() if p.requires_grad]

    def loss_and_grads(batch):
        adapted.zero_grad(set_to_none=True)
        loss, units = batch_loss(adapted, batch)
        loss.backward()
        return loss.detach(), units, [p.grad.clone() for p in trainable]

    plain_loss, plain_units, plain_grads = loss_and_grads(B.collate(items, 0))
    packer = packing.Packer.for_model(adapted, max_length=16, pad_id=0)
    packed_loss, packed_units, packed_grads = loss_and_grads(packer.batch(items))
    assert packed_units == plain_units == B.loss_units(items)
    tolerance = TOLERANCE[attention]
    assert abs(packed_loss.item() - plain_loss.item()) < tolerance * plain_loss.item()
    assert all(g.abs().max() > 0 for g in plain_grads)
    for packed, plain in zip(packed_grads, plain_grads, strict=True):
        assert (packed - plain).abs().max() <= tolerance * plain.abs().max()  # relative to the tensor's scale


# -- end to end -----------------------------------------------------------------------------
def lm_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta"]
    return [{"prompt": f"Q{i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(0, 5))),
             "completion": " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))} for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_with_pack_gives_the_unpacked_adapter_with_less_padding(tmp_path, monkeypatch):
    laid_out = []  # (examples, rows) of every packed micro-batch the loop built
    original = packing.pack

    def spy(items, *args, **kwargs):
        batch = original(items, *args, **kwargs)
        laid_out.append((len(items), batch["input_ids"].shape[0]))
        return batch

    monkeypatch.setattr(packing, "pack", spy)
    data = write_jsonl(tmp_path / "train.jsonl", lm_rows(24, 0))
    held = write_jsonl(tmp_path / "eval.jsonl", lm_rows(4, 1))
    runs = {}
    for pack in (False, True):
        out = tmp_path / f"pack-{pack}"
        args = ["train", "--quiet", "--task", "causal-lm", "--model", LLAMA, "--data", str(data), "--eval-data",
                str(held), "--out", str(out), "--max-steps", "3", "--batch-size", "8", "--grad-accum", "2",
                "--max-length", "96", "--targets", "all-linear", "--dropout", "0", "--bf16", "off", "--lr", "1e-2",
                "--general-samples", "0", "--threads", "1"]
        laid_out.clear()
        assert main(args + (["--pack"] if pack else [])) == 0
        assert bool(laid_out) == pack
        if pack:  # 3 steps × 2 micro-batches of 4 examples, each in fewer rows (the probe's three come first)
            assert [n for n, _ in laid_out[3:]] == [4] * 6 and all(rows < n for n, rows in laid_out[3:])
        runs[pack] = (load_file(out / "adapter" / "adapter_model.safetensors"),
                      json.loads((out / "summary.json").read_text()))
    (plain, plain_summary), (packed, packed_summary) = runs[False], runs[True]
    assert plain.keys() == packed.keys()
    moved = [k for k in plain if "lora_B" in k]
    assert moved and all(plain[k].abs().max() > 0 for k in moved)  # it trained
    for k in plain:
        torch.testing.assert_close(packed[k], plain[k], atol=1e-5, rtol=1e-4)
    assert packed_summary["tokens_per_second"] > 0 and plain_summary["tokens_per_second"] > 0
    assert 0 <= packed_summary["padding_share"] < plain_summary["padding_share"] < 1


def test_pack_with_classification_is_refused(tmp_path, capsys):
    refused(tmp_path, capsys, ["--task", "classify", "--pack"], "--pack lays causal-LM examples end to end")


def test_resuming_with_another_pack_setting_is_refused():
    with pytest.raises(lorakit.ConfigError, match="--pack False → True"):
        resume_changes({}, TrainConfig(task="causal-lm", pack=True))  # a checkpoint from before --pack existed


class Leaky(nn.Module):
    """A causal LM whose attention ignores the mask: each token sees the mean of all before it."""

    def __init__(self, attention: str = "sdpa") -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="leaky", _attn_implementation=attention, vocab_size=32)
        self.embed = nn.Embedding(32, 8)
        self.head = nn.Linear(8, 32)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        hidden = self.embed(input_ids).cumsum(1) / torch.arange(1, input_ids.shape[1] + 1)[:, None]
        return SimpleNamespace(logits=self.head(hidden))


class Positionless(Leaky):
    """Attention kept inside each example, but positions counted from the row's start."""

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return SimpleNamespace(logits=self.head(self.embed(input_ids) * torch.arange(input_ids.shape[1])[:, None]))


def test_models_that_cannot_keep_packed_examples_apart_are_refused_by_name():
    from transformers import MambaConfig, MambaForCausalLM

    with pytest.raises(lorakit.ConfigError, match="this leaky model's attention does not keep packed examples apart"):
        packing.Packer.for_model(Leaky(), 64, 0)
    with pytest.raises(lorakit.ConfigError, match="this leaky model does not restart positions"):
        packing.Packer.for_model(Positionless(), 64, 0)
    with pytest.raises(lorakit.ConfigError, match="this leaky model uses flash_attention_2"):
        packing.Packer.for_model(Leaky("flash_attention_2"), 64, 0)
    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4))
    with pytest.raises(lorakit.ConfigError, match="this mamba model's forward takes no position_ids"):
        packing.Packer.for_model(lorakit.adapt(mamba, lorakit.AdapterConfig(target_modules="all-linear")), 64, 0)


def test_torchrun_two_ranks_with_pack_match_one_unpacked_process(tmp_path):
    """Each rank packs its own share of a micro-batch; the update is the unpacked one process's."""
    data = write_jsonl(tmp_path / "train.jsonl", lm_rows(24, 0))
    held = write_jsonl(tmp_path / "eval.jsonl", lm_rows(4, 1))
    args = ["train", "--quiet", "--task", "causal-lm", "--model", LLAMA, "--data", str(data), "--eval-data", str(held),
            "--max-steps", "3", "--batch-size", "8", "--grad-accum", "2", "--max-length", "96", "--targets",
            "all-linear", "--dropout", "0", "--bf16", "off", "--lr", "1e-2", "--general-samples", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    single = tmp_path / "single"
    assert main([*args, "--out", str(single), "--threads", "1"]) == 0
    ddp = tmp_path / "ddp"
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
                "-m", "lorakit"]
    subprocess.run([*torchrun, *args, "--pack", "--out", str(ddp)], env=env, check=True, timeout=600)
    got = load_file(ddp / "adapter" / "adapter_model.safetensors")
    want = load_file(single / "adapter" / "adapter_model.safetensors")
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4)
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["padding_share"] < json.loads((single / "summary.json").read_text())["padding_share"]
