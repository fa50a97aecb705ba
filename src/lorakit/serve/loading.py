"""Building a serving engine from folders: the base model, its tokenizer, every adapter under a root.

Decides the task from what is there: a causal LM is served for completions and chat unless the
adapters carry classification heads (or the base is a classifier), in which case it serves
``/v1/classify``; the adapters' label names come from their lorakit metadata.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import AdapterFileError, ConfigError, LorakitError
from lorakit.io.adapter_files import CONFIG_NAME, adapter_folder, load_adapter
from lorakit.model import AdaptedModel
from lorakit.serve.engine import CAUSAL_SUFFIXES, Engine, adapter_heads, check_name, log
from lorakit.serve.wording import quantised_base_note


def build_engine(model_spec: str, adapter_root: str | Path, *, max_prompt_tokens: int = 2048,
                 max_tokens_limit: int = 512, seed: int = 0) -> Engine:
    """Load the base (``default``, a folder or ``random:...``), its tokenizer, and every adapter
    folder under ``adapter_root`` (a subfolder holding adapter_config.json, or a ``lorakit train`` run folder
    holding one in ``adapter/``) under its folder name."""
    from lorakit.train.models import load_model, load_tokenizer, random_config, resolve_model_dir

    root = Path(adapter_root)
    if not root.is_dir():
        raise ConfigError(f"--adapters {adapter_root} is not a folder")
    # An adapter folder, or a `lorakit train` run folder (its adapter/ subfolder), under its own name.
    named = {p.name: adapter_folder(p) for p in sorted(root.iterdir()) if p.is_dir()}
    for name, folder in named.items():
        if not (folder / CONFIG_NAME).is_file():
            log.warning("skipping %s: no %s (neither an adapter folder nor a `lorakit train` run folder with one)",
                        root / name, CONFIG_NAME)
    named = {name: folder for name, folder in named.items() if (folder / CONFIG_NAME).is_file()}
    if not named:
        log.warning("no adapter under %s: serving the base model alone", root)
    for name in named:
        check_name(name, ConfigError)
    heads = {}
    for name, folder in named.items():
        try:
            heads[name] = adapter_heads(folder)
        except AdapterFileError as exc:
            raise ConfigError(f"adapter folder {folder} cannot be served: {exc}") from exc
    with_head = {n: h[0][0] for n, h in heads.items() if h[0]}
    folder_dir = resolve_model_dir(model_spec)
    if folder_dir is None:
        arch_config = random_config(model_spec)
    else:
        from transformers import AutoConfig

        arch_config = AutoConfig.from_pretrained(folder_dir)
    architectures = list(getattr(arch_config, "architectures", None) or [])
    causal = any(a.endswith(CAUSAL_SUFFIXES) for a in architectures) or (
        folder_dir is None and arch_config.model_type in ("llama", "gpt2"))
    base_classifies = any(a.endswith("ForSequenceClassification") for a in architectures)
    if with_head or not causal:
        task = "classify"
        sizes = sorted(set(with_head.values()))
        if len(sizes) > 1:
            raise ConfigError(f"the adapters' classification heads have different label counts {with_head}; serve "
                              "adapters of one label count per server")
        missing = sorted(set(heads) - set(with_head))
        if missing:
            raise ConfigError(f"adapters {missing} carry no classification head while {sorted(with_head)} do; a "
                              "classifier server needs a head in every adapter")
        if sizes:
            num_labels = sizes[0]
            base_classifies = base_classifies and getattr(arch_config, "num_labels", None) == num_labels
        elif base_classifies:
            num_labels = int(arch_config.num_labels)
        else:
            described = ", ".join(architectures) or "no architectures in its config"
            raise ConfigError(f"model {model_spec!r} is not a causal LM ({described}) and no adapter carries a "
                              "classification head; serve needs a causal LM or classifier adapters")
        model = load_model(model_spec, "classify", num_labels=num_labels, seed=seed)
    else:
        task = "causal-lm"
        base_classifies = False
        model = load_model(model_spec, "causal-lm", seed=seed)
    tokenizer = load_tokenizer(model_spec)
    adapted = AdaptedModel(model.eval())
    labels: dict[str, list[str]] = {}
    sources: dict[str, str] = {}
    for name, folder in named.items():
        try:
            load_adapter(adapted, folder, name=name, activate=False)
        except LorakitError as exc:
            raise ConfigError(f"adapter folder {folder} cannot be served: {exc}") from exc
        metadata_labels = heads[name][1].get("label_names")
        if isinstance(metadata_labels, list) and task == "classify" and len(metadata_labels) == model.config.num_labels:
            labels[name] = [str(n) for n in metadata_labels]
        sources[name] = str(folder.resolve())
        config = adapted.configs[name]
        log.info("adapter %r from %s: %s, rank %d, %d modules", name, folder, config.method, config.r,
                 len(adapted.layers_of(name)))
        note = quantised_base_note(name, heads[name][1])
        if note:
            log.warning(note)
    engine = Engine(adapted, tokenizer, task=task, adapter_root=root, model_spec=model_spec,
                    max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit,
                    base_classifies=base_classifies, label_names=labels)
    engine.sources.update(sources)
    log.info("serving %s (%s) with %d adapters: %s", model_spec, task, len(named), ", ".join(named))
    return engine
