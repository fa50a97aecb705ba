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
import lorakit.fused

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
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: where the models and inputs live")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the base model's dtype (adapters stay float32 in both libraries)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (0: torch's default). 1 by default: on a shared 2-core machine two OpenMP threads make "
        "every op wait for a descheduled peer, which inflates small ops and punishes the variant that issues more",
    )


# What the second time series of round_robin measures: process CPU time on the CPU; on a GPU,
# CUDA-event time of the variant's kernels (what the device was busy with, launch gaps included).
CLOCK = "CPU"


def set_threads(args: argparse.Namespace) -> None:
    """Torch threads, and the clock of the second time series (see CLOCK) for ``args.device``."""
    global CLOCK
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if torch.device(getattr(args, "device", "cpu")).type == "cuda":
        CLOCK = "GPU"
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on both sides


def build_base(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(2048, args.seq), tie_word_embeddings=False,
    )
    device = torch.device(getattr(args, "device", "cpu"))
    with device:  # initialised where it will run: a CPU init of a large model takes minutes
        model = LlamaForCausalLM(config)
    return model.to(getattr(torch, getattr(args, "dtype", "float32"))).eval()


def inputs(args: argparse.Namespace) -> torch.Tensor:
    g = torch.Generator().manual_seed(args.seed + 1)
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(getattr(args, "device", "cpu"))


def lorakit_model(
    base: nn.Module, args: argparse.Namespace, method: str, *, copy_base: bool = True
) -> lorakit.AdaptedModel:
    """``base`` (a deep copy unless ``copy_base=False``) with one lorakit adapter whose B side is
    random (it starts at zero, so the update would be 0): ``lora_B``, or VeRA's ``vera_lambda_b``.

    Seeded, so every call gives the same adapter. ``method`` is a lorakit method name.
    """
    torch.manual_seed(args.seed + 3)
    am = lorakit.adapt(
        copy.deepcopy(base) if copy_base else base,
        lorakit.AdapterConfig(method=method, r=args.rank, alpha=args.alpha, target_modules="all-linear",
                              vera_seed=args.seed),
    )
    randomise_b(am, "default", torch.Generator().manual_seed(args.seed + 2))
    return am


def randomise_b(am: lorakit.AdaptedModel, name: str, g: torch.Generator) -> None:
    """Random B side (``lora_B``, or VeRA's ``vera_lambda_b``) for adapter ``name``, drawn from ``g``."""
    with torch.no_grad():
        for m in am.adapter_modules(name).values():
            b = m.vera_lambda_b if hasattr(m, "vera_lambda_b") else m.lora_B
            b.copy_(torch.randn(b.shape, generator=g) * 0.02)


def lorakit_adapters(base: nn.Module, args: argparse.Namespace, names: list[str]) -> lorakit.AdaptedModel:
    """A deep copy of ``base`` with one LoRA adapter (all-linear) per name, each with its own random
    A and B. Seeded, so every call gives the same adapters; the first is active."""
    torch.manual_seed(args.seed + 3)
    am = lorakit.AdaptedModel(copy.deepcopy(base))
    g = torch.Generator().manual_seed(args.seed + 2)
    for name in names:
        am.add_adapter(name, lorakit.AdapterConfig(r=args.rank, alpha=args.alpha, target_modules="all-linear"))
        randomise_b(am, name, g)
    return am


def peft_model_like(
    base: nn.Module, am: lorakit.AdaptedModel, args: argparse.Namespace, method: str, *, copy_base: bool = True
) -> nn.Module:
    """``base`` (a deep copy unless ``copy_base=False``) under PEFT with the very tensors of ``am``'s adapter.

    PEFT has no LoRA-FA class: "lora-fa" is PEFT LoRA with every ``lora_A`` frozen, which is
    what LoRA-FA is. VeRA copies the shared projections as well as the per-layer vectors.
    """
    from peft import LoraConfig, VeraConfig, get_peft_model

    if method == "vera":
        config = VeraConfig(r=args.rank, target_modules="all-linear", vera_dropout=0.0, projection_prng_key=args.seed)
    else:
        config = LoraConfig(
            r=args.rank, lora_alpha=args.alpha, target_modules="all-linear", lora_dropout=0.0,
            use_dora=(method == "dora"),
        )
    pm = get_peft_model(copy.deepcopy(base) if copy_base else base, config)
    inner = pm.base_model.model
    a_name = "vera_lambda_d" if method == "vera" else "lora_A"
    ours = am.adapter_modules("default")
    theirs = {n for n, m in inner.named_modules() if hasattr(m, a_name) and "default" in getattr(m, a_name)}
    if set(ours) != theirs:
        raise RuntimeError(f"lorakit and PEFT adapt different modules: {sorted(set(ours) ^ theirs)[:5]}")
    with torch.no_grad():
        if method == "vera":
            projections = am.vera_projections["default"]
            pm.base_model.vera_A["default"].copy_(projections.vera_A)
            pm.base_model.vera_B["default"].copy_(projections.vera_B)
        for path, m in ours.items():
            layer = inner.get_submodule(path)
            if method == "vera":
                layer.vera_lambda_d["default"].copy_(m.vera_lambda_d)
                layer.vera_lambda_b["default"].copy_(m.vera_lambda_b)
                continue
            layer.lora_A["default"].weight.copy_(m.lora_A)
            layer.lora_B["default"].weight.copy_(m.lora_B)
            if method == "lora-fa":
                layer.lora_A["default"].weight.requires_grad_(False)
            if method == "dora":
                layer.lora_magnitude_vector["default"].weight.copy_(m.lora_magnitude_vector)
    return pm


def peft_adapters_like(base: nn.Module, am: lorakit.AdaptedModel, args: argparse.Namespace,
                       names: list[str]) -> nn.Module:
    """A deep copy of ``base`` under PEFT with one LoRA adapter per name, holding the very tensors of
    ``am``'s adapters of that name (see :func:`lorakit_adapters`); the first is active."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules="all-linear", lora_dropout=0.0)
    pm = get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, config)
    inner = pm.base_model.model
    with torch.no_grad():
        for name in names:
            ours = am.adapter_modules(name)
            if sum(hasattr(m, "lora_A") and name in m.lora_A for m in inner.modules()) != len(ours):
                raise RuntimeError(f"lorakit and PEFT adapt different modules for adapter {name!r}")
            for path, m in ours.items():
                inner.get_submodule(path).lora_A[name].weight.copy_(m.lora_A)
                inner.get_submodule(path).lora_B[name].weight.copy_(m.lora_B)
    pm.set_adapter(names[0])
    return pm


def train_stepper(
    model: nn.Module, opt: torch.optim.Optimizer | None, ids: torch.Tensor,
    after_step: Callable[[], object] | None = None,
) -> Callable[[], float]:
    """One training step: forward with the causal-LM loss, backward, ``opt.step()``, ``after_step()``
    (a training rule such as Delta-LoRA's), ``zero_grad(set_to_none=True)``; returns the loss.
    ``opt=None``: forward + backward only."""
    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            if after_step is not None:
                after_step()
            opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


# -- memory -----------------------------------------------------------------------------------
# Each variant's memory is measured in a fresh subprocess with glibc told to return every freed
# block above 64 KiB to the OS at once, so resident memory follows live tensors.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def status_kb(key: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


def memory_kb() -> int:
    """What the process holds now, in KiB: CUDA memory allocated once CUDA is in use, else RSS."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() // 1024
    return status_kb("VmRSS")


def step_memory(model: nn.Module, step: Callable[[], object], bare_kb: int = 0) -> dict[str, float]:
    """Memory of one call of ``step`` (run after warm-up steps, so optimizer state exists).

    On a GPU (CUDA in use) the same three numbers come from the caching allocator: memory
    allocated before the step, its peak during the step (``max_memory_allocated`` after a reset)
    and ``bare_kb`` from :func:`memory_kb`.

    The kernel's peak-RSS mark is reset (/proc/self/clear_refs ← 5), then ``peak_mib`` is the
    step's peak RSS (VmHWM) above the RSS just before it; ``total_mib`` the same peak above
    ``bare_kb`` (the process before any model was built: weights, optimizer state and step);
    ``saved_mib`` the bytes autograd saved for backward (model parameters and buffers excluded,
    each storage counted once).
    """
    import gc

    gc.collect()
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    owned |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    saved: dict[int, int] = {}

    def see(t: torch.Tensor) -> None:
        s = t.untyped_storage()
        if s.data_ptr() not in owned:
            saved[s.data_ptr()] = max(saved.get(s.data_ptr(), 0), s.nbytes())

    cuda = torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() // 1024
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
        before = status_kb("VmRSS")
    with lorakit.fused.saved_tensors_observer(see):  # plain hooks would change what lorakit keeps
        step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() // 1024
    else:
        peak = status_kb("VmHWM")
    return {"before_mib": before / 1024, "peak_mib": (peak - before) / 1024,
            "total_mib": (peak - bare_kb) / 1024, "saved_mib": sum(saved.values()) / 2**20}


def run_child(script: str, flags: list[str]) -> dict:
    """Run ``script`` with ``flags`` in a fresh process (MALLOC_ENV set); the JSON of its last line."""
    import json
    import subprocess

    env = dict(os.environ, **MALLOC_ENV)
    out = subprocess.run([sys.executable, os.path.abspath(script), *flags], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


SIZE_FLAGS = ("hidden", "layers", "intermediate", "heads", "vocab", "batch", "seq", "rank", "alpha", "seed", "threads",
              "device", "dtype")


def size_flags(args: argparse.Namespace, *extra: str) -> list[str]:
    """The command-line flags that rebuild ``args``' model and input in a child process."""
    return [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in (*SIZE_FLAGS, *extra)]


def count_adapted(am: lorakit.AdaptedModel, name: str = "default") -> int:
    return len(am.adapter_modules(name))


def round_robin(
    fns: dict[str, Callable[[], object]], rounds: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process-CPU seconds per call of each fn, interleaved; the order rotates every round.

    CPU time (user + system, all threads of this process) leaves out the time the process
    waited for a core while other processes ran, so on a shared machine it is the steadier
    measure of the work a variant does; wall time is what a user waits. Once CUDA is in use
    (see CLOCK) the second series is CUDA-event time instead, and every call is synchronised
    before its wall clock stops.
    """
    cuda = torch.cuda.is_initialized()
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            if cuda:
                torch.cuda.synchronize()
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            if cuda:
                stop.record()
                torch.cuda.synchronize()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(start.elapsed_time(stop) / 1000 if cuda else time.process_time() - c0)
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
    gpu = f"; GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})" if CLOCK == "GPU" else ""
    return "\n".join([
        f"### {title}",
        "",
        f"- command: `{cmd}`",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"lorakit {lorakit.__version__}; torch.get_num_threads() = {torch.get_num_threads()}",
        f"- machine: {cpu}{f' ({model_name})' if model_name else ''}, {os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}{gpu}",
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


def launch_server(command: list[str], port: int, seconds: float = 180.0):
    """Start ``lorakit serve`` as a subprocess (this checkout's lorakit first on the path) and wait
    until its /health answers; exit with the reason when it dies or does not come up."""
    import subprocess
    from pathlib import Path

    import httpx

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    server = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.terminate()
    raise SystemExit(f"the server did not start within {seconds:.0f} s")
