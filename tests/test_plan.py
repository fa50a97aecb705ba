"""lorakit plan: the shape-only step against real CPU runs of the same tiny models, the NF4 bytes
against bitsandbytes' own storage, the extrapolation against a whole measurement, the
recommendation, and the command's errors.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.plan import planner
from lorakit.plan.command import parse_size
from lorakit.plan.memory import GiB, usable_bytes
from lorakit.plan.nf4 import nf4_weight_bytes
from lorakit.plan.planner import Plan, PlanRequest, Variant, measure, recommend
from lorakit.plan.shapes import model_source
from lorakit.plan.step import ExtrapolatedStep, StepMeasurement, full_batch, measure_step
from lorakit.plan.tracker import StaticBytes, static_bytes
from lorakit.train.config import TrainConfig
from lorakit.train.loop import batch_loss
from lorakit.train.models import load_model
from lorakit.train.setup import adapter_config

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

LLAMA = "random:llama,hidden=64,layers=2,heads=4,kv_heads=2,vocab=512,intermediate=128"
GPT2 = "random:gpt2,hidden=64,layers=2,heads=4,vocab=512"
ROWS, LENGTH = 2, 32


def settings(spec: str = LLAMA, **changes) -> TrainConfig:
    task = "causal-lm" if model_source(spec).causal_lm else "classify"
    values = {"model": spec, "task": task, "rank": 4, "targets": "all-linear", "batch_size": ROWS,
              "max_length": LENGTH, "bf16": "off", **changes}
    return TrainConfig(**values)


def request(train: TrainConfig, **changes) -> PlanRequest:
    source = model_source(train.model)
    values = {"source": source, "train": train, "dtype": source.stored_dtype, "autocast": train.bf16 == "on",
              **changes}
    return PlanRequest(**values)


def real_model(train: TrainConfig) -> torch.nn.Module:
    """The model `lorakit train` prepares (train.setup.prepare's order): loaded, quantised,
    checkpointed, adapted."""
    torch.manual_seed(0)
    model = load_model(train.model, train.task, num_labels=2)
    if train.quantize == "nf4":
        from lorakit.quantize import quantize_model

        model = quantize_model(model, "nf4")
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return lorakit.adapt(model, adapter_config(train, model))


def autocast(train: TrainConfig):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=train.bf16 == "on")


def saved_by_data_ptr(model: torch.nn.Module, train: TrainConfig) -> int:
    """Bytes autograd saves in a real forward, counted apart from the plan's code: each storage
    once by its address, the model's own tensors and the batch left out (as benchmarks/_common.py counts)."""
    batch = full_batch(ROWS, LENGTH, train.task == "causal-lm", torch.device("cpu"))
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), *batch.values())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with autocast(train), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = batch_loss(model, batch)
    loss.backward()
    return sum(saved.values())


@pytest.mark.parametrize("spec, changes", [
    (LLAMA, {}),
    (LLAMA, {"bf16": "on"}),
    (LLAMA, {"gradient_checkpointing": True, "bf16": "on"}),
    (LLAMA, {"method": "dora", "rank_pattern": "q_proj=8"}),
    (GPT2, {"bf16": "on"}),
    ("default", {"targets": "query,value"}),  # the shipped MiniLM, classify: a trained head copy too
])
def test_shape_only_step_allocates_what_a_real_cpu_step_does(spec, changes):
    train = settings(spec, **changes)
    planned = measure(request(train), train.gradient_checkpointing, nf4=False, extrapolate=False)
    model = real_model(train)
    for module in model.modules():  # DoRA caches W's row norms from its init on a real base; a
        if hasattr(module, "_w_sq"):  # meta base has none, so its step makes them: let both make them
            module._w_sq = module._w_sq_key = module._norm = module._norm_key = None
    real = measure_step(model, full_batch(ROWS, LENGTH, train.task == "causal-lm", torch.device("cpu")),
                        autocast(train), values_known=True)
    # weights, adapters, gradients and AdamW's state: the same bytes as the real model's tensors
    assert planned.static == static_bytes(model)
    assert planned.step.optimizer_state == real.optimizer_state == 2 * planned.static.trainable + 4 * len(
        [p for p in model.parameters() if p.requires_grad])  # two moments, and a float32 step count each
    # what the forward leaves for the backward, and the whole step's timeline
    assert planned.step.activations == real.activations
    assert planned.step.peak() == real.peak() and planned.step.peak(0.5) == real.peak(0.5)
    assert planned.step.flops == real.flops
    if not train.gradient_checkpointing:  # checkpointing keeps its block inputs outside autograd's hooks
        assert planned.step.saved == saved_by_data_ptr(real_model(train), train)


def test_flops_count_no_weight_gradients_for_the_frozen_base():
    """Forward and backward FLOPs of a 2-block Llama (float32: lorakit's fused LoRA path), term by term."""
    train = settings(LLAMA)
    planned = measure(request(train), False, False, extrapolate=False)
    tokens, r, expected = ROWS * LENGTH, train.rank, 0
    for path, layer in real_model(train).adapted_layers().items():
        n_in, n_out = layer.kind.in_features, layer.kind.out_features
        expected += 2 * tokens * (n_in * n_out + n_in * r + r * n_out)  # W x, A x, B (A x)
        expected += 2 * tokens * (n_out * r + r * n_in + r * n_out)  # g B, grad A, grad B
        if not path.startswith("model.layers.0.self_attn.") or path.endswith("o_proj"):
            # grad x = g W + (g B) A; block 0's q, k, v read the frozen embeddings and need none
            expected += 2 * tokens * (n_out * n_in + r * n_in)
    hidden, vocab, heads, head_dim, layers = 64, 512, 4, 16, 2
    expected += 2 * 2 * tokens * hidden * vocab  # the frozen LM head: forward and grad x only
    # SDPA's CPU flash kernel: Q Kᵀ and P V forward, five such products backward; causal: half
    expected += layers * (4 + 10) * ROWS * heads * LENGTH * LENGTH * head_dim // 2
    assert planned.step.flops == expected


@needs_bnb
def test_nf4_bytes_are_what_bitsandbytes_stores():
    import bitsandbytes as bnb

    train = settings(quantize="nf4", bf16="on")
    model = real_model(train)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    state_bytes = 0
    for layer in layers:
        state = layer.weight.quant_state
        tensors = [layer.weight, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
        assert sum(t.nbytes for t in tensors) == nf4_weight_bytes(layer.out_features, layer.in_features)
        state_bytes += sum(t.nbytes for t in tensors[1:])  # quant_state is no parameter or buffer of the model
    planned = measure(request(train), False, nf4=True, extrapolate=False)
    assert len(layers) == 14
    assert planned.static.base == static_bytes(model).base + state_bytes
    assert planned.static.adapter == static_bytes(model).adapter
    real = measure_step(model, full_batch(ROWS, LENGTH, True, torch.device("cpu")), autocast(train),
                        values_known=True)
    assert planned.step.activations == real.activations and planned.step.peak() == real.peak()


@pytest.mark.parametrize("changes", [{}, {"gradient_checkpointing": True, "bf16": "on"}])
def test_identical_blocks_extrapolate_exactly_from_cut_copies(changes):
    train = settings(LLAMA.replace("layers=2", "layers=5"), **changes)
    whole = measure(request(train), train.gradient_checkpointing, False, extrapolate=False)
    cut = measure(request(train), train.gradient_checkpointing, False)
    assert isinstance(cut.step, ExtrapolatedStep) and isinstance(whole.step, StepMeasurement)
    assert cut.static == whole.static
    for figure in ("activations", "saved", "optimizer_state", "flops"):
        assert getattr(cut.step, figure) == getattr(whole.step, figure), figure
    assert cut.step.peak() == whole.step.peak() and cut.step.peak(0.25) == whole.step.peak(0.25)
    # adapters on some blocks only: the blocks differ, so the whole model is measured
    some = dataclasses.replace(train, layers_to_transform="0,1")
    assert isinstance(measure(request(some), False, False).step, StepMeasurement)


def _variant(checkpointing: bool, nf4: bool, base: int, peak: int) -> Variant:
    """A measured setting reduced to what the recommendation reads: one row's step peak at the
    start of a 3-event backward, 0.4 GiB of adapters."""
    adapter = int(0.4 * GiB)
    static = StaticBytes(base=base, adapter=adapter, trainable=adapter, trainable_params=adapter // 4,
                         base_params=69 * 10**9)
    step = StepMeasurement(rows=1, length=512, activations=peak // 2, saved=peak // 2, optimizer_state=2 * adapter,
                           flops=10**12, other=[peak // 2, peak, peak // 3], grads=[0, 0, adapter],
                           phase_ends=(1, 3))
    return Variant(checkpointing, nf4, static, planner.Blocks(largest=GiB // 2, root=GiB), step, 560)


def _plan(devices: int, memory: str, shard: bool = False, batch_size: int | None = None) -> Plan:
    """A 70B-shaped plan whose four settings are given, not measured: the bf16 base 128 GiB, NF4
    34 GiB; one row's step 6 GiB without checkpointing and 1 GiB with it."""
    train = TrainConfig(model="llama-2-70b", task="causal-lm", rank=16, targets="all-linear",
                        batch_size=batch_size or devices, max_length=512)
    plan = Plan(request(train, dtype=torch.bfloat16, autocast=True, devices=devices,
                        device_memory=parse_size(memory), shard=shard))
    for checkpointing in (False, True):
        for nf4 in (False, True):
            plan.variants[(checkpointing, nf4)] = _variant(checkpointing, nf4, (34 if nf4 else 128) * GiB,
                                                           (1 if checkpointing else 6) * GiB)
    return plan


@pytest.mark.parametrize("devices, memory, shard, flags", [
    (2, "24GiB", False, ["--quantize nf4", "--gradient-checkpointing", "--shard (over the 2 devices)"]),
    (2, "32GiB", False, ["--quantize nf4", "--shard (over the 2 devices)"]),
    (1, "80GiB", False, ["--quantize nf4"]),
    (4, "80GiB", True, []),  # 128 / 4 + 6 GiB + gathered blocks
    (4, "80GiB", False, ["--shard (over the 4 devices)"]),  # unsharded, each GPU would hold the whole bf16 base
])
def test_recommendation_is_the_cheapest_change_that_fits(devices, memory, shard, flags):
    plan = _plan(devices, memory, shard)
    advice = recommend(plan)
    assert advice.fits and advice.flags == flags
    assert advice.total <= advice.usable == usable_bytes(parse_size(memory))


def test_recommendation_without_a_fitting_change_says_how_many_devices_would_do(monkeypatch):
    monkeypatch.setattr(planner, "measure", lambda *a, **k: pytest.fail("one row cannot be split further"))
    advice = recommend(_plan(1, "24GiB"))
    assert not advice.fits and advice.rows == 1
    assert advice.flags == ["--quantize nf4", "--gradient-checkpointing"]
    assert advice.devices_needed == 2 and "sharded (--shard) over 2 such GPUs it would" in advice.text


def test_fewer_rows_are_suggested_as_gradient_accumulation(monkeypatch):
    plan = _plan(1, "46GiB", batch_size=16)
    for key, variant in plan.variants.items():  # the given 16 rows: 16 × the one-row step
        plan.variants[key] = dataclasses.replace(variant, step=variant.step.with_rows(16))
    measured = []

    def at_rows(request, checkpointing, nf4, rows=None, **_):
        measured.append(rows)
        variant = plan.variants[(checkpointing, nf4)]
        return dataclasses.replace(variant, step=variant.step.with_rows(rows))

    monkeypatch.setattr(planner, "measure", at_rows)
    advice = recommend(plan)
    # usable 40.4 GiB; NF4 34 + adapters 0.4 + AdamW 0.8 GiB leave 5 rows of 1 GiB with checkpointing
    assert not advice.fits and measured == [5]
    assert advice.rows == 5 and advice.grad_accum == 4
    assert advice.flags == ["--quantize nf4", "--gradient-checkpointing", "--grad-accum 4"]
    assert "5 rows per device fit: --grad-accum 4 (same --batch-size 16)" in advice.text


@pytest.mark.parametrize("text, expected", [("80GiB", 80 * 2**30), ("24GB", 24 * 10**9), ("512 MiB", 512 * 2**20),
                                            ("1.5TiB", int(1.5 * 2**40))])
def test_sizes_read_both_unit_systems(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model"], "is not a folder, a config.json, 'default', 'smollm2'"),
    (["--model", "llama-2-7b", "--gpu-memory", "80"], "--gpu-memory takes a size with its unit, e.g. 80GiB"),
    (["--model", "llama-2-7b", "--gpu-memory", "lots"], "--gpu-memory takes a size with its unit"),
    (["--model", "llama-2-7b", "--shard"], "--shard divides the weights over --gpus"),
    (["--model", "llama-2-7b", "--quantize", "int8"], "models --quantize nf4 (QLoRA), not int8"),
    (["--model", "llama-2-7b", "--method", "nope"], "--method must be one of"),
])
def test_bad_arguments_are_refused_with_a_clear_error(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_folder_needs_only_its_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512,
         "dtype": "bfloat16"}))
    assert main(["plan", "--model", str(tmp_path), "--batch-size", "2", "--max-length", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "bf16" and report["task"] == "causal-lm" and report["recommendation"]["fits"]
    for variant in report["variants"]:
        device = variant["per_device"]
        assert device["total"] == (device["base"] + device["adapter"] + device["optimizer"] + device["step_peak"]
                                   + device["gathered"] + device["ddp_buckets"])
    assert main(["plan", "--model", str(tmp_path / "config.json"), "--batch-size", "2", "--max-length", "64"]) == 0
    assert "recommendation: fits as given" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["plan", "--model", str(tmp_path / "empty")]) == 2
    assert "the folder has no config.json" in capsys.readouterr().err
