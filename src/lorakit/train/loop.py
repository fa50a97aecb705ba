"""The training loop: accumulation, clipping, warmup + lr schedule, evaluation, early stopping,
best-checkpoint selection, exact resume, and DistributedDataParallel or FSDP (``--shard``) under
torchrun.

Batches are a pure function of (seed, step) and the loss of a step is normalised by the global
number of loss units (examples or answer tokens) of that step, so one process, several
accumulation steps or several ranks all compute the same update.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit import symptoms
from lorakit.errors import InterruptedTrainingError
from lorakit.train import batches as B
from lorakit.train import checkpoint as ckpt
from lorakit.train import packing, sharding
from lorakit.train.config import TrainConfig
from lorakit.train.distributed import Distributed
from lorakit.train.general import GeneralTracker
from lorakit.train.outputs import RunOutputs
from lorakit.train.setup import Prepared, prepare

log = logging.getLogger("lorakit")


class TrainingError(lorakit.LorakitError, RuntimeError):
    """Training that cannot go on as configured (e.g. a tensor that never receives a gradient)."""


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of the loss over the batch's units, number of units). A packed batch also carries
    position_ids (and a 4D attention mask): see :mod:`lorakit.train.packing`."""
    labels = batch["labels"]
    extra = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
    if labels.dim() == 2:  # a causal LM: no KV cache, which would hold every layer's keys until the loss
        extra["use_cache"] = False
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
    logits = out.logits if hasattr(out, "logits") else out[0]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least float32; float64 stays
    if labels.dim() == 1:  # classification
        return F.cross_entropy(logits, labels, reduction="sum"), labels.numel()
    # Position t predicts token t+1: shift the labels, not the logits, so the (tokens × vocabulary)
    # logits and their gradient are not copied by a slice (275 MiB a step on SmolLM2, BENCHMARKS §12).
    targets = F.pad(labels[:, 1:], (0, 1), value=B.IGNORE)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=B.IGNORE,
                           reduction="sum")
    return loss, int((targets != B.IGNORE).sum())


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine") -> float:
    """The lr multiplier of optimizer step ``step`` (0-based): linear warmup to 1 over ``warmup``
    steps, then 1 (constant), or a linear or cosine decay that reaches 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class Trainer:
    def __init__(self, config: TrainConfig,
                 on_evaluation: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.config = config
        self.on_evaluation = on_evaluation  # sees each evaluation's metrics record; may raise to end the run
        self.dist = Distributed.from_env(shard=config.shard)
        torch.manual_seed(config.seed)
        # --shard on several processes: only rank 0 reads the base; the others build its shapes
        self.rank0_reads = sharding.rank0_reads_weights(self.dist.shard, self.dist.world, config.quantize, config.init)
        # every input check happens here, before any write
        self.prepared: Prepared = prepare(config, shapes_only=self.rank0_reads and not self.dist.is_main)
        # config.yaml records the length examples were cut at, chosen from the data or given, so
        # `lorakit eval` and a resumed run (which chooses it again from the same data) use it too
        config.max_length = self.prepared.length.tokens
        self.outputs = RunOutputs(Path(config.out), enabled=self.dist.is_main)
        self.outputs.max_length_used = self.prepared.length.tokens
        self.outputs.check_fresh_or_resume(config.resume)
        self.device = self.dist.device
        # sharding moves each parameter's shard to the device itself: the whole model never has to fit there
        self.model = self.prepared.model if self.dist.shard else self.prepared.model.to(self.device)
        whole = None
        if self.rank0_reads:
            sharding.take_rank0_layout(self.model, self.dist.rank)
            whole = sharding.whole_tensors(self.model) if self.dist.is_main else None
        self.forward_model = self.dist.wrap(self.model)  # FSDP replaces the parameters: collect them after
        if self.rank0_reads:
            sharding.fill_from_rank0(self.model, whole, self.device)
            del whole  # rank 0's whole copy: from here each rank holds its shard only
        # --pack: refused here, before any write, for a model whose attention cannot keep examples apart
        self.packer = packing.Packer.for_model(self.model, self.outputs.max_length_used,
                                               self.prepared.pad_id) if config.pack else None
        if self.dist.shard:
            held, total = sharding.parameter_bytes(self.model)
            self.outputs.say(f"--shard: {self.dist.world} process(es), each holding 1/{self.dist.world} of every "
                             f"weight (FSDP2, one unit per block): {held / 2**10:,.1f} of {total / 2**10:,.1f} KiB of "
                             "parameters here" + ("; the base was read by rank 0 only" if self.rank0_reads else ""))
        elif config.shard:
            self.outputs.say("--shard: one process, not under torchrun: nothing to split, training unsharded")
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.trainable_names = [names[id(p)] for p in self.trainable]  # FSDP may swap in gathered copies later
        if not self.trainable:
            raise TrainingError("nothing to train: no parameter requires a gradient")
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=config.lr, weight_decay=config.weight_decay)
        per_epoch = B.steps_per_epoch(len(self.prepared.train), config.batch_size)
        self.total_steps = config.max_steps or config.epochs * per_epoch
        warmup = max(1, int(config.warmup_ratio * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, warmup, config.scheduler))
        self.eval_every = config.eval_every or per_epoch
        self.save_every = config.save_every or self.eval_every
        self.rule = None
        if config.method == "delta-lora":
            self.rule = lorakit.DeltaLoRA(self.prepared.adapted, c=config.delta_c, start_step=config.delta_start)
        self.autocast = autocast_for(config.bf16, self.device)
        self.metric_name = "accuracy" if config.task == "classify" else "perplexity"
        self.state: dict[str, Any] = {"step": 0, "best": None, "best_step": None, "top": None, "bad_evals": 0,
                                      "metric_before": None, "train_seconds": 0.0, "examples": 0,
                                      "tokens": 0, "positions": 0}  # real tokens, and with padding
        self.best_tensors: dict[str, torch.Tensor] | None = None
        self.label_counts: list[int] | None = None  # predictions per label at the latest evaluation (classify)
        self.general = GeneralTracker(config, self.prepared, self.device, self.autocast)  # forgetting

    # -- parameters --------------------------------------------------------------------------
    def _param_groups(self) -> list[dict[str, Any]]:
        config = self.config
        if config.loraplus_ratio and self.prepared.adapted is not None:
            return lorakit.loraplus_param_groups(self.prepared.adapted, config.lr, config.loraplus_ratio,
                                                 config.weight_decay)
        return [{"params": self.trainable, "lr": config.lr, "name": "all"}]

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint must hold: trainable ones, adapter buffers, and W for Delta-LoRA."""
        keep = {name: p for name, p in zip(self.trainable_names, self.trainable, strict=True)}
        persistent = self.model.state_dict(keep_vars=True)
        for n, b in self.model.named_buffers():
            if ".adapters." in n and n in persistent:  # VeRA's shared projections are fixed by the seed
                keep[n] = b
        if self.rule is not None:
            for path, layer in self.prepared.adapted.layers_of("default").items():
                keep[f"model.{path}.base_layer.weight"] = layer.base_layer.weight
        # sharded tensors are gathered whole (every process takes part), so the layout never depends on --shard
        return {k: sharding.full(v).detach().to("cpu", copy=True) for k, v in keep.items()}

    def load_trained_state(self, tensors: dict[str, torch.Tensor]) -> None:
        sharding.settle(self.model)
        missing = set(tensors) - set(self.model.state_dict())
        if missing:
            raise TrainingError(f"checkpoint does not fit this run: unknown tensors {sorted(missing)[:3]}")
        named = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        with torch.no_grad():
            for k, v in tensors.items():
                target = named[k]
                if target.shape != v.shape:  # adapter buffers (shift) grow during Delta-LoRA
                    _replace_buffer(self.model, k, v.to(self.device))
                else:
                    sharding.copy_full_into(target, v)

    # -- running -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        config = self.config
        resumed = self._maybe_resume()
        self.outputs.start(config, resumed_step=self.state["step"] if resumed else None)
        if not resumed:
            self.outputs.progress_note(self.prepared.length.line(), config.quiet)
        reference = self.general.start(self.state)  # general text before training (kept in the state)
        if self.state["metric_before"] is None:
            self.state["metric_before"] = self.evaluate()
            self.outputs.metric({"step": 0, self.metric_name: self.state["metric_before"], **reference})
        self._log_groups()
        bar = self.outputs.progress(self.total_steps, self.state["step"], quiet=config.quiet or not self.dist.is_main)
        started = time.perf_counter()
        while self.state["step"] < self.total_steps:
            loss = self.train_step()
            step = self.state["step"]
            lr = self.scheduler.get_last_lr()[-1]
            self.outputs.metric({"step": step, "loss": loss, "lr": lr})
            elapsed = self.state["train_seconds"] + time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", ex_s=f"{self.state['examples'] / elapsed:.1f}")
            stop = False
            if step % self.eval_every == 0 or step == self.total_steps:
                stop = self._after_evaluation(self.evaluate())
            if step % self.save_every == 0 or stop or step == self.total_steps:
                self.state["train_seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                self._checkpoint()
            if stop:
                log.info("early stopping at step %d (best %s %.4f; kept: step %d)", step, self.metric_name,
                         self.state["top"], self.state["best_step"])
                break
        bar.close()
        self.state["train_seconds"] += time.perf_counter() - started
        return self._finish()

    def train_step(self) -> float:
        config, dist = self.config, self.dist
        step = self.state["step"]
        indices = B.step_indices(len(self.prepared.train), config.batch_size, config.seed, step)
        units = B.loss_units([self.prepared.train[i] for i in indices])
        micro = B.split_for(indices, config.grad_accum, dist.rank, dist.world)
        self.model.train()
        total = torch.zeros((), device=self.device)
        for k, chunk in enumerate(micro):
            last = k == len(micro) - 1
            sync = contextlib.nullcontext() if last else dist.no_sync(self.forward_model)
            with sync:
                # A rank without rows in a short final batch runs one row at weight 0: DDP's all-reduce
                # and FSDP's per-block gathers need every rank's forward and backward.
                weight = 1.0 if chunk else 0.0
                chunk = chunk or indices[:1]
                items = [self.prepared.train[i] for i in chunk]
                laid = self.packer.batch(items) if self.packer else B.collate(items, self.prepared.pad_id)
                batch = {k2: v.to(self.device) for k2, v in laid.items()}
                with self.autocast:
                    loss_sum, _ = batch_loss(self.forward_model, batch)
                (loss_sum * (weight * dist.world / units)).backward()
                total += loss_sum.detach() * weight
        if step == 0:
            self._check_gradients()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.rule is not None:
            self.rule.step()
        self.state["step"] = step + 1
        self.state["examples"] += len(indices)
        if "tokens" in self.state:  # a checkpoint from before tokens were counted leaves the figure unknown
            tokens, positions = packing.step_tokens(self.prepared.train, indices, config.grad_accum, dist.world,
                                                    self.packer.max_length if self.packer else None)
            self.state["tokens"] += tokens
            self.state["positions"] += positions
        return dist.all_sum(total).item() / units

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        data, size = self.prepared.eval, self.config.batch_size
        correct = loss_sum = units = 0.0
        predicted: list[int] = []
        for start in range(0, len(data), size):
            batch = {k: v.to(self.device) for k, v in B.collate(data[start:start + size],
                                                               self.prepared.pad_id).items()}
            with self.autocast:
                if batch["labels"].dim() == 1:
                    out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    chosen = out.logits.argmax(-1)
                    correct += (chosen == batch["labels"]).sum().item()
                    units += batch["labels"].numel()
                    predicted += chosen.tolist()
                else:
                    s, n = batch_loss(self.model, batch)
                    loss_sum += s.item()
                    units += n
        if self.metric_name == "accuracy":
            labels = len(self.prepared.label_names or []) or max(predicted) + 1
            self.label_counts = torch.tensor(predicted).bincount(minlength=labels).tolist()  # what symptoms read
            return correct / units
        return math.exp(min(loss_sum / units, 50.0))

    # -- helpers -----------------------------------------------------------------------------
    def _after_evaluation(self, value: float) -> bool:
        """Record an evaluation; True when early stopping says stop.

        ``best`` / ``best_step`` / ``best_tensors`` are what the run keeps: under --select last the
        latest evaluation (the live model, so no copy), under --select best the best so far.
        ``top`` is the best value, which early stopping counts from in both."""
        step = self.state["step"]
        general = self.general.evaluate(self.model, self.state)  # forgetting on general text, now
        self.outputs.metric({"step": step, self.metric_name: value, **general})
        if self.on_evaluation is not None:
            self.on_evaluation({"step": step, self.metric_name: value, **general, "total_steps": self.total_steps})
        top = self.state.get("top", self.state["best"])  # checkpoints from before --select have no "top"
        better = top is None or (value > top if self.metric_name == "accuracy" else value < top)
        self.state["top"] = value if better else top
        self.state["bad_evals"] = 0 if better else self.state["bad_evals"] + 1
        figures = "".join(f", {k.replace('_', ' ')} {v:.4g}" for k, v in general.items() if k != "step")
        self.outputs.progress_note(f"step {step}: {self.metric_name} {value:.4f} (best {self.state['top']:.4f})"
                                   f"{figures}", quiet=self.config.quiet)
        if self.config.select == "last" or better:
            self.state.update(best=value, best_step=step, best_label_counts=self.label_counts)
            self.general.keep_best(self.state)
            self.best_tensors = None if self.config.select == "last" else self.trained_state()
        patience = self.config.early_stopping
        return patience is not None and self.state["bad_evals"] >= patience

    def _check_gradients(self) -> None:
        names = {id(p): n for n, p in self.model.named_parameters()}
        missing = [names[id(p)] for p in self.trainable if p.grad is None]
        if missing:
            raise TrainingError(
                f"{len(missing)} trainable tensors received no gradient in the first step (e.g. {missing[0]}); "
                "the adapter would silently never train. Check the targets sit on the loss path."
            )

    def _log_groups(self) -> None:
        # The peak lr of each group (the schedule's warmup starts below it), so a LoRA+ ratio is visible.
        groups = ", ".join(
            f"{g.get('name', i)}: lr {g.get('initial_lr', g['lr']):.3g} "
            f"({sum(p.numel() for p in g['params']):,d} params)"
            for i, g in enumerate(self.optimizer.param_groups))
        self.outputs.say(f"optimizer groups at step {self.state['step']}: {groups}")

    def _checkpoint(self) -> None:
        optimizer = sharding.full_optimizer_state(self.optimizer) if self.dist.shard else self.optimizer.state_dict()
        payload = {
            "trained": self.trained_state(), "optimizer": optimizer, "processes": self.dist.world,
            "scheduler": self.scheduler.state_dict(), "state": dict(self.state), "best_tensors": self.best_tensors,
            "rule": self.rule.state_dict() if self.rule else None, "config": self.config.to_dict(),
        }
        if self.dist.is_main:
            ckpt.save_checkpoint(self.outputs.checkpoints, self.state["step"], payload, self.config.keep_last)
        self.dist.barrier()

    def _maybe_resume(self) -> bool:
        if not self.config.resume:
            return False
        payload = ckpt.load_latest(self.outputs.checkpoints)
        if payload is None:
            self.outputs.say("--resume: no checkpoint found; starting from step 0")
            return False
        applied = resume_changes(payload.get("config") or {}, self.config)
        self.load_trained_state(payload["trained"])
        if self.dist.shard:
            sharding.load_optimizer_state(self.optimizer, payload["optimizer"])
        else:
            self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.state = payload["state"]
        self.best_tensors = payload["best_tensors"]
        if self.rule is not None and payload["rule"] is not None:
            self.rule.load_state_dict(payload["rule"])
        ckpt.set_rng_state(payload["rng"])
        before = payload.get("processes", 1)
        if before != self.dist.world:  # checkpoints hold whole tensors and a step's batch is global
            applied.append(f"processes {before} → {self.dist.world} (same global batch, same steps; sums may "
                           "round differently)")
        self.outputs.say(f"resumed from step {self.state['step']}"
                         + (f"; changed: {'; '.join(applied)}" if applied else ""))
        return True

    def _symptoms(self, summary: dict[str, Any]) -> list[str]:
        """What the saved model's figures say went wrong (printed with the summary)."""
        found = []
        counts = self.state.get("best_label_counts")
        if counts:
            truth = torch.tensor([e.labels for e in self.prepared.eval]).bincount(minlength=len(counts)).tolist()
            found.append(symptoms.one_label("the saved model", counts, self.prepared.label_names, truth,
                                            summary["metric_after"]))
        found += symptoms.general_text("the saved model", summary["general"])
        return [w for w in found if w]

    def _token_figures(self) -> dict[str, float | None]:
        """Real (non-pad) tokens per training second, and the share of processed positions that
        were padding: what --pack saves (None when a resumed checkpoint did not count them)."""
        tokens, positions = self.state.get("tokens"), self.state.get("positions")
        if tokens is None or not positions:
            return {"tokens_per_second": None, "padding_share": None}
        return {"tokens_per_second": round(tokens / max(self.state["train_seconds"], 1e-9), 1),
                "padding_share": round(1 - tokens / positions, 4)}

    def _finish(self) -> dict[str, Any]:
        if self.best_tensors is not None:
            self.load_trained_state(self.best_tensors)
        summary = {
            "metric_name": self.metric_name,
            "metric_before": self.state["metric_before"],
            "metric_after": self.state["best"],
            "best_step": self.state["best_step"],
            "steps": self.state["step"],
            "trainable_params": sum(p.numel() for p in self.trainable),
            "total_params": lorakit.report.count_parameters(self.model)[1],
            "seconds": round(self.state["train_seconds"], 2),
            "examples_per_second": round(self.state["examples"] / max(self.state["train_seconds"], 1e-9), 2),
            **self._token_figures(),
            "method": self.config.method,
            "bf16_autocast": not isinstance(self.autocast, contextlib.nullcontext),
            "general": self.general.summary(self.state),
        }
        summary["data"] = {part: fit.as_dict() for part, fit in self.prepared.fit.items()}
        if self.prepared.sources:
            summary["data"]["sources"] = self.prepared.sources
        summary["max_length"] = self.prepared.length.as_dict()
        summary["warnings"] = self._symptoms(summary)
        if self.dist.shard:  # the adapter file is written from whole tensors, gathered by every process
            sharding.gather_parameters_in_place(self.model, self.trainable)
        if self.dist.is_main:
            summary["adapter_bytes"] = self.outputs.save_model(self.prepared, self.config)
            self.outputs.finish(summary, self.metric_name)
        self.dist.barrier()
        self.dist.close()
        return summary


# Settings a resumed run may change: how long it runs and what it reports, not what it computes.
SAFE_ON_RESUME = frozenset({"epochs", "max_steps", "eval_every", "save_every", "keep_last", "early_stopping",
                            "threads", "quiet", "out", "resume", "select", "general_data", "general_samples", "bf16",
                            "log", "shard"})
# Values checkpoints written before a setting existed were trained with.
BEFORE_IT_EXISTED = {"scheduler": "cosine", "warmup_ratio": 0.06, "select": "best", "pack": False}


def resume_changes(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """Refuse to resume with a setting that would change what the run computes (the rank, the
    model, the data, the lr or its schedule: the optimizer and scheduler states would silently
    keep the old ones, or the tensors would not fit); return the safe changes, applied."""
    broken, applied = [], []
    for name, now in config.to_dict().items():
        if name not in saved and name not in BEFORE_IT_EXISTED:
            continue
        was = saved.get(name, BEFORE_IT_EXISTED.get(name))
        if was == now:
            continue
        change = f"--{name.replace('_', '-')} {was} → {now}"
        (applied if name in SAFE_ON_RESUME else broken).append(change)
    if broken:
        raise lorakit.ConfigError(
            "--resume: these settings differ from the checkpoint's and would change what the run computes: "
            + "; ".join(broken) + ". Pass the checkpoint's values to resume it (config.yaml in the run folder "
            "holds them), or start a new run with another --out")
    return applied


def autocast_for(setting: str, device: torch.device):
    """bf16 autocast when asked, or under "auto" where bf16 matrix products are fast."""
    use = setting == "on" or (setting == "auto" and bf16_is_fast(device))
    if not use:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def bf16_is_fast(device: torch.device) -> bool:
    """A CUDA GPU with bf16, or a CPU with AMX tiles (Sapphire Rapids and later), where a bf16
    matrix product ran 8× faster than float32 in a one-thread measurement. Plain AVX-512 CPUs
    gain little and lose precision, so they stay in float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool(is_amx and is_amx())
    return False


def _replace_buffer(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, value)


def train(config: TrainConfig, on_evaluation: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run one training job end to end and return its summary. ``on_evaluation``, when given, is
    called with each evaluation's metrics.jsonl record and the run's ``total_steps`` (a sweep
    prunes weak trials from it)."""
    if config.threads:
        # On a shared CPU, fewer threads than cores avoids each op waiting for a descheduled thread.
        torch.set_num_threads(config.threads)
    trainer = Trainer(config, on_evaluation)
    try:
        return trainer.run()
    except KeyboardInterrupt:
        raise InterruptedTrainingError(
            f"stopped at step {trainer.state['step']}; rerun the same command with --resume to continue from the "
            "last checkpoint") from None


def dumps(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2)
