"""Training settings: one dataclass, filled from a YAML file and/or command-line flags.

Kept apart from :class:`lorakit.AdapterConfig` on purpose: the adapter config is what a loader
needs to rebuild the forward pass; everything here only matters while training.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.methods import METHODS

TASKS = ("classify", "causal-lm")
BASELINES = ("delta-lora", "full", "head")  # --method values that are training rules, not adapter methods


def train_methods() -> tuple[str, ...]:
    """--method's choices: every registered adapter method (lorakit.methods.METHODS), then the baselines."""
    return (*METHODS, *BASELINES)


TRAIN_METHODS = train_methods()  # as registered at import; validation reads the registry afresh
QUANTIZE = ("none", "nf4", "int8")
SCHEDULERS = ("constant", "linear", "cosine")


@dataclass
class TrainConfig:
    # model and data
    model: str = "default"  # a local HF model folder, "default" (the shipped MiniLM), or "random:llama,hidden=64,..."
    data: str = "default"  # CSV/TSV/JSONL, a mix a.jsonl:0.7,b.jsonl:0.3, or "default" (the drug reviews)
    eval_data: str | None = None  # held-out file; None: the default test set, or a split of --data
    task: str = "classify"  # classify | causal-lm
    text_column: str | None = None  # classify: guessed from text/sentence/review/... when unset
    label_column: str | None = None  # classify: guessed from label/rating/sentiment/... when unset
    max_length: int | None = None  # tokens kept per example; unset: what 99% of the training examples need, ≤ 2048
    max_drop: float = 0.05  # causal-lm: refuse to run when more than this share of examples has no room for an answer
    eval_split: float = 0.1  # share of --data held out when there is no eval set
    chat_turns: str = "all"  # chat data: the loss covers every assistant turn (all) or only the last one (last)
    chat_template: str | None = None  # a Jinja file replacing the tokenizer's chat template (saved with the adapter)
    quantize: str = "none"  # none | nf4 | int8: the frozen base through bitsandbytes (QLoRA)
    # the adapter
    method: str = "lora"  # {methods} | delta-lora (LoRA that also moves W) | full (baseline) | head (baseline)
    rank: int = 8  # r: the rank of the update B·A
    method_options: str | None = None  # the method's own options, key=value,... (e.g. projection_seed=1,d_initial=0.1)
    alpha: float = 16.0  # the update is scaled by alpha / rank (alpha / √rank with --rslora)
    dropout: float = 0.0  # on the adapter's input; PEFT's default (0.05 cost accuracy: BENCHMARKS.md §9)
    targets: str = "query,value,q_proj,v_proj,c_attn"  # comma list, a regex, or all-linear
    exclude_modules: str | None = None  # modules --targets matched that get no adapter: comma list or regex
    layers_to_transform: str | None = None  # only the blocks of these layer indices get adapters: 0,1,2
    layers_pattern: str | None = None  # the container whose next name is the layer index (e.g. layers); unset: guessed
    rank_pattern: str | None = None  # per-module ranks: pattern=rank,... (YAML: a mapping); PEFT's suffix/regex rule
    alpha_pattern: str | None = None  # per-module alphas: pattern=alpha,... (YAML: a mapping)
    rslora: bool = False  # scale by alpha / √rank (rsLoRA), so larger ranks keep learning
    init: str = "default"  # default | gaussian | pissa | gradient-svd
    init_batches: int = 4  # gradient-svd: training batches whose gradient sets the factors
    delta_c: float = 2.0  # Delta-LoRA update ratio c
    delta_start: int = 500  # Delta-LoRA: W starts moving at this step
    # optimisation
    epochs: int = 3  # passes over the training data
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 16  # examples per optimizer step
    grad_accum: int = 1  # micro-batches the step's batch is cut into (same update, less memory)
    lr: float = 5e-4  # peak learning rate (AdamW)
    loraplus_ratio: float | None = None  # LoRA+: lr of B = ratio × lr of A (16 in the paper)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    scheduler: str = "constant"  # constant | linear | cosine: the lr after warmup (linear, cosine: decay to 0)
    warmup_ratio: float = 0.06  # share of the steps over which the lr rises linearly to --lr
    max_grad_norm: float = 1.0  # gradient clipping; 0: off
    bf16: str = "auto"  # auto (on where the hardware runs it fast) | on | off
    pack: bool = False  # causal-lm: lay each micro-batch's examples end to end in rows of --max-length (same loss)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower steps
    shard: bool = False  # under torchrun: split the base and adapters across the processes (FSDP2); else DDP
    seed: int = 0  # data order, heads, random bases and inits
    # evaluation and checkpoints
    eval_every: int | None = None  # steps; None: once per epoch
    select: str = "last"  # last | best (highest accuracy / lowest perplexity): the evaluation whose adapter is saved
    early_stopping: int | None = None  # stop after this many evaluations without improvement (see --select)
    save_every: int | None = None  # checkpoint interval in steps; None: at every evaluation
    keep_last: int = 2  # checkpoints kept
    general_data: str | None = None  # .txt (blank-line separated) or .jsonl passages; None: the shipped sample
    general_samples: int = 32  # general-text passages measured before training and at each evaluation; 0: off
    # run
    out: str = "runs/train"  # the run folder: adapter, config.yaml, metrics.jsonl, curves.png, summary.json
    resume: bool = False  # continue the run in --out from its last checkpoint
    log: str = "none"  # none | tensorboard: also write TensorBoard event files to the run folder's tensorboard/
    threads: int = 0  # torch CPU threads; 0: torch's default (one per core)
    quiet: bool = False  # no progress bar or evaluation lines

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.method not in train_methods():
            raise ConfigError(f"--method must be one of {', '.join(train_methods())}, got {self.method!r}")
        if self.quantize not in QUANTIZE:
            raise ConfigError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.bf16 not in ("auto", "on", "off"):
            raise ConfigError(f"--bf16 must be auto, on or off, got {self.bf16!r}")
        if self.threads < 0:
            raise ConfigError("--threads must be 0 (torch's default) or more")
        if self.general_samples < 0:
            raise ConfigError("--general-samples must be 0 (off) or more")
        for name in ("batch_size", "grad_accum", "epochs", "rank", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("--max-steps must be at least 1")
        self.options()  # a typo in --method-options fails here, before any work
        self.excluded_modules(), self.layer_indices(), self.rank_patterns(), self.alpha_patterns()  # likewise
        if self.quantize != "none" and self.method == "full":
            raise ConfigError("--method full trains every weight, which a quantised base cannot; drop --quantize")
        if self.select not in ("last", "best"):
            raise ConfigError(f"--select must be last or best, got {self.select!r}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("--warmup-ratio must be at least 0 and below 1")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError("--max-length must be at least 2 tokens")
        if self.log not in ("none", "tensorboard"):
            raise ConfigError(f"--log must be none or tensorboard, got {self.log!r}")
        if self.log == "tensorboard":
            from lorakit.train.tensorboard_log import check_available

            check_available()
        if self.chat_turns not in ("all", "last"):
            raise ConfigError(f"--chat-turns must be all or last, got {self.chat_turns!r}")
        if not 0 <= self.max_drop <= 1:
            raise ConfigError("--max-drop must be between 0 and 1")
        if self.pack and self.task != "causal-lm":
            raise ConfigError("--pack lays causal-LM examples end to end in rows; it needs --task causal-lm "
                              "(a classifier reads one example per row)")
        if self.shard and self.method in BASELINES:
            raise ConfigError(f"--shard splits a frozen base under an adapter; --method {self.method} "
                              f"{'writes the base weights' if self.method == 'delta-lora' else 'trains the base'}, "
                              "which sharded training does not support: train it without --shard")
        if self.shard and self.quantize == "int8":
            raise ConfigError("--shard cannot split an 8-bit base (bitsandbytes keeps its scales inside the "
                              "weight, which sharding drops); use --quantize nf4 or none")
        if not 0 < self.eval_split < 1:
            raise ConfigError("--eval-split must be between 0 and 1")

    def target_modules(self) -> tuple[str, ...] | str:
        """--targets as AdapterConfig wants it: all-linear, a regex, or a tuple of names."""
        spec = self.targets.strip()
        if spec == "all-linear":
            return spec
        if any(ch in spec for ch in "*()[]|\\^$+?"):
            return spec
        return tuple(t.strip() for t in spec.split(",") if t.strip())

    def options(self) -> dict[str, Any]:
        """--method-options as a mapping, checked against the method's own options. In a YAML file it
        may be a mapping already; on the command line it is ``key=value,...`` (values read as YAML)."""
        given = _key_values(self.method_options, "--method-options")
        if not given:
            return {}
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method} takes no --method-options")
        METHODS[self.method].options_from(given)
        return dict(given)

    def excluded_modules(self) -> tuple[str, ...] | str | None:
        """--exclude-modules as AdapterConfig wants it: a regex, or a tuple of names (YAML: a list too)."""
        given = self.exclude_modules
        if given is None or given == "" or given == []:
            return None
        if isinstance(given, (list, tuple)):
            return tuple(str(name) for name in given)
        spec = str(given).strip()
        if any(ch in spec for ch in "*()[]|\\^$+?"):
            return spec
        return tuple(t.strip() for t in spec.split(",") if t.strip())

    def layer_indices(self) -> tuple[int, ...] | None:
        """--layers-to-transform as a tuple of layer indices: ``0,1,2`` on the command line, a list
        or one number in YAML."""
        given = self.layers_to_transform
        if given is None or given == "" or given == []:
            return None
        items = [given] if isinstance(given, int) else given if isinstance(given, (list, tuple)) \
            else str(given).split(",")
        try:
            indices = tuple(int(str(item).strip()) for item in items if str(item).strip())
        except ValueError:
            raise ConfigError(f"--layers-to-transform takes layer indices separated by commas (e.g. 0,1,2), "
                              f"got {given!r}") from None
        if any(i < 0 for i in indices):
            raise ConfigError(f"--layers-to-transform indices must be 0 or more, got {given!r}")
        return indices

    def rank_patterns(self) -> dict[str, int]:
        """--rank-pattern as {module pattern: rank}: ``pattern=rank,...`` or a YAML mapping."""
        patterns = _key_values(self.rank_pattern, "--rank-pattern")
        for key, value in patterns.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--rank-pattern: the rank of {key!r} must be a positive integer, got {value!r}")
        return patterns

    def alpha_patterns(self) -> dict[str, float]:
        """--alpha-pattern as {module pattern: alpha}: ``pattern=alpha,...`` or a YAML mapping."""
        patterns = _key_values(self.alpha_pattern, "--alpha-pattern")
        for key, value in patterns.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"--alpha-pattern: the alpha of {key!r} must be a number, got {value!r}")
        return {key: float(value) for key, value in patterns.items()}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _key_values(given: Any, flag: str) -> dict[str, Any]:
    """A mapping given in YAML, or ``key=value,...`` from the command line (values read as YAML,
    so 4 is a number and true a boolean)."""
    import yaml

    if given is None or given == "":
        return {}
    if isinstance(given, dict):
        return {str(key): value for key, value in given.items()}
    if not isinstance(given, str):
        raise ConfigError(f"{flag} takes key=value pairs separated by commas (in YAML: a mapping), got {given!r}")
    pairs = [item.split("=", 1) for item in given.split(",") if item.strip()]
    if any(len(pair) != 2 or not pair[0].strip() for pair in pairs):
        raise ConfigError(f"{flag} takes key=value pairs separated by commas, got {given!r}")
    return {key.strip(): yaml.safe_load(value) for key, value in pairs}


def _comment_help() -> dict[str, str]:
    """The inline comments of TrainConfig's fields, used as --help text (one source of truth)."""
    import inspect
    import re

    source = inspect.getsource(TrainConfig)
    found = {}
    for match in re.finditer(r"^\s+(\w+): [^=]+= [^#\n]+#\s*(.+)$", source, re.M):
        found[match.group(1)] = match.group(2).strip().replace("{methods}", " | ".join(METHODS))
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; defaults stay None so the YAML file can fill them."""
    parser.add_argument("--config", help="YAML file of settings; flags override it")
    comments = _comment_help()
    groups = _groups()
    made: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainConfig):
        title = groups.get(f.name, "options")
        group = made.get(title) or made.setdefault(title, parser.add_argument_group(title))
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        text = f"{comments.get(f.name, '')} (default: {default})".replace("%", "%%")  # argparse formats help
        if f.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(flag, type=_parser_for(f.type), default=None, help=text, metavar=f.name.upper())


def _groups() -> dict[str, str]:
    """Each field's section in TrainConfig (its "# section" comment lines), the --help groups."""
    import inspect
    import re

    found, title = {}, "options"
    for line in inspect.getsource(TrainConfig).splitlines():
        section = re.match(r"^    # (.+)$", line)
        if section:
            title = section.group(1)
        field = re.match(r"^    (\w+): ", line)
        if field:
            found[field.group(1)] = title
    return found


def _parser_for(annotation: str):
    if annotation.startswith("int"):
        return int
    if annotation.startswith("float"):
        return float
    return str


def from_arguments(args: argparse.Namespace) -> TrainConfig:
    """File values first, then every flag the user typed."""
    values: dict[str, Any] = {}
    if args.config:
        values.update(read_yaml(args.config))
    for f in fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return TrainConfig(**values)


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    known = {f.name for f in fields(TrainConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown settings {', '.join(_with_guess(k, known) for k in unknown)}; see "
                          "`lorakit train --help`")
    return data


# Names other tools give lorakit's settings (HF TrainingArguments, PEFT's LoraConfig, axolotl).
OTHER_TOOLS = {"learning_rate": "lr", "lora_r": "rank", "r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout",
               "target_modules": "targets", "num_train_epochs": "epochs", "num_epochs": "epochs",
               "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
               "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "scheduler",
               "lr_scheduler": "scheduler", "output_dir": "out", "sequence_len": "max_length",
               "max_seq_length": "max_length", "base_model": "model", "dataset": "data", "use_rslora": "rslora",
               "packing": "pack", "sample_packing": "pack"}


def _with_guess(key: str, known: set[str]) -> str:
    import difflib

    guess = OTHER_TOOLS.get(key) or next(iter(difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)), None)
    return f"{key!r} (did you mean {guess!r}?)" if guess in known else repr(key)
