"""Adapter files move both ways between lorakit and HF PEFT with identical outputs.

Every case builds an adapter on one side, moves every trainable tensor away from its
initial value (B starts at zero, so an untouched adapter would prove nothing), saves it,
loads it on the other side onto a fresh copy of the same base, and compares whole output
tensors in float32 (max abs difference <= 1e-5). Each case also checks that both sides
adapted the same modules with the same per-module rank and scaling.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import model_zoo
import peft
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import lorakit

# ToyNet mixes nn.Linear and Conv1D; PEFT notes that it sets fan_in_fan_out per layer. Expected.
pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to:UserWarning")

ATOL = 1e-5
MARGIN = 1e-2  # an adapter must move the output at least this much (1000 x ATOL) to count
R = 4
ALPHA = 8
VERA_R = 8

# ---------------------------------------------------------------------------------------------
# models and inputs
# ---------------------------------------------------------------------------------------------


def _toynet() -> nn.Module:
    torch.manual_seed(0)
    return model_zoo.ToyNet().eval()


class Nested(nn.Module):
    """Module paths that are dotted suffixes of each other ("lin" and "inner.lin")."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.inner = nn.Module()
        self.inner.lin = nn.Linear(8, 8)
        self.inner.out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.out(torch.tanh(self.inner.lin(torch.tanh(self.lin(x)))))


def _nested() -> nn.Module:
    torch.manual_seed(0)
    return Nested().eval()


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "minilm": model_zoo.minilm,
    "llama": model_zoo.tiny_llama,
    "gpt2": model_zoo.tiny_gpt2,
    "toynet": _toynet,
    "nested": _nested,
}


def _ids(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(seed))


def make_inputs(arch: str, model: nn.Module) -> tuple[tuple, dict[str, torch.Tensor]]:
    """(args, kwargs) for one forward pass: batch 2 x 8 tokens (ToyNet: 2 x 7 tokens and images)."""
    if arch == "toynet":
        return model_zoo.toy_inputs(batch=2), {}
    if arch == "nested":
        return (torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(1)),), {}
    ids = _ids(model.config.vocab_size)
    if arch == "minilm":
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0  # one padded row, so the attention mask takes part
        return (), {"input_ids": ids, "attention_mask": mask}
    return (), {"input_ids": ids}


def forward(model: nn.Module, inputs: tuple[tuple, dict[str, torch.Tensor]]) -> torch.Tensor:
    args, kwargs = inputs
    out = model(*args, **kwargs)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def run(model: nn.Module, inputs: tuple[tuple, dict[str, torch.Tensor]]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return forward(model, inputs)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny inputs gain nothing from intra-op threads; on a busy machine they cost 10x or more."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def zoo() -> Callable[[str], nn.Module]:
    """Each base model is built once per module; tests deepcopy it and never change it."""
    cache: dict[str, nn.Module] = {}

    def get(arch: str) -> nn.Module:
        if arch not in cache:
            cache[arch] = BUILDERS[arch]().eval()
        return cache[arch]

    return get


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------
ARCH_TARGETS: dict[str, list[str] | str] = {
    "minilm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "gpt2": ["c_attn", "c_fc"],
    "toynet": ["emb", "lin", "c1d", "conv"],
}
ARCH_SAVED: dict[str, list[str]] = {"llama": ["lm_head"], "toynet": ["head"]}
USES_CONV1D = {"gpt2", "toynet"}


@dataclass(frozen=True)
class Case:
    arch: str
    method: str  # lora | rslora | dora | vera
    targets: list[str] | str
    modules_to_save: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | None = None
    exclude_modules: list[str] | None = None
    label: str = ""

    @property
    def noise(self) -> float:
        return 1.0 if self.method == "vera" else 0.1  # VeRA's vectors scale frozen random projections

    @property
    def id(self) -> str:
        return f"{self.arch}{self.label}-{self.method}"

    def lorakit_config(self) -> lorakit.AdapterConfig:
        if self.method == "vera":
            return lorakit.AdapterConfig(
                method="vera", r=VERA_R, target_modules=self.targets, modules_to_save=self.modules_to_save,
                vera_seed=7,
            )
        return lorakit.AdapterConfig(
            method="dora" if self.method == "dora" else "lora", r=R, alpha=ALPHA,
            use_rslora=self.method == "rslora", target_modules=self.targets, modules_to_save=self.modules_to_save,
            rank_pattern=self.rank_pattern, alpha_pattern=self.alpha_pattern,
            layers_to_transform=self.layers_to_transform, exclude_modules=self.exclude_modules,
        )

    def peft_config(self) -> peft.PeftConfig:
        common: dict[str, Any] = {
            "target_modules": self.targets,
            "modules_to_save": self.modules_to_save or None,
            "fan_in_fan_out": self.arch in USES_CONV1D,
        }
        if self.method == "vera":
            return peft.VeraConfig(r=VERA_R, save_projection=True, projection_prng_key=7, **common)
        return peft.LoraConfig(
            r=R, lora_alpha=ALPHA, use_rslora=self.method == "rslora", use_dora=self.method == "dora",
            rank_pattern=dict(self.rank_pattern), alpha_pattern=dict(self.alpha_pattern),
            layers_to_transform=self.layers_to_transform, exclude_modules=self.exclude_modules, **common,
        )


PATTERN_RANKS = {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}
PATTERN_ALPHAS = {"q_proj": 16.0}

CASES = [
    *(Case(arch, method, ARCH_TARGETS[arch], ARCH_SAVED.get(arch, []))
      for arch in ("minilm", "llama", "gpt2") for method in ("lora", "rslora", "dora", "vera")),
    Case("toynet", "lora", ARCH_TARGETS["toynet"], ARCH_SAVED["toynet"]),
    Case("toynet", "dora", ARCH_TARGETS["toynet"], ARCH_SAVED["toynet"]),
    Case("toynet", "vera", ["lin", "c1d"], ARCH_SAVED["toynet"]),  # VeRA adapts linear layers only
    Case("llama", "lora", "all-linear", ["lm_head"], label="_all_linear"),
    *(Case("llama", method, ["q_proj", "v_proj"], rank_pattern=PATTERN_RANKS, alpha_pattern=PATTERN_ALPHAS,
           label="_patterns") for method in ("lora", "dora")),
    # PEFT also saves the base weight of a targeted embed_tokens / lm_head (save_embedding_layers="auto").
    *(Case("llama", method, ["embed_tokens", "q_proj"], label="_embed") for method in ("lora", "dora")),
    Case("minilm", "lora", ["query", "value"], layers_to_transform=[0, 2],
         exclude_modules=["encoder.layer.2.attention.self.value"], label="_layers"),
    # Exact module paths that are also dotted suffixes of other paths must not adapt those others.
    Case("nested", "lora", r"lin|inner\.out", label="_regex"),
    Case("nested", "vera", r"lin|inner\.out", label="_regex"),
    Case("nested", "lora", ["lin", "out"], rank_pattern={"^lin": 2}, alpha_pattern={"^lin": 3.0}, label="_anchored"),
]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def perturb(params: list[nn.Parameter], seed: int, scale: float = 0.1) -> None:
    """Move every tensor by seeded noise (relative to its size, absolute for zero tensors)."""
    assert params, "nothing to perturb: no trainable tensors"
    g = torch.Generator().manual_seed(seed)
    for p in params:
        size = float(p.detach().abs().mean())
        p.add_(torch.randn(p.shape, generator=g) * scale * max(size, 0.5))


def assert_changed(adapted: torch.Tensor, base: torch.Tensor) -> None:
    diff = float((adapted - base).abs().max())
    assert diff > MARGIN, f"the adapter barely changes the output (max abs diff {diff:.2e}); the test proves nothing"


def assert_same(theirs: torch.Tensor, ours: torch.Tensor) -> None:
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


def peft_layers(pm: peft.PeftModel) -> dict[str, tuple[int, float]]:
    """PEFT's adapted module paths (as in the base model) -> (rank, scaling)."""
    found = {}
    for path, module in pm.base_model.model.named_modules():
        if isinstance(module, BaseTunerLayer):
            scaling = getattr(module, "scaling", {}).get("default", 1.0)
            found[path] = (int(module.r["default"]), float(scaling))
    return found


def lorakit_layers(am: lorakit.AdaptedModel) -> dict[str, tuple[int, float]]:
    return {path: (m.rank, float(m.scaling)) for path, m in am.adapter_modules("default").items()}


def peft_saved_paths(pm: peft.PeftModel) -> set[str]:
    from peft.utils.other import ModulesToSaveWrapper

    return {p for p, m in pm.base_model.model.named_modules() if isinstance(m, ModulesToSaveWrapper)}


def assert_same_structure(pm: peft.PeftModel, am: lorakit.AdaptedModel) -> None:
    theirs, ours = peft_layers(pm), lorakit_layers(am)
    assert sorted(theirs) == sorted(ours), "PEFT and lorakit adapted different modules"
    for path in ours:
        assert theirs[path][0] == ours[path][0], f"{path}: rank {theirs[path][0]} (PEFT) vs {ours[path][0]}"
        assert theirs[path][1] == pytest.approx(ours[path][1], rel=1e-12), f"{path}: scaling differs"
    assert peft_saved_paths(pm) == set(am.saved_modules()), "modules_to_save differ"


def assert_layers(found: dict[str, tuple[int, float]], expected: dict[str, tuple[int, float]]) -> None:
    assert sorted(found) == sorted(expected)
    for path, (rank, scaling) in expected.items():
        assert found[path][0] == rank, f"{path}: rank {found[path][0]}, expected {rank}"
        assert found[path][1] == pytest.approx(scaling, rel=1e-12), f"{path}: scaling {found[path][1]} != {scaling}"


def read_config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "adapter_config.json").read_text())


# ---------------------------------------------------------------------------------------------
# lorakit -> PEFT and PEFT -> lorakit
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_lorakit_to_peft(case: Case, zoo, tmp_path: Path) -> None:
    base = zoo(case.arch)
    inputs = make_inputs(case.arch, base)
    base_out = run(base, inputs)

    am = lorakit.adapt(copy.deepcopy(base), case.lorakit_config())
    assert_same(run(am, inputs), base_out)  # a fresh adapter leaves the model unchanged
    perturb(am.trainable_parameters(), seed=11, scale=case.noise)
    ours = run(am, inputs)
    assert_changed(ours, base_out)
    lorakit.save_adapter(am, tmp_path)

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert_same_structure(pm, am)
    assert_same(run(pm, inputs), ours)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_peft_to_lorakit(case: Case, zoo, tmp_path: Path) -> None:
    base = zoo(case.arch)
    inputs = make_inputs(case.arch, base)
    base_out = run(base, inputs)

    pm = peft.get_peft_model(copy.deepcopy(base), case.peft_config())
    perturb([p for p in pm.parameters() if p.requires_grad], seed=12, scale=case.noise)
    theirs = run(pm, inputs)
    assert_changed(theirs, base_out)
    pm.save_pretrained(tmp_path)

    am = lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    assert_same_structure(pm, am)
    assert_same(run(am, inputs), theirs)
    assert am.trainable_parameters() == []  # loaded for inference by default


def test_rank_and_alpha_patterns_apply_per_module(zoo, tmp_path: Path) -> None:
    """The pattern case above, with the expected per-module ranks and scalings spelled out."""
    expected = {
        "model.layers.0.self_attn.q_proj": (R, 16.0 / R),
        "model.layers.0.self_attn.v_proj": (2, ALPHA / 2),
        "model.layers.1.self_attn.q_proj": (6, 16.0 / 6),
        "model.layers.1.self_attn.v_proj": (2, ALPHA / 2),
    }
    case = next(c for c in CASES if c.label == "_patterns" and c.method == "lora")
    base = zoo("llama")
    am = lorakit.adapt(copy.deepcopy(base), case.lorakit_config())
    assert_layers(lorakit_layers(am), expected)
    lorakit.save_adapter(am, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert_layers(peft_layers(pm), expected)

    pm = peft.get_peft_model(copy.deepcopy(base), case.peft_config())
    assert_layers(peft_layers(pm), expected)
    pm.save_pretrained(tmp_path / "theirs")
    assert_layers(lorakit_layers(lorakit.load_adapter(copy.deepcopy(base), tmp_path / "theirs")), expected)


def test_peft_copy_of_embedding_weights_must_match_the_base(zoo, tmp_path: Path) -> None:
    """PEFT's copy of a targeted embedding's own weight is accepted only when it is this base's weight."""
    from safetensors.torch import load_file, save_file

    base = zoo("llama")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=R, target_modules=["embed_tokens", "q_proj"]))
    perturb([p for p in pm.parameters() if p.requires_grad], seed=15)
    pm.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert torch.equal(tensors[key], base.model.embed_tokens.weight)
    lorakit.load_adapter(copy.deepcopy(base), tmp_path)  # the base's own weight: accepted

    tensors[key] = tensors[key] + 0.01  # embeddings trained or changed after the base was saved
    save_file(tensors, weights)
    with pytest.raises(lorakit.FingerprintMismatchError, match=r"own base weight for model\.embed_tokens"):
        lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    lorakit.load_adapter(copy.deepcopy(base), tmp_path, check_fingerprint=False)  # on purpose: ignored


# ---------------------------------------------------------------------------------------------
# adapters that PEFT only knows as plain LoRA: PiSSA offsets and Delta-LoRA shifts
# ---------------------------------------------------------------------------------------------
PISSA_CASES = [("minilm", False), ("llama", False), ("llama", True), ("gpt2", False), ("toynet", False)]


@pytest.mark.parametrize(
    ("arch", "use_rslora"), PISSA_CASES, ids=[f"{a}-{'rslora' if rs else 'lora'}" for a, rs in PISSA_CASES]
)
def test_pissa_to_peft(arch: str, use_rslora: bool, zoo, tmp_path: Path) -> None:
    base = zoo(arch)
    inputs = make_inputs(arch, base)
    base_out = run(base, inputs)

    config = lorakit.AdapterConfig(
        r=R, alpha=ALPHA, use_rslora=use_rslora, init="pissa", target_modules=ARCH_TARGETS[arch],
        modules_to_save=ARCH_SAVED.get(arch, []),
    )
    am = lorakit.adapt(copy.deepcopy(base), config)
    assert_same(run(am, inputs), base_out)  # PiSSA starts where the base is
    perturb(am.trainable_parameters(), seed=13)
    ours = run(am, inputs)
    assert_changed(ours, base_out)
    lorakit.save_adapter(am, tmp_path)
    assert read_config(tmp_path)["r"] == 2 * R  # exported as a plain rank-2r LoRA

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert sorted(peft_layers(pm)) == sorted(lorakit_layers(am))
    assert all(rank == 2 * R for rank, _ in peft_layers(pm).values())
    assert_same(run(pm, inputs), ours)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "toynet"])
def test_delta_lora_to_peft_on_original_base(arch: str, zoo, tmp_path: Path) -> None:
    base = zoo(arch)
    inputs = make_inputs(arch, base)
    base_out = run(base, inputs)
    config = lorakit.AdapterConfig(
        r=R, alpha=ALPHA, target_modules=ARCH_TARGETS[arch], modules_to_save=ARCH_SAVED.get(arch, [])
    )
    am = lorakit.adapt(copy.deepcopy(base), config).eval()  # eval: no dropout, the run is deterministic
    rule = lorakit.DeltaLoRA(am, "default", c=2.0, start_step=1)
    optimizer = torch.optim.SGD(am.trainable_parameters(), lr=0.5)
    target = torch.randn(base_out.shape, generator=torch.Generator().manual_seed(14))
    for _ in range(4):
        loss = (forward(am, inputs) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rule.step()

    ours = run(am, inputs)
    assert_changed(ours, base_out)
    layers = am.adapted_layers()
    with torch.no_grad():
        moved = max(float((layer.weight - base.get_submodule(p).weight).abs().max()) for p, layer in layers.items())
    assert moved > 1e-3, "Delta-LoRA did not move the base weights; the test proves nothing"
    lorakit.save_adapter(am, tmp_path)
    assert read_config(tmp_path)["r"] == 2 * R  # [s·B + c·s·B_T | −c·s·B_K] [A; A_K]: the shift folded in

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert sorted(peft_layers(pm)) == sorted(layers)
    assert_same(run(pm, inputs), ours)


def test_task_type_lets_peft_auto_classes_load_a_lorakit_file(tmp_path: Path) -> None:
    """adapter_config.json names the task (CAUSAL_LM, SEQ_CLS), as AutoPeftModelFor... needs."""
    base = model_zoo.tiny_llama(layers=1)
    base.save_pretrained(tmp_path / "base")
    adapted = lorakit.adapt(copy.deepcopy(base), lorakit.AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for module in adapted.adapter_modules("default").values():
            module.lora_B.normal_(0, 0.1)
    lorakit.save_adapter(adapted, tmp_path / "a", base_model_name_or_path=str(tmp_path / "base"))
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5, rtol=0)
    classifier = lorakit.adapt(model_zoo.minilm(num_labels=2), lorakit.AdapterConfig(target_modules=["query"]))
    lorakit.save_adapter(classifier, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
