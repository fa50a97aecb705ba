"""``lorakit eval``: one base, one or more adapters (and their combination), one report.

For every candidate (each adapter alone, and the combination when ``--combine`` is given) the
report holds: the task metric against the base on every task file (a combination is scored on
each constituent's task next to that constituent), regression on the keep files (flips, KL,
the examples that moved most), forgetting on general text, and the parity of the merged
candidate. The top level of the report is the candidate that would ship: the combination when
there is one, else the first adapter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.evaluation import regression as R
from lorakit.evaluation import statistics as S
from lorakit.evaluation.diagnose import warnings_for
from lorakit.evaluation.formats import reference_format, valid_json
from lorakit.evaluation.parity import parity
from lorakit.evaluation.passes import Paired, greedy_answers, only, paired_pass
from lorakit.evaluation.sources import (
    AdapterSource,
    EvalSet,
    Reading,
    adapter_sources,
    decide_model,
    decide_task,
    load_eval_set,
    task_files,
)
from lorakit.model import AdaptedModel
from lorakit.train import batches as B

COMBINED = "combined"


@dataclass
class EvalOptions:
    adapters: list[str]
    out: str
    model: str | None = None
    data: list[str] = field(default_factory=list)
    keep: list[str] = field(default_factory=list)
    general: str | None = None  # a file of passages; None: the shipped sample; "none": skip
    general_samples: int | None = None  # passages of the general sample used (None: all)
    task: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    combine: str | None = None  # linear | svd | ties | ... (needs two adapters or more)
    weights: list[float] | None = None
    density: float = 0.5
    rank: int | None = None
    max_length: int | None = None  # None: the run's, else 512 (both capped at the tokenizer's limit)
    batch_size: int = 16
    bootstrap: int = 1000
    seed: int = 0
    bf16: str = "off"
    fail_if: str | None = None
    check_fingerprint: bool = True  # False: evaluate on another base on purpose
    quiet: bool = False


@dataclass
class Context:
    """The loaded model and everything the passes share."""

    model: AdaptedModel
    tokenizer: Any
    task: str
    device: torch.device
    pad_id: int
    autocast: Any
    options: EvalOptions
    passes: int = 0  # forward passes over examples, for the cost line
    untrained_head: bool = False  # the base has no trained classification head: the adapter brings it
    chat_template: str | None = None  # whose template chats are read with (causal LMs)
    base_valid_json: dict[str, torch.Tensor] = field(default_factory=dict)  # per task file, shared by candidates


def evaluate(options: EvalOptions) -> dict[str, Any]:
    """Build the report (and write nothing): see :func:`lorakit.evaluation.report_files.write_report`."""
    started = time.perf_counter()
    if options.combine and len(options.adapters) < 2:
        raise ConfigError("--combine needs two adapters or more")
    sources = adapter_sources(options.adapters)  # every file read and checked before the model loads
    model_spec = decide_model(options.model, sources)
    task = decide_task(options.task, sources)
    files = task_files(options.data, sources)
    ctx = _load(model_spec, task, sources, options)
    reading = _reading(ctx, sources)
    sets: dict[str, EvalSet] = {}
    for spec in dict.fromkeys([*files, *options.keep]):
        sets[spec] = load_eval_set(spec, reading)
    candidates = [s.name for s in sources]
    constituents = {s.name: [s.name] for s in sources}
    own_task = {s.name: f for s, f in zip(sources, files, strict=True)}
    if options.combine:
        _combine(ctx, candidates, options)
        candidates.append(COMBINED)
        constituents[COMBINED] = [s.name for s in sources]
    general = _general_setup(ctx, options)
    report: dict[str, Any] = {"candidates": {}}
    for name in candidates:
        report["candidates"][name] = _candidate(ctx, name, constituents[name], own_task, sets, general, options)
    if options.combine:  # the combination next to each constituent alone, on that constituent's task
        for constituent, section in report["candidates"][COMBINED]["tasks"].items():
            section["constituent_alone"] = report["candidates"][constituent]["task"]["adapted"]
    shipped = COMBINED if options.combine else candidates[0]
    report = {
        **report["candidates"][shipped],
        "shipped": shipped,
        "model": model_spec, "task_kind": task, "chat_template": ctx.chat_template,
        "adapters": {s.name: str(s.folder) for s in sources},
        "combination": {"type": options.combine, "weights": options.weights} if options.combine else None,
        "candidates": report["candidates"],
        "cost": {"seconds": round(time.perf_counter() - started, 2), "forward_passes": ctx.passes,
                 "device": str(ctx.device)},
    }
    return report


def _load(model_spec: str, task: str, sources: list[AdapterSource], options: EvalOptions) -> Context:
    from lorakit.merge_export import head_labels, load_base_for
    from lorakit.train.chat import use_adapter_templates
    from lorakit.train.loop import autocast_for
    from lorakit.train.models import load_model, load_tokenizer, resolve_model_dir

    seed = sources[0].setting("seed") if sources[0].setting("seed") is not None else options.seed
    folder = resolve_model_dir(model_spec)
    torch.manual_seed(int(seed))  # the base's fresh head (classify) is drawn as in training
    if folder is None:
        base = load_model(model_spec, task, num_labels=head_labels(sources[0].file), seed=int(seed))
    else:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "classifier newly initialized": the adapter brings the trained head
        hf_logging.disable_progress_bar()
        try:
            base = load_base_for(folder, sources[0].file)
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
    quantize = sources[0].metadata.get("quantize", "none")
    if quantize not in (None, "none"):
        from lorakit.quantize import quantize_model

        base = quantize_model(base, quantize)
    tokenizer = load_tokenizer(model_spec)
    template = "from the adapter" if use_adapter_templates(tokenizer, [s.folder for s in sources]) else (
        "the tokenizer's" if getattr(tokenizer, "chat_template", None) else "lorakit's default")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = pad_id
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = base.to(device).eval()
    model: AdaptedModel | torch.nn.Module = base
    for source in sources:
        model = lorakit.load_adapter(model, source.file, name=source.name, activate=False,
                                     check_fingerprint=options.check_fingerprint)
    assert isinstance(model, AdaptedModel)
    architectures = getattr(model.model.config, "architectures", None) or []
    untrained = task == "classify" and head_labels(sources[0].file) is not None and not any(
        a.endswith("ForSequenceClassification") for a in architectures)
    return Context(model, tokenizer, task, device, pad_id, autocast_for(options.bf16, device), options,
                   untrained_head=untrained, chat_template=template if task == "causal-lm" else None)


def _reading(ctx: Context, sources: list[AdapterSource]) -> Reading:
    first = sources[0]
    max_length = B.token_limit(int(ctx.options.max_length or first.setting("max_length") or 512), ctx.tokenizer)
    return Reading(
        task=ctx.task, tokenizer=ctx.tokenizer, max_length=max_length,
        label_names=first.metadata.get("label_names"),
        text_column=ctx.options.text_column or first.setting("text_column"),
        label_column=ctx.options.label_column or first.setting("label_column"),
        seed=int(first.setting("seed") or 0), eval_split=float(first.setting("eval_split") or 0.1),
    )


def _combine(ctx: Context, names: list[str], options: EvalOptions) -> None:
    from lorakit.combine import Combination, combine_adapters

    weights = options.weights or [1.0 / len(names)] * len(names)
    if len(weights) != len(names):
        raise ConfigError(f"give one --weights value per adapter: {len(names)} adapters, {len(weights)} weights")
    options.weights = weights
    combine_adapters(ctx.model, names, weights, COMBINED,
                     Combination(options.combine, density=options.density, rank=options.rank, seed=options.seed))
    ctx.model.freeze_adapter(COMBINED)


def _pass(ctx: Context, name: str, data: EvalSet) -> Paired:
    ctx.passes += 2 * len(data)
    return paired_pass(ctx.model, name, data, batch_size=ctx.options.batch_size, pad_id=ctx.pad_id, device=ctx.device,
                       autocast=ctx.autocast, progress=not ctx.options.quiet, desc=f"{name} on {data.source}")


def _candidate(ctx: Context, name: str, constituents: list[str], own_task: dict[str, str],
               sets: dict[str, EvalSet], general: Any, options: EvalOptions) -> dict[str, Any]:
    """Every section of the report for one candidate."""
    tasks: dict[str, dict[str, Any]] = {}
    paired_by_set: dict[str, Paired] = {}
    for constituent in constituents:
        spec = own_task[constituent]
        paired_by_set[spec] = paired_by_set.get(spec) or _pass(ctx, name, sets[spec])
        tasks[constituent] = R.task_section(sets[spec], paired_by_set[spec], options.bootstrap, options.seed)
        if sets[spec].task == "causal-lm" and reference_format(sets[spec].references) == "json":
            tasks[constituent]["valid_json"] = _valid_json(ctx, name, sets[spec], paired_by_set[spec])
    own_spec = own_task[constituents[0]]
    keep_specs = options.keep or [own_spec]
    sections = []
    for spec in keep_specs:
        paired = paired_by_set.get(spec) or _pass(ctx, name, sets[spec])
        paired_by_set[spec] = paired
        sections.append(R.keep_section(sets[spec], paired, _listed_answers(ctx, name, sets[spec], paired)))
    keep = R.merge_keep_sections(sections)
    if not options.keep:
        keep["note"] = "no --keep given: the task file itself, so the flips are the examples the base got right"
    if ctx.untrained_head:
        keep["note"] = ("the base model has no trained classification head (the adapter brings one), so its "
                        "answers are chance and flips against them say little; general-text drift is the "
                        "forgetting figure for this adapter")
        keep["base_head_untrained"] = True
    first = sets[own_spec]
    batch = {k: v.to(ctx.device) for k, v in B.collate(first.encoded[:8], ctx.pad_id).items()}
    section: dict[str, Any] = {
        "task": tasks[constituents[0]], "tasks": tasks, "keep": keep,
        "general": _general(ctx, name, general), "parity": parity(ctx.model, name, batch),
        "plots": _plot_points(paired_by_set[keep_specs[0]]),
    }
    return {"warnings": warnings_for(name, first, paired_by_set[own_spec], section), **section}


def _valid_json(ctx: Context, name: str, data: EvalSet, paired: Paired) -> dict[str, Any]:
    """The share of greedy answers that parse as JSON, base and adapted, with paired intervals.
    An exact match's answer is the reference, so only the others are generated; the base's
    answers are the same for every candidate and generated once."""
    if data.source not in ctx.base_valid_json:
        ctx.base_valid_json[data.source] = _valid_answers(ctx, None, data, paired.base)
    valid = {"base": ctx.base_valid_json[data.source], "adapted": _valid_answers(ctx, name, data, paired.adapted)}
    return S.paired(S.mean_of(valid["base"]), S.mean_of(valid["adapted"]), len(data), ctx.options.bootstrap,
                    ctx.options.seed)


def _valid_answers(ctx: Context, adapter: str | None, data: EvalSet, outcomes) -> torch.Tensor:
    """1.0 per example whose greedy answer parses as JSON (an exact match is the reference itself)."""
    wrong = [i for i in range(len(data)) if not outcomes.correct[i]]
    texts = dict(zip(wrong, greedy_answers(ctx.model, adapter, data, wrong, ctx.tokenizer, device=ctx.device),
                     strict=True))
    ctx.passes += len(wrong)
    return torch.tensor([1.0 if i not in texts or valid_json(texts[i]) else 0.0 for i in range(len(data))])


def _listed_answers(ctx: Context, name: str, data: EvalSet, paired: Paired) -> dict[str, dict[int, str]]:
    """Greedy answers of both models for the examples a causal-lm keep section lists."""
    if data.task == "classify":
        return {}
    listed = R.listed_indices(paired)
    answers: dict[str, dict[int, str]] = {}
    for who, adapter, outcomes in (("base", None, paired.base), ("adapted", name, paired.adapted)):
        # an exact match's greedy answer is the reference itself: only the wrong ones are generated
        wrong = [i for i in listed if not outcomes.correct[i]]
        texts = greedy_answers(ctx.model, adapter, data, wrong, ctx.tokenizer, device=ctx.device)
        answers[who] = {i: data.references[i] for i in listed} | dict(zip(wrong, texts, strict=True))
    return answers


def _plot_points(paired: Paired) -> dict[str, list[Any]]:
    """What the HTML report draws: per-example probabilities and KL (rounded, to keep the JSON small)."""
    return {"base_prob": [round(v, 5) for v in paired.base.prob.tolist()],
            "adapted_prob": [round(v, 5) for v in paired.adapted.prob.tolist()],
            "kl": [round(v, 7) for v in paired.kl.tolist()],
            "base_correct": paired.base.correct.tolist(), "adapted_correct": paired.adapted.correct.tolist()}


# -- general text --------------------------------------------------------------------------
@dataclass
class General:
    passages: list[str]
    source: str
    before: Any  # lorakit.forgetting.GeneralMeasure of the bare base


def _general_setup(ctx: Context, options: EvalOptions) -> General | None:
    if options.general == "none":
        return None
    from lorakit.forgetting import measure_general
    from lorakit.general_text import read_passages, shipped_passages

    if options.general:
        passages, source = read_passages(options.general), options.general
    else:
        passages, source = shipped_passages(options.general_samples), "lorakit's general-text sample (Wikipedia)"
    if options.general and options.general_samples:
        passages = passages[:options.general_samples]
    ctx.passes += len(passages)
    with only(ctx.model, None):
        before = measure_general(ctx.model, ctx.tokenizer, passages, batch_size=ctx.options.batch_size,
                                 device=ctx.device, autocast=ctx.autocast, progress=not options.quiet)
    return General(passages, source, before)


def _general(ctx: Context, name: str, general: General | None) -> dict[str, Any] | None:
    if general is None:
        return None
    from lorakit.forgetting import compare_general, measure_general

    ctx.passes += len(general.passages)
    with only(ctx.model, name):
        after = measure_general(ctx.model, ctx.tokenizer, general.passages, batch_size=ctx.options.batch_size,
                                device=ctx.device, autocast=ctx.autocast, progress=not ctx.options.quiet)
    figures = compare_general(general.before, after)
    figures.setdefault("forgetting_nats", None)
    return {"source": general.source, "passages": len(general.passages), **figures}

