"""Everything a run needs before its first step: data, tokenizer, model, adapter, optimizer.

All validation happens here, before anything is written to the output folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import lorakit
from lorakit.methods import METHODS
from lorakit.targets import CLASSIFIER_HEADS
from lorakit.train import batches as B
from lorakit.train.chat import read_template
from lorakit.train.config import TrainConfig
from lorakit.train.data import (
    MIX_NAME,
    ClassifyData,
    DataError,
    classification_data,
    held_out_split,
    lm_examples,
    mix_rows,
    parse_mix,
    read_rows,
)
from lorakit.train.models import load_model, load_tokenizer


@dataclass
class Prepared:
    train: list[B.Encoded]
    eval: list[B.Encoded]
    label_names: list[str] | None
    tokenizer: Any
    model: nn.Module  # the AdaptedModel, or the plain model for full / head baselines
    adapted: lorakit.AdaptedModel | None
    pad_id: int
    fit: dict[str, B.Fit]  # how the training and evaluation examples fit --max-length
    length: B.LengthChoice  # the --max-length used, given or chosen from the data
    sources: list[dict[str, Any]] | None = None  # a data mix: how many rows each source gave (summary.json)


def prepare(config: TrainConfig, shapes_only: bool = False) -> Prepared:
    """Data, tokenizer and the adapted model of a run. ``shapes_only``: the base is built on the
    meta device (a sharded run's rank > 0, filled from rank 0 after sharding)."""
    tokenizer = load_tokenizer(config.model)
    fit = {"train": B.Fit(), "eval": B.Fit()}
    sources: list[dict[str, Any]] = []
    train, evaluation, label_names, length = _data(config, tokenizer, fit, sources)
    model = load_model(config.model, config.task, num_labels=len(label_names or []) or None, seed=config.seed,
                       shapes_only=shapes_only)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id
    if config.quantize != "none":
        from lorakit.quantize import quantize_model

        model = quantize_model(model, config.quantize, shapes_only=shapes_only)
    if config.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    adapted = None
    if config.method in ("full", "head"):
        _baseline_trainable(model, config)
    else:
        loss_fn = _gradient_loss(config, train, pad_id) if config.init == "gradient-svd" else None
        adapted = lorakit.adapt(model, adapter_config(config, model), gradient_loss=loss_fn)
        model = adapted
    return Prepared(train, evaluation, label_names, tokenizer, model, adapted, pad_id, fit, length, sources or None)


def adapter_config(config: TrainConfig, model: nn.Module) -> lorakit.AdapterConfig:
    method = "lora" if config.method == "delta-lora" else config.method
    heads = [name for name in CLASSIFIER_HEADS if _has_module(model, name)] if config.task == "classify" else []
    targets = config.target_modules()
    if config.targets == TrainConfig.targets:  # the default lists several architectures' names: keep this one's
        targets = tuple(t for t in targets if _has_module(model, t)) or targets
    return lorakit.AdapterConfig(
        method=method, r=config.rank, alpha=config.alpha, dropout=0.0 if config.method == "delta-lora" else
        config.dropout, use_rslora=config.rslora, init=config.init, target_modules=targets,
        exclude_modules=config.excluded_modules(), layers_to_transform=config.layer_indices(),
        layers_pattern=config.layers_pattern or None, rank_pattern=config.rank_patterns(),
        alpha_pattern=config.alpha_patterns(),
        modules_to_save=tuple(heads), options=config.options() if method in METHODS else None,
    )


def _has_module(model: nn.Module, leaf: str) -> bool:
    return any(name.split(".")[-1] == leaf for name, _ in model.named_modules())


def _baseline_trainable(model: nn.Module, config: TrainConfig) -> None:
    """full: every weight trains; head: only the classification head does."""
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return
    if config.task != "classify":
        raise lorakit.ConfigError("--method head trains a classification head; it needs --task classify")
    for name, p in model.named_parameters():
        p.requires_grad_(any(part in CLASSIFIER_HEADS for part in name.split(".")))


def _data(config: TrainConfig, tokenizer, fit: dict[str, B.Fit], sources: list[dict[str, Any]]
          ) -> tuple[list[B.Encoded], list[B.Encoded], list[str] | None, B.LengthChoice]:
    """Encoded training and evaluation examples, cut at --max-length (or a length chosen from the
    training examples when it is not given), and what was cut or dropped; a data mix's per-source
    counts are appended to ``sources``."""
    if config.task == "classify":
        train_data, eval_data = _classification(config, sources)
        train_full = B.encode_classification_uncut(train_data, tokenizer)
        eval_full = B.encode_classification_uncut(eval_data, tokenizer)
        length = B.choose_length([len(e.input_ids) for e in train_full], config.max_length, tokenizer)
        return (B.fit_classification(train_full, train_data, tokenizer, length.tokens, fit["train"]),
                B.fit_classification(eval_full, eval_data, tokenizer, length.tokens, fit["eval"]),
                train_data.label_names, length)
    if config.data == "default":
        raise DataError("the embedded default data is a classification set; give --data for --task causal-lm")
    if config.chat_template:
        tokenizer.chat_template = read_template(config.chat_template)
    train_rows, eval_rows, name = _rows(config, sources)
    source = config.eval_data or name
    train_full = B.encode_lm_uncut(lm_examples(train_rows, name, tokenizer, config.chat_turns), tokenizer)
    eval_full = B.encode_lm_uncut(lm_examples(eval_rows, source, tokenizer, config.chat_turns), tokenizer)
    length = B.choose_length([len(e.input_ids) for e in train_full], config.max_length, tokenizer)
    train = B.fit_lm(train_full, length.tokens, name, fit["train"])
    evaluation = B.fit_lm(eval_full, length.tokens, source, fit["eval"])
    for part, counted in fit.items():
        if counted.dropped > config.max_drop * counted.examples:
            share = 100 * counted.dropped / counted.examples
            raise DataError(
                f"{counted.dropped} of {counted.examples} {part} examples ({share:.0f}%) "
                f"have prompts of {length.tokens} tokens or more, leaving no room for the answer, so they would be "
                "dropped; raise --max-length, shorten the prompts, or allow it with --max-drop "
                f"(now {config.max_drop})")
    return train, evaluation, None, length


def _classification(config: TrainConfig, sources: list[dict[str, Any]]) -> tuple[ClassifyData, ClassifyData]:
    if config.data == "default":
        from lorakit.embedded import load_drug_reviews

        names = ["negative", "positive"]
        train_ex, test_ex = load_drug_reviews()
        train = ClassifyData([e.text for e in train_ex], [e.label for e in train_ex], names)
        if config.eval_data is None:
            return train, ClassifyData([e.text for e in test_ex], [e.label for e in test_ex], names)
        rows = read_rows(config.eval_data)
        return train, classification_data(rows, config.eval_data, config.text_column, config.label_column, names)
    rows, eval_rows, name = _rows(config, sources)
    train = classification_data(rows, name, config.text_column, config.label_column)
    source = config.eval_data or f"{name} (held-out split)"
    return train, classification_data(eval_rows, source, config.text_column, config.label_column, train.label_names)


def _rows(config: TrainConfig, sources: list[dict[str, Any]]) -> tuple[list[dict], list[dict], str]:
    """(training rows, evaluation rows, the training data's name in messages). A data mix
    (``a.jsonl:0.7,b.jsonl:0.3``) is checked whole before any file is read, then drawn
    (:func:`lorakit.train.data.mix_rows`) and its per-source counts appended to ``sources``."""
    mix = parse_mix(config.data)
    eval_rows = read_rows(config.eval_data) if config.eval_data else None
    if mix is None:
        rows = read_rows(config.data)
        if eval_rows is None:
            rows, eval_rows = _split(rows, config)
        return rows, eval_rows, config.data
    mixed = mix_rows(mix, config.seed, None if eval_rows is not None else config.eval_split)
    sources.extend(mixed.sources)
    return mixed.train, mixed.held_out if eval_rows is None else eval_rows, MIX_NAME


def _split(rows: list[dict], config: TrainConfig) -> tuple[list[dict], list[dict]]:
    """A fixed-seed held-out share of the training file."""
    return held_out_split(rows, config.seed, config.eval_split, config.data)


def _gradient_loss(config: TrainConfig, train: list[B.Encoded], pad_id: int) -> Callable[[nn.Module], torch.Tensor]:
    """gradient-SVD's domain gradient: the mean loss of the first ``init_batches`` training batches."""
    from lorakit.train.loop import batch_loss

    def loss_fn(model: nn.Module) -> torch.Tensor:
        total = None
        count = 0
        for step in range(config.init_batches):
            items = [train[i] for i in B.step_indices(len(train), config.batch_size, config.seed, step)]
            loss_sum, units = batch_loss(model, B.collate(items, pad_id))
            total = loss_sum if total is None else total + loss_sum
            count += units
        return total / max(count, 1)

    return loss_fn
