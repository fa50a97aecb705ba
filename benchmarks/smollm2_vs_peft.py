"""lorakit's training step against a plain PEFT loop on the embedded SmolLM2 and the LLM demo's json task.

Why: the LLM demo trains SmolLM2-135M-Instruct with `lorakit train --model smollm2 --task causal-lm
--max-steps 24 --batch-size 8`; this script checks that lorakit's training machinery costs no more
time or memory than a plain PEFT loop doing the same thing, and learns as much.

Only the machinery differs. Both sides get

- the same examples, tokenized once by lorakit (`lm_examples` + `encode_lm`, cut at the length
  `lorakit train` chooses from the data) and laid out by `collate`; the PEFT loop takes the very
  `Encoded` list lorakit's `Trainer` prepared (checked equal to a fresh encoding);
- the same batches: `step_indices(n, 8, seed, step)` for steps 0..23;
- the same LoRA: r=8, alpha 16 on q_proj and v_proj, dropout 0, and the same starting factors
  (PEFT's `lora_A`/`lora_B` are copied from lorakit's, so step 1's losses agree);
- the same optimizer: AdamW lr 5e-4, weight decay 0, linear warmup over max(1, 6 % of the steps),
  then constant (lorakit's factor (step+1)/warmup; transformers' own warmup would start at lr 0),
  gradients clipped to norm 1.0 (lorakit's default, also transformers Trainer's);
- bf16 autocast around forward and loss where `lorakit train --bf16 auto` turns it on (an AMX CPU).

lorakit is its `Trainer` (the code behind `lorakit train`), stepped with `Trainer.train_step()`;
PEFT is `get_peft_model(LoraConfig(...))` stepped by a 10-line loop (`model(**batch).loss`,
backward, clip, step, schedule, zero_grad). The two models are built side by side and stepped
alternately (who goes first rotates every step), so load from other processes hits both alike.

Reported: seconds per step (wall and process CPU time, medians of the steps after the first, and
the median of per-step ratios); peak memory of a training step, measured in a fresh child process
per side (glibc told to hand freed blocks back, the kernel's peak-RSS mark reset before the step:
VmHWM, see `_common.step_memory`); and after the 24 steps, exact match on the 48 evaluation
examples as `lorakit eval` defines it (teacher-forced: every answer token, end-of-sequence
included, is the argmax) and the mean token loss, by one function for both models.

``--hf-loss`` adds a third side, interleaved with the two: lorakit's model and optimizer stepped
with transformers' loss (``model(**batch).loss``) instead of lorakit's ``batch_loss``, which tells
the cost of lorakit's layers from the cost of its loss.

    .venv/bin/python benchmarks/smollm2_vs_peft.py [--data DIR] [--steps 24] [--batch-size 8] [--threads 1]
        [--hf-loss] [--no-memory]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _common as c
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.train import batches as B
from lorakit.train.config import TrainConfig
from lorakit.train.data import lm_examples, read_rows
from lorakit.train.loop import Trainer, autocast_for, lr_factor
from lorakit.train.models import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TASK = "json"
RANK, ALPHA, TARGETS, LR, CLIP = 8, 16.0, ("q_proj", "v_proj"), 5e-4, 1.0
HF_LOSS = "lorakit + transformers' loss"


# -- the two sides ----------------------------------------------------------------------------
def data_files(folder: str | None, scratch: Path) -> tuple[str, str]:
    """The demo's json task files in ``folder``, or built into ``scratch`` by the demo's builder."""
    if folder is None:
        folder = str(scratch / "data")
        subprocess.run([sys.executable, str(REPO / "examples" / "llm_demo" / "build_data.py"), "--out", folder],
                       check=True, capture_output=True)
    train, evaluation = Path(folder) / f"{TASK}_train.jsonl", Path(folder) / f"{TASK}_eval.jsonl"
    for path in (train, evaluation):
        if not path.is_file():
            sys.exit(f"{path} is missing: pass --data a folder written by examples/llm_demo/build_data.py")
    return str(train), str(evaluation)


def lorakit_trainer(args: argparse.Namespace, train: str, evaluation: str, out: Path) -> Trainer:
    """`lorakit train --model smollm2 --task causal-lm --data T --eval-data E --max-steps S --batch-size B`."""
    config = TrainConfig(model="smollm2", task="causal-lm", data=train, eval_data=evaluation, out=str(out),
                         max_steps=args.steps, batch_size=args.batch_size, seed=args.seed, threads=args.threads,
                         quiet=True, general_samples=0)
    assert (config.rank, config.alpha, config.dropout, config.lr, config.weight_decay, config.scheduler,
            config.max_grad_norm) == (RANK, ALPHA, 0.0, LR, 0.0, "constant", CLIP), "lorakit's defaults changed"
    trainer = Trainer(config)
    names = {path.rsplit(".", 1)[-1] for path in trainer.prepared.adapted.adapter_modules("default")}
    assert names == set(TARGETS), names
    return trainer


def encoded(train: str, evaluation: str) -> tuple[list[B.Encoded], list[B.Encoded], int]:
    """Both files tokenized as `lorakit train` does (lm_examples + encode_lm at the length it chooses
    from the training examples), and the pad id: what the PEFT loop is fed."""
    tok = load_tokenizer("smollm2")
    train_uncut = B.encode_lm_uncut(lm_examples(read_rows(train), train, tok), tok)
    length = B.choose_length([len(e.input_ids) for e in train_uncut], None, tok).tokens
    eval_set = B.encode_lm(lm_examples(read_rows(evaluation), evaluation, tok), tok, length, evaluation)
    return B.fit_lm(train_uncut, length, train), eval_set, tok.pad_token_id if tok.pad_token_id is not None else 0


def check_same_data(trainer: Trainer, data: tuple[list[B.Encoded], list[B.Encoded], int]) -> None:
    prepared = trainer.prepared
    if (prepared.train, prepared.eval, prepared.pad_id) != data:
        raise SystemExit("lorakit's Trainer encoded the examples differently from lm_examples + encode_lm")


class PeftLoop:
    """The plain loop: PEFT LoRA on a fresh copy of the base, lorakit's starting factors copied in."""

    def __init__(self, args: argparse.Namespace, trainer: Trainer | None, data: list[B.Encoded], pad_id: int,
                 autocast) -> None:
        from peft import LoraConfig, get_peft_model

        self.args, self.data, self.pad_id, self.autocast = args, data, pad_id, autocast
        base = load_model("smollm2", "causal-lm")
        if getattr(base.config, "pad_token_id", None) is None:
            base.config.pad_token_id = pad_id  # as lorakit's setup does
        self.model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS),
                                                     lora_dropout=0.0))
        if trainer is not None:
            copy_factors(trainer, self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0)
        warmup = max(1, int(0.06 * args.steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.step_no = 0

    def step(self) -> float:
        indices = B.step_indices(len(self.data), self.args.batch_size, self.args.seed, self.step_no)
        batch = B.collate([self.data[i] for i in indices], self.pad_id)
        self.model.train()
        with self.autocast:
            loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_no += 1
        return loss.item()


def hf_loss_stepper(trainer: Trainer) -> Callable[[], float]:
    """lorakit's model, optimizer, schedule and batches, but the loss computed by transformers
    (``model(**batch).loss``: labels shifted, logits viewed) instead of lorakit's ``batch_loss``:
    ``--hf-loss`` times this third side, to tell lorakit's layers from its loss."""
    prepared, config = trainer.prepared, trainer.config

    def step() -> float:
        indices = B.step_indices(len(prepared.train), config.batch_size, config.seed, trainer.state["step"])
        batch = B.collate([prepared.train[i] for i in indices], prepared.pad_id)
        trainer.model.train()
        with trainer.autocast:
            loss = trainer.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.trainable, CLIP)
        trainer.optimizer.step()
        trainer.scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.state["step"] += 1
        return loss.item()

    return step


def copy_factors(trainer: Trainer, peft_model: nn.Module) -> None:
    ours = trainer.prepared.adapted.adapter_modules("default")
    inner = peft_model.base_model.model
    theirs = {n for n, m in inner.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    if set(ours) != theirs:
        raise SystemExit(f"lorakit and PEFT adapt different modules: {sorted(set(ours) ^ theirs)[:4]}")
    with torch.no_grad():
        for path, m in ours.items():
            inner.get_submodule(path).lora_A["default"].weight.copy_(m.lora_A)
            inner.get_submodule(path).lora_B["default"].weight.copy_(m.lora_B)


# -- measurements -----------------------------------------------------------------------------
@torch.no_grad()
def exact_match(model: nn.Module, data: list[B.Encoded], pad_id: int, autocast, batch_size: int
                ) -> tuple[float, float]:
    """(share of examples whose every answer token is the argmax, mean loss per answer token): what
    `lorakit eval` reports as exact_match and token_loss for a causal-LM task."""
    model.eval()
    right, loss_sum, units = 0, 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = B.collate(data[start:start + batch_size], pad_id)
        with autocast:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        keep = targets != B.IGNORE
        shifted = logits[:, :-1]
        misses = ((shifted.argmax(-1) != targets) & keep).sum(-1)
        right += int(((misses == 0) & keep.any(-1)).sum())
        loss_sum += F.cross_entropy(shifted[keep], targets[keep], reduction="sum").item()
        units += int(keep.sum())
    return right / len(data), loss_sum / units


def memory_child(args: argparse.Namespace) -> None:
    """One side alone in this fresh process: the data tokenized first, then (from here on measured
    against this process's RSS) the model, two warm-up steps, and one step's peak RSS."""
    with tempfile.TemporaryDirectory() as scratch:
        train, evaluation = data_files(args.data, Path(scratch))
        train_set, _, pad_id = encoded(train, evaluation)
        bare_kb = c.status_kb("VmRSS")
        if args.memory_child == "peft":
            loop = PeftLoop(args, None, train_set, pad_id, autocast_for("auto", torch.device("cpu")))
            model, step = loop.model, loop.step
        else:
            trainer = lorakit_trainer(args, train, evaluation, Path(scratch) / "run")
            model = trainer.model
            step = hf_loss_stepper(trainer) if args.memory_child == "hf-loss" else trainer.train_step
        for _ in range(2):
            step()
        print(json.dumps(c.step_memory(model, step, bare_kb)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder written by examples/llm_demo/build_data.py (default: build one)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one: the machine is shared)")
    parser.add_argument("--no-memory", action="store_true", help="skip the child processes measuring memory")
    parser.add_argument("--hf-loss", action="store_true",
                        help="add a third side: lorakit's model with transformers' loss (where lorakit's time goes)")
    parser.add_argument("--memory-child", choices=["lorakit", "peft", "hf-loss"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(max(args.threads, 1))
    if args.memory_child:
        memory_child(args)
        return

    print(c.header("SmolLM2-135M-Instruct, json task: lorakit train vs a plain PEFT loop"))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        train, evaluation = data_files(args.data, Path(scratch))
        data = encoded(train, evaluation)
        trainer = lorakit_trainer(args, train, evaluation, Path(scratch) / "run")
        check_same_data(trainer, data)
        prepared = trainer.prepared
        autocast = autocast_for("auto", torch.device("cpu"))
        bf16 = not isinstance(autocast, contextlib.nullcontext)
        loop = PeftLoop(args, trainer, prepared.train, prepared.pad_id, autocast)
        assert trainer.total_steps == args.steps and lr_factor(0, args.steps, max(1, int(0.06 * args.steps)),
                                                                "constant") == loop.scheduler.lr_lambdas[0](0)
        print(f"- {len(prepared.train)} training / {len(prepared.eval)} evaluation examples, cut at "
              f"{prepared.length.tokens} tokens; {args.steps} steps of {args.batch_size}; LoRA r={RANK} alpha "
              f"{ALPHA:g} on {'/'.join(TARGETS)}, AdamW lr {LR:g}, clip {CLIP:g}; bf16 autocast "
              f"{'on' if bf16 else 'off'}", flush=True)

        before = exact_match(trainer.model, prepared.eval, prepared.pad_id, autocast, args.batch_size)
        print(f"- before training (the base; both sides start from it): exact match {100 * before[0]:.1f} %, "
              f"eval token loss {before[1]:.4f}", flush=True)
        sides = {"lorakit": trainer.train_step, "PEFT": loop.step}
        models = {"lorakit": trainer.model, "PEFT": loop.model}
        children = {"lorakit": "lorakit", "PEFT": "peft"}
        if args.hf_loss:
            third = lorakit_trainer(args, train, evaluation, Path(scratch) / "run-hf-loss")
            sides[HF_LOSS], models[HF_LOSS], children[HF_LOSS] = hf_loss_stepper(third), third.model, "hf-loss"
        wall: dict[str, list[float]] = {k: [] for k in sides}
        cpu: dict[str, list[float]] = {k: [] for k in sides}
        losses: dict[str, list[float]] = {k: [] for k in sides}
        for step in range(args.steps):
            names = list(sides)
            for name in names[step % len(names):] + names[:step % len(names)]:  # who goes first rotates
                c0, t0 = time.process_time(), time.perf_counter()
                losses[name].append(sides[name]())
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
            print(f"  step {step + 1}: loss " + " / ".join(f"{losses[k][-1]:.4f}" for k in sides) + ", "
                  + " / ".join(f"{wall[k][-1]:.2f}" for k in sides) + " s", flush=True)
        quality = {k: exact_match(m, prepared.eval, prepared.pad_id, autocast, args.batch_size)
                   for k, m in models.items()}
        n_eval = len(prepared.eval)
        del trainer, loop, sides, models, prepared
        if args.hf_loss:
            del third
        gc.collect()  # the models go before the memory children start
        memory = {}
        if not args.no_memory:
            flags = [f"--steps={args.steps}", f"--batch-size={args.batch_size}", f"--seed={args.seed}",
                     f"--threads={args.threads}", f"--data={Path(train).parent}"]
            for name, child in children.items():
                memory[name] = c.run_child(__file__, [*flags, f"--memory-child={child}"])

    later = {k: (wall[k][1:], cpu[k][1:]) for k in wall}
    rows = []
    for name in wall:
        w, t = later[name]
        em, token_loss = quality[name]
        mem = memory.get(name)
        rows.append([name, f"{statistics.median(w):.2f}", f"{statistics.median(t):.2f}",
                     f"{mem['peak_mib']:.0f}" if mem else "—", f"{mem['total_mib']:.0f}" if mem else "—",
                     f"{losses[name][0]:.4f}", f"{losses[name][-1]:.4f}", f"{100 * em:.1f} %", f"{token_loss:.4f}"])
    print()
    print(c.table(["", "wall s/step", "CPU s/step", "step peak MiB", "peak above bare MiB", "loss step 1",
                   f"loss step {args.steps}", f"exact match ({n_eval})", "eval token loss"], rows))
    print(f"\n÷ PEFT: time as the median of per-step ratios (steps 2..{args.steps})")
    for name in (k for k in wall if k != "PEFT"):
        ratio_w = c.paired_ratio({k: v[0] for k, v in later.items()}, name, "PEFT")
        ratio_c = c.paired_ratio({k: v[1] for k, v in later.items()}, name, "PEFT")
        line = f"- {name}: wall {ratio_w:.3f}×, CPU {ratio_c:.3f}×"
        if memory:
            line += (f"; step peak {memory[name]['peak_mib'] / memory['PEFT']['peak_mib']:.3f}×, peak above the bare "
                     f"process {memory[name]['total_mib'] / memory['PEFT']['total_mib']:.3f}×")
        print(line)
    print("exact match: " + ", ".join(f"{k} {100 * q[0]:.1f} %" for k, q in quality.items())
          + f"; whole run {time.perf_counter() - started:.0f} s; load average at end: {c.loadavg()}")


if __name__ == "__main__":
    main()
