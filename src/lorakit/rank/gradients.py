"""Before training: dL/dW of every candidate module on a few batches of the user's data.

The data, tokenizer, model and loss are `lorakit train`'s own (``lorakit.train.setup.prepare``
with the same settings), and the gradient is exactly the one ``--init gradient-svd`` starts
from (``inits.base_weight_gradients`` of the mean loss over the first ``--batches`` training
batches): what the rank measurement sees is what training's first steps see. The candidates
are wrapped with a rank-1 adapter whose B is zero, so the forward is the base model's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.inits import base_weight_gradients
from lorakit.rank.spectra import Spectrum, matrix_spectrum
from lorakit.targets import plain_modules


@dataclass
class GradientOptions:
    model: str = "default"
    data: str = "default"
    task: str = "classify"
    targets: str = "all-linear"  # the candidate modules, in `lorakit train --targets` syntax
    batches: int = 4
    batch_size: int = 16
    max_length: int | None = None
    text_column: str | None = None
    label_column: str | None = None
    eval_data: str | None = None
    seed: int = 0
    keep: int = 64  # singular values kept of a matrix too large for a full SVD


@dataclass
class GradientSpectra:
    spectra: dict[str, Spectrum]  # module path → spectrum of dL/dW, in model order
    module_names: list[str]  # every module of the model (for target lists that match exactly what is meant)
    total_params: int  # the base model's parameters (what --budget-ratio is a share of)
    examples: int  # training examples the gradient was averaged over
    max_length: int  # tokens per example, as training would cut them
    settings: dict[str, Any] = field(default_factory=dict)  # the train settings that read the same data


def train_settings(options: GradientOptions) -> dict[str, Any]:
    """The `lorakit train` settings that name the same model and data (the suggestion's YAML starts from them)."""
    settings: dict[str, Any] = {"model": options.model, "data": options.data, "task": options.task}
    for key in ("eval_data", "text_column", "label_column", "max_length"):
        value = getattr(options, key)
        if value is not None:
            settings[key] = value
    return settings


def measure_gradients(options: GradientOptions) -> GradientSpectra:
    """The spectrum of dL/dW of every candidate module."""
    from lorakit.errors import ConfigError
    from lorakit.train import batches as B
    from lorakit.train.config import TrainConfig
    from lorakit.train.setup import _gradient_loss, prepare

    if options.batches < 1:
        raise ConfigError(f"--batches must be at least 1, got {options.batches}")
    config = TrainConfig(**train_settings(options), targets=options.targets, rank=1, init="default",
                         init_batches=options.batches, batch_size=options.batch_size, seed=options.seed,
                         general_samples=0, quiet=True)
    torch.manual_seed(options.seed)  # the classifier head is drawn as `lorakit train` draws it
    with _quiet_transformers():  # "classifier newly initialized" is expected: training draws it the same way
        prepared = prepare(config)
    adapted = prepared.adapted
    assert adapted is not None
    adapted.eval()  # no dropout: the gradient of the loss itself, not of one random mask
    layers = adapted.adapted_layers()
    gradients = base_weight_gradients(adapted, layers, _gradient_loss(config, prepared.train, prepared.pad_id))
    spectra = {path: matrix_spectrum(gradients.pop(path), options.keep) for path in list(layers)}
    used = {i for step in range(options.batches)
            for i in B.step_indices(len(prepared.train), config.batch_size, config.seed, step)}
    return GradientSpectra(spectra, list(plain_modules(adapted.model)), base_parameters(adapted), len(used),
                           prepared.length.tokens, train_settings(options))


def base_parameters(adapted) -> int:
    """Parameters of the base model alone: not the adapters, their shared state or trainable head copies."""
    own = {id(p) for layer in adapted.adapted_layers().values() for p in layer.adapters.parameters()}
    own |= {id(p) for saved in adapted.saved_modules().values() for p in saved.copies.parameters()}
    own |= {id(p) for p in adapted.shared.parameters()}
    return sum(p.numel() for p in adapted.model.parameters() if id(p) not in own)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
