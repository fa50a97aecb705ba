"""Shared pieces of the benchmarks: the model, both libraries' adapters with equal weights, timing.

Every benchmark builds the same random Llama-style model, attaches the same adapter with
lorakit and with HF PEFT (PEFT's tensors are copied from lorakit's, so both compute the same
function, which each script checks), and times the variants round-robin in one process so that
load from other processes hits every variant alike.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import lorakit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # raised inside transformers


def model_args(parser: argparse.ArgumentParser, *, batch: int, seq: int = 128) -> None:
    """Size flags shared by all benchmarks (defaults: hidden 768, 6 layers, vocab 32000, r=16)."""
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--seq", type=int, default=seq)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (0: torch's default). 1 by default: on a shared 2-core machine two OpenMP threads make "
        "every op wait for a descheduled peer, which inflates small ops and punishes the variant that issues more",
    )


def set_threads(args: argparse.Namespace) -> None:
    if args.threads > 0:
        torch.set_num_threads(args.threads)


def build_base(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(2048, args.seq), tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).float().eval()


def inputs(args: argparse.Namespace) -> torch.Tensor:
    g = torch.Generator().manual_seed(args.seed + 1)
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)


def lorakit_model(base: nn.Module, args: argparse.Namespace, method: str) -> lorakit.AdaptedModel:
    """A deep copy of ``base`` with one lorakit adapter whose B is random (so the update is not 0).

    Seeded, so every call gives the same adapter.
    """
    torch.manual_seed(args.seed + 3)
    am = lorakit.adapt(
        copy.deepcopy(base),
        lorakit.AdapterConfig(method=method, r=args.rank, alpha=args.alpha, target_modules="all-linear"),
    )
    g = torch.Generator().manual_seed(args.seed + 2)
    with torch.no_grad():
        for m in am.adapter_modules("default").values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.02)
    return am


def peft_model_like(base: nn.Module, am: lorakit.AdaptedModel, args: argparse.Namespace, method: str) -> nn.Module:
    """A deep copy of ``base`` under PEFT with the very tensors of ``am``'s adapter."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.rank, lora_alpha=args.alpha, target_modules="all-linear", lora_dropout=0.0,
        use_dora=(method == "dora"),
    )
    pm = get_peft_model(copy.deepcopy(base), config)
    inner = pm.base_model.model
    ours = am.adapter_modules("default")
    theirs = {n for n, m in inner.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    if set(ours) != theirs:
        raise RuntimeError(f"lorakit and PEFT adapt different modules: {sorted(set(ours) ^ theirs)[:5]}")
    with torch.no_grad():
        for path, m in ours.items():
            layer = inner.get_submodule(path)
            layer.lora_A["default"].weight.copy_(m.lora_A)
            layer.lora_B["default"].weight.copy_(m.lora_B)
            if method == "dora":
                layer.lora_magnitude_vector["default"].weight.copy_(m.lora_magnitude_vector)
    return pm


def count_adapted(am: lorakit.AdaptedModel) -> int:
    return len(am.adapter_modules("default"))


def round_robin(
    fns: dict[str, Callable[[], object]], rounds: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process-CPU seconds per call of each fn, interleaved; the order rotates every round.

    CPU time (user + system, all threads of this process) leaves out the time the process
    waited for a core while other processes ran, so on a shared machine it is the steadier
    measure of the work a variant does; wall time is what a user waits.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of num/den measured in the same round (robust to slow drifts in load)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def median_ms(ts: list[float]) -> float:
    return 1000 * statistics.median(ts)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def header(title: str) -> str:
    import peft
    import transformers

    cmd = " ".join([".venv/bin/python", *map(shlex.quote, [os.path.relpath(sys.argv[0]), *sys.argv[1:]])])
    cpu = platform.processor() or platform.machine()
    model_name = _cpu_model()
    return "\n".join([
        f"### {title}",
        "",
        f"- command: `{cmd}`",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"lorakit {lorakit.__version__}; torch.get_num_threads() = {torch.get_num_threads()}",
        f"- machine: {cpu}{f' ({model_name})' if model_name else ''}, {os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        f"- load average (1/5/15 min) at start: {loadavg()}",
    ])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
