"""Mixed-adapter batches: each row with its own adapter equals running that row alone."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_zoo import tiny_llama
from test_methods import randomise
from torch import nn
from torch.testing import assert_close

import lorakit

NAMES = ["lora", "fa", "vera", "dora", "wide", "base"]


@pytest.fixture(scope="module")
def served() -> lorakit.AdaptedModel:
    """One frozen Llama carrying LoRA, LoRA-FA, VeRA, DoRA and a wider-rank LoRA."""
    base = tiny_llama(layers=2)
    am = lorakit.adapt(base, lorakit.AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]), "lora")
    am.add_adapter("fa", lorakit.AdapterConfig(method="lora-fa", r=2, target_modules="all-linear"))
    am.add_adapter("vera", lorakit.AdapterConfig(method="vera", r=8, target_modules=["q_proj", "o_proj"]))
    am.add_adapter("dora", lorakit.AdapterConfig(method="dora", r=3, target_modules="all-linear"))
    am.add_adapter("wide", lorakit.AdapterConfig(r=16, alpha=4, use_rslora=True, target_modules=["k_proj", "up_proj"]))
    randomise(am, seed=3)
    with torch.no_grad():  # updates of a realistic size: large random ones only amplify rounding noise
        for name, p in am.named_parameters():
            if name.endswith(("lora_B", "vera_lambda_b")):
                p.mul_(0.1)
    am.eval()
    return am


def alone(am: lorakit.AdaptedModel, name: str, ids: torch.Tensor) -> torch.Tensor:
    if name == "base":
        with am.base_only():
            return am(input_ids=ids).logits
    active = am.active
    am.set_active(name)
    try:
        return am(input_ids=ids).logits
    finally:
        am.set_active(*active)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(NAMES), min_size=1, max_size=6), st.integers(0, 2**16), st.sampled_from([1, 5]))
def test_mixed_batch_equals_each_row_alone(served, names, seed, length):
    """Rows of 5 tokens take the gathered path, rows of one token (a decoding step) the other."""
    ids = torch.randint(0, 128, (len(names), length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        mixed = served(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            assert_close(mixed[row], alone(served, name, ids[row:row + 1])[0], atol=1e-5, rtol=1e-5)


def test_mixed_generate_equals_each_row_alone(served):
    names = ["dora", "base", "lora", "vera"]
    prompt = torch.randint(0, 128, (4, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = served.generate(input_ids=prompt, adapter_names=names, max_new_tokens=6, do_sample=False,
                                pad_token_id=0)
        for row, name in enumerate(names):
            if name == "base":
                with served.base_only():
                    single = served.generate(input_ids=prompt[row:row + 1], max_new_tokens=6, do_sample=False,
                                             pad_token_id=0)
            else:
                served.set_active(name)
                single = served.generate(input_ids=prompt[row:row + 1], max_new_tokens=6, do_sample=False,
                                         pad_token_id=0)
            n = single.shape[1]  # a row that hit end-of-sequence alone stops early; the batch pads it
            assert torch.equal(mixed[row, :n], single[0]), name
            assert (mixed[row, n:] == 0).all(), name
    served.set_active("lora")


def test_mixed_batch_uses_one_batched_product_per_layer(served, monkeypatch):
    """A gather plus bmm, not a loop over sub-batches: the number of bmm calls is independent of the mix."""
    calls = []
    real = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(0, 128, (5, 3))
    with torch.no_grad():
        served(input_ids=ids, adapter_names=["dora"] * 5)  # dora covers every linear layer
        one = len(calls)
        calls.clear()
        served(input_ids=ids, adapter_names=["lora", "fa", "vera", "dora", "wide"])
    assert len(calls) == one > 0


def test_unknown_name_in_a_batch_is_an_error(served):
    with pytest.raises(lorakit.AdapterNotFoundError, match="loar"):
        served(input_ids=torch.zeros(2, 3, dtype=torch.long), adapter_names=["lora", "loar"])


def test_heads_follow_their_rows():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    am = lorakit.adapt(model, lorakit.AdapterConfig(r=2, target_modules=["0"], modules_to_save=["1"]), "a")
    am.add_adapter("b", lorakit.AdapterConfig(r=2, target_modules=["0"], modules_to_save=["1"]))
    randomise(am)
    with torch.no_grad():
        for i, copy_ in enumerate(am.model[1].copies.values()):
            copy_.weight.add_(i + 1.0)
    x = torch.randn(3, 4)
    mixed = am(x, adapter_names=["b", "base", "a"])
    am.set_active("b")
    assert_close(mixed[0], am(x[:1])[0])
    am.set_active("a")
    assert_close(mixed[2], am(x[2:])[0])
    with am.base_only():
        assert_close(mixed[1], am(x[1:2])[0])


def base_weights(am: lorakit.AdaptedModel) -> dict[str, torch.Tensor]:
    """Every base weight by module path, seen through lorakit's wrappers."""
    from lorakit.targets import plain_modules

    return {p: m.weight.detach().clone() for p, m in plain_modules(am.model).items() if hasattr(m, "weight")}


def test_hot_swap_replaces_for_the_next_batch_and_refuses_bad_files(tmp_path):
    base = tiny_llama(layers=1)
    first = lorakit.adapt(copy.deepcopy(base), lorakit.AdapterConfig(r=2, target_modules=["q_proj"]))
    randomise(first, seed=1)
    second = lorakit.adapt(copy.deepcopy(base), lorakit.AdapterConfig(r=6, target_modules=["v_proj"]))
    randomise(second, seed=2)
    lorakit.save_adapter(first, tmp_path / "one")
    lorakit.save_adapter(second, tmp_path / "two")
    ids = torch.randint(0, 128, (2, 4))
    with torch.no_grad():
        want_one, want_two = first(input_ids=ids).logits, second(input_ids=ids).logits

        served = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "one", name="team")
        assert_close(served(input_ids=ids, adapter_names=["team", "team"]).logits, want_one, atol=1e-5, rtol=0)
        weights = base_weights(served)
        served.replace_adapter("team", tmp_path / "two")
        assert_close(served(input_ids=ids, adapter_names=["team", "team"]).logits, want_two, atol=1e-5, rtol=0)
        assert_close(served(input_ids=ids).logits, want_two, atol=1e-5, rtol=0)
        assert [i.name for i in served.list_adapters()] == ["team"]
        now = base_weights(served)
        assert now.keys() == weights.keys() and all(torch.equal(now[k], weights[k]) for k in weights)

        other_base = tiny_llama(layers=1, seed=5)
        foreign = lorakit.adapt(other_base, lorakit.AdapterConfig(r=2, target_modules=["q_proj"]))
        lorakit.save_adapter(foreign, tmp_path / "foreign")
        with pytest.raises(lorakit.FingerprintMismatchError):
            served.replace_adapter("team", tmp_path / "foreign")
        assert [i.name for i in served.list_adapters()] == ["team"]
        assert_close(served(input_ids=ids).logits, want_two, atol=1e-5, rtol=0)


def test_stacks_survive_new_mixes_and_follow_changed_adapters():
    """The per-layer stack holds every adapter: a new mix copies nothing; a changed, deleted or
    added adapter reaches the next batch (slot rewritten, reused, or the stack grown/rebuilt)."""
    am = lorakit.adapt(tiny_llama(layers=1), lorakit.AdapterConfig(r=2, target_modules=["q_proj"]), "a")
    am.add_adapter("b", lorakit.AdapterConfig(r=4, target_modules=["q_proj"]))
    am.add_adapter("d", lorakit.AdapterConfig(method="dora", r=3, target_modules=["q_proj", "v_proj"]))
    randomise(am, seed=1)
    am.eval()
    path, layer = next((p, la) for p, la in am.adapted_layers().items() if p.endswith("q_proj"))
    ids = torch.randint(0, 128, (3, 4), generator=torch.Generator().manual_seed(0))

    def check(names: list[str]) -> None:
        mixed = am(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            assert_close(mixed[row], alone(am, name, ids[row:row + 1])[0], atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        check(["a", "b", "base"])
        stack = layer.mix_state.stack
        check(["b", "d", "a"])
        assert layer.mix_state.stack is stack  # a new mix: nothing rebuilt
        am.adapter_modules("b")[path].lora_B.mul_(-2)  # training or loading writes in place
        check(["b", "b", "a"])
        am.delete_adapter("b")  # hot swap: the new adapter takes the freed slot
        am.add_adapter("c", lorakit.AdapterConfig(r=3, target_modules=["q_proj"]), activate=False)
        randomise(am, seed=2)
        check(["c", "base", "d"])
        assert layer.mix_state.stack is stack
        am.add_adapter("e", lorakit.AdapterConfig(r=1, target_modules=["q_proj"]), activate=False)
        randomise(am, seed=3)
        check(["e", "c", "a"])  # no free slot: grown
        am.add_adapter("wide", lorakit.AdapterConfig(r=8, target_modules=["q_proj"]), activate=False)
        randomise(am, seed=4)
        check(["wide", "e", "d"])  # a larger rank: rebuilt
        am.rename_adapter("wide", "w")
        check(["a", "w", "c"])


def test_deleting_adapters_frees_their_stacked_copies():
    """Mixed batches keep a per-layer copy of every adapter's factors; deleting the adapters must
    free it (memory that never comes back after unloading is a known failure of other tools)."""
    import gc
    import weakref

    am = lorakit.adapt(tiny_llama(layers=1), lorakit.AdapterConfig(r=2, target_modules=["q_proj"]), "a")
    for name in ("b", "c"):
        am.add_adapter(name, lorakit.AdapterConfig(r=2, target_modules=["q_proj"]), activate=False)
    randomise(am, seed=1)
    am.eval()
    layer = next(la for p, la in am.adapted_layers().items() if p.endswith("q_proj"))
    ids = torch.randint(0, 128, (3, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        am(input_ids=ids, adapter_names=["a", "b", "c"])
    copies = weakref.ref(layer.mix_state.stack.At)
    am.delete_adapter("b")
    assert copies() is not None  # two of three still stacked: kept for the next batch
    am.delete_adapter("c")
    gc.collect()
    assert copies() is None, "the stacked copies of deleted adapters were not freed"
    with torch.no_grad():  # the remaining adapter still serves mixed batches
        mixed = am(input_ids=ids[:2], adapter_names=["a", "base"]).logits
    assert_close(mixed[0], alone(am, "a", ids[:1])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change", ["in place", "new parameter", "data swapped", "moved"])
def test_a_changed_adapter_reaches_the_next_mixed_batch(change):
    """Mixed batches skip unchanged adapters by a model-wide token per adapter (versions and
    addresses of its tensors); each way of changing an adapter's values must still get through."""
    am = lorakit.adapt(tiny_llama(layers=1), lorakit.AdapterConfig(r=2, target_modules=["q_proj", "v_proj"]), "a")
    am.add_adapter("b", lorakit.AdapterConfig(r=3, target_modules=["q_proj"]), activate=False)
    randomise(am, seed=1)
    am.eval()
    ids = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = am(input_ids=ids, adapter_names=["a", "b"]).logits
        method = next(iter(am.adapter_modules("b").values()))
        new_B = torch.randn(method.lora_B.shape, generator=torch.Generator().manual_seed(9))
        if change == "in place":
            method.lora_B.copy_(new_B)
        elif change == "new parameter":
            method.lora_B = nn.Parameter(new_B, requires_grad=False)
        elif change == "data swapped":
            method.lora_B.data = new_B
        else:
            am.to(torch.float64)
            ids_dtype = torch.float64
        mixed = am(input_ids=ids, adapter_names=["a", "b"]).logits
        if change == "moved":
            assert mixed.dtype == ids_dtype
            assert_close(mixed.float(), before, atol=1e-5, rtol=1e-5)
            return
        assert (mixed[1] - before[1]).abs().max() > 1e-3, "the new values did not reach the mixed batch"
        assert_close(mixed[0], before[0], atol=1e-6, rtol=0)  # the other adapter's row is unchanged
        assert_close(mixed[1], alone(am, "b", ids[1:])[0], atol=1e-5, rtol=1e-5)


def test_training_between_mixed_batches_keeps_the_plan_state_bounded():
    """Each in-place change gives an adapter a new version stamp; a layer remembers one stamp per
    adapter, not every stamp it has seen."""
    am = lorakit.adapt(tiny_llama(layers=1), lorakit.AdapterConfig(r=2, target_modules=["q_proj"]), "a")
    am.add_adapter("b", lorakit.AdapterConfig(r=2, target_modules=["q_proj"]), activate=False)
    randomise(am, seed=1)
    am.eval()
    layer = next(la for p, la in am.adapted_layers().items() if p.endswith("q_proj"))
    ids = torch.randint(0, 128, (2, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for step in range(6):
            am.adapter_modules("a")[next(iter(am.adapter_modules("a")))].lora_B.add_(0.01 * step)
            mixed = am(input_ids=ids, adapter_names=["a", "b"]).logits
            assert len(layer.mix_state.confirmed) == 2
        assert_close(mixed[0], alone(am, "a", ids[:1])[0], atol=1e-5, rtol=1e-5)


def test_an_embedding_with_max_norm_is_refused_not_served_differently():
    """Stacked factors are read by token id, which max_norm's renormalisation of looked-up rows
    would change: a mixed batch through such an embedding is refused before anything is computed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6, max_norm=1.0), nn.Linear(6, 3))
    am = lorakit.adapt(model, lorakit.AdapterConfig(r=2, target_modules=["0", "1"]), "a")
    randomise(am)
    x = torch.randint(0, 10, (2, 4))
    with torch.no_grad(), pytest.raises(NotImplementedError, match="embedding with max_norm"):
        am(x, adapter_names=["a", "base"])
    plain = lorakit.adapt(nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 3)),
                          lorakit.AdapterConfig(r=2, target_modules=["0", "1"]), "a")
    with torch.no_grad():
        plain(x, adapter_names=["a", "base"])  # without max_norm: served
