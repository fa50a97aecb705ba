"""``lorakit generate``: try an adapter on one prompt, as ``llama.cpp -p`` or ``ollama run`` try a model.

The answer must be the one ``lorakit serve`` gives for the same prompt, adapter and sampling
settings, or trying an adapter here would tell the user nothing about serving it. So there is no
generation code here: the command builds the server's own :class:`~lorakit.serve.engine.Engine`
around the base and the one adapter, and

- encodes a plain prompt with ``Engine.encode_prompt`` and a ``--chat`` prompt with
  ``Engine.render_chat`` (which is ``train.batches.chat_prompt_ids``, the function training
  tokenizes chat prompts with): the tokenization the server's completions and chat endpoints use;
- checks it with ``Engine.check_generation`` (after a context check worded for these flags);
- runs one :class:`~lorakit.serve.jobs.GenerationJob` through ``Engine.run_batch`` in this
  thread, the call the server's batcher makes in its worker thread; the job's events (text
  pieces, held back only while they could still become a stop string or an unfinished UTF-8
  character, then the finish) are written to stdout as they come.

Classifier adapters (a classification head saved with the adapter, or a classifier base) print
the predicted label and the probabilities instead, from one ``ClassificationJob``, as
``POST /v1/classify`` answers.

Only the answer goes to stdout, so it can be piped; notes go to stderr. ``--compare`` prints the
base's answer, then the adapter's, each under a ``=== … ===`` line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from lorakit.errors import ConfigError, LorakitError

ADAPTER = "adapter"  # the adapter's name inside the engine


@dataclass
class GenerateOptions:
    """What ``lorakit generate`` was asked: one prompt, at most one adapter, sampling settings."""

    prompt: str
    model: str | None = None
    adapter: str | None = None
    chat: bool = False
    system: str | None = None
    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    compare: bool = False
    check_fingerprint: bool = True

    def check(self) -> None:
        """Refuse flags that cannot work together before any model is loaded."""
        if self.max_tokens < 1:
            raise ConfigError("--max-tokens must be at least 1")
        if self.temperature < 0:
            raise ConfigError("--temperature must be 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise ConfigError("--top-p must be in (0, 1]")
        if any(not s for s in self.stop):
            raise ConfigError("--stop takes a non-empty string")
        if self.system is not None and not self.chat:
            raise ConfigError("--system adds a system message to a chat: use it with --chat")
        if self.compare and not self.adapter:
            raise ConfigError("--compare prints the base's answer and the adapter's: give --adapter")
        if not self.prompt:
            raise ConfigError("the prompt is empty; give the text to continue (or '-' to read it from stdin)")


def read_prompt(argument: str, stdin: TextIO | None = None) -> str:
    """The prompt argument, or stdin when it is ``-`` (one trailing line break removed: what
    ``echo`` and editors add is not part of the prompt)."""
    if argument != "-":
        return argument
    text = (stdin or sys.stdin).read()
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def generate(options: GenerateOptions, out: TextIO | None = None, notes: TextIO | None = None) -> None:
    """Answer ``options.prompt`` with the adapter (and the base first with ``compare``), streamed to ``out``."""
    out = out or sys.stdout
    notes = notes or sys.stderr
    options.check()
    engine = build(options)
    runs = [("base", _base_name())] if options.compare or not options.adapter else []
    if options.adapter:
        runs.append((f"adapter {options.adapter}", ADAPTER))
    if engine.task == "classify":
        _refuse_for_classifier(options, engine, [name for _, name in runs])
        inputs = _classifier_inputs(engine, options.prompt)
        for label, name in runs:
            if len(runs) > 1:
                _write(out, f"=== {label} ===\n")
            _classify(engine, name, inputs, out)
        return
    ids = engine.render_chat(_messages(options)) if options.chat else engine.encode_prompt(options.prompt)
    _check_length(engine, ids, options.max_tokens)
    engine.check_generation(ids, options.max_tokens)
    for label, name in runs:
        if len(runs) > 1:
            _write(out, f"=== {label} ===\n")
        _generate_one(engine, name, ids, options, out, notes)


def build(options: GenerateOptions):
    """The base (from --model or what the adapter records), its tokenizer and the adapter, in an Engine.

    The adapter file is read and checked before the base is loaded, so a missing or corrupt
    folder is refused at once. The task follows the adapter: a saved classification head makes a
    classifier, otherwise the base must be a causal LM (or a classifier itself). The engine is
    built here rather than by ``serve.loading.build_engine``, which serves every folder under a
    root and always checks fingerprints; the model, tokenizer and adapter are loaded by the same
    functions it uses.
    """
    from lorakit.io.adapter_files import adapter_folder, base_model_for, read_adapter

    file = folder = None
    if options.adapter:
        file = read_adapter(options.adapter)
        folder = adapter_folder(options.adapter)
        model = base_model_for(options.adapter, options.model)
    elif options.model:
        model = options.model
    else:
        raise ConfigError("give --model (the base to generate with), or --adapter to take the base it records")
    task, num_labels, label_names, base_classifies = _task(model, folder)
    return _engine(model, task, num_labels, label_names, base_classifies, file, folder, options)


def _task(model: str, folder: Path | None) -> tuple[str, int | None, list[str], bool]:
    """(task, label count, the adapter's label names, whether the base itself classifies)."""
    from lorakit.serve.engine import CAUSAL_SUFFIXES, adapter_heads
    from lorakit.train.models import random_config, resolve_model_dir

    heads, metadata = adapter_heads(folder) if folder is not None else ([], {})
    model_dir = resolve_model_dir(model)
    if model_dir is None:
        config = random_config(model)
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
    architectures = list(getattr(config, "architectures", None) or [])
    base_classifies = any(a.endswith("ForSequenceClassification") for a in architectures)
    if heads:
        names = metadata.get("label_names")
        labels = [str(n) for n in names] if isinstance(names, list) and len(names) == heads[0] else []
        return "classify", heads[0], labels, base_classifies and getattr(config, "num_labels", None) == heads[0]
    if base_classifies:
        return "classify", int(config.num_labels), [], True
    if any(a.endswith(CAUSAL_SUFFIXES) for a in architectures) or (
            model_dir is None and config.model_type in ("llama", "gpt2")):
        return "causal-lm", None, [], False
    described = ", ".join(architectures) or "no architectures in its config"
    raise ConfigError(f"model {model!r} is not a causal LM ({described})"
                      + (" and the adapter carries no classification head" if folder is not None else "")
                      + "; lorakit generate needs a causal LM, or a classifier adapter to label the prompt")


def _engine(model: str, task: str, num_labels: int | None, label_names: list[str], base_classifies: bool,
            file, folder: Path | None, options: GenerateOptions):
    from lorakit.io.adapter_files import load_adapter
    from lorakit.model import AdaptedModel
    from lorakit.serve.engine import Engine
    from lorakit.train.chat import use_adapter_templates
    from lorakit.train.models import load_model, load_tokenizer

    base = load_model(model, task, num_labels=num_labels, seed=_base_seed(options.adapter))
    adapted = AdaptedModel(base.eval())
    if file is not None:
        load_adapter(adapted, file, name=ADAPTER, activate=False, check_fingerprint=options.check_fingerprint)
    labels = {ADAPTER: label_names} if label_names else {}
    if base_classifies:
        id2label = getattr(base.config, "id2label", None) or {}
        labels[_base_name()] = [str(id2label.get(i, i)) for i in range(int(base.config.num_labels))]
    # The server's limits exist for many users sharing one machine; here only the model's own
    # context bounds a request, checked by _check_length with this command's words.
    tokenizer = load_tokenizer(model)
    if folder is not None:  # an adapter trained with --chat-template reads chats with it
        use_adapter_templates(tokenizer, [folder])
    return Engine(adapted, tokenizer, task=task, adapter_root=folder or Path.cwd(), model_spec=model,
                  max_prompt_tokens=10**9, max_tokens_limit=max(options.max_tokens, 1),
                  base_classifies=base_classifies, label_names=labels)


def _base_seed(adapter: str | None) -> int:
    """The seed a ``random:`` base's weights are drawn with: the training run's, when the adapter
    is a run folder (the weights it was trained on), else 0 as in every other command."""
    if adapter is None or not (Path(adapter) / "config.yaml").is_file():
        return 0
    import yaml

    seed = (yaml.safe_load((Path(adapter) / "config.yaml").read_text(encoding="utf-8")) or {}).get("seed")
    return int(seed) if isinstance(seed, int) else 0


def _base_name() -> str:
    from lorakit.mixed import BASE

    return BASE


def _messages(options: GenerateOptions) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": options.system}] if options.system is not None else []
    return [*messages, {"role": "user", "content": options.prompt}]


def _check_length(engine, ids: list[int], max_tokens: int) -> None:
    if not ids:
        raise ConfigError("the prompt encodes to no tokens; give some text to continue")
    context = engine.max_length
    if context and len(ids) + max_tokens > context:
        if len(ids) >= context:
            raise ConfigError(f"the prompt has {len(ids)} tokens, more than the model's context of {context} "
                              "tokens: shorten the prompt")
        raise ConfigError(f"the prompt has {len(ids)} tokens and --max-tokens is {max_tokens}: together more than "
                          f"the model's context of {context} tokens; lower --max-tokens to at most "
                          f"{context - len(ids)} or shorten the prompt")


def _generate_one(engine, name: str, ids: list[int], options: GenerateOptions, out: TextIO, notes: TextIO) -> None:
    """One generation through the engine's batch path, its text written as the engine hands it out."""
    from lorakit.serve.jobs import Delta, Failed, Finished, GenerationJob, SamplingParams

    params = SamplingParams(max_tokens=options.max_tokens, temperature=options.temperature, top_p=options.top_p,
                            stop=tuple(options.stop), seed=options.seed)
    finished: list[Finished] = []
    failed: list[Failed] = []

    def emit(event) -> None:
        if isinstance(event, Delta):
            _write(out, event.text)
        elif isinstance(event, Finished):
            finished.append(event)
        elif isinstance(event, Failed):
            failed.append(event)

    engine.run_batch([GenerationJob(name, ids, params, emit)])
    if failed:
        raise LorakitError(failed[0].message)
    _write(out, "\n")
    if finished and finished[0].reason == "length":
        print(f"(stopped after --max-tokens {options.max_tokens} tokens)", file=notes, flush=True)


def _refuse_for_classifier(options: GenerateOptions, engine, names: list[str]) -> None:
    if options.chat:
        raise ConfigError("--chat needs a causal LM; this is a classifier, which labels the prompt as plain text")
    if _base_name() in names and not engine.base_classifies:
        raise ConfigError("the base model has no trained classification head: the adapter carries the only one, so "
                          "there is no base answer to " + ("--compare with" if options.compare else "print"))


def _classifier_inputs(engine, prompt: str) -> list[list[int]]:
    from lorakit.serve.jobs import ServeError

    try:
        return engine.encode_inputs([prompt])
    except ServeError as exc:
        raise ConfigError(f"the prompt is too long for the model: {exc.message.replace('input 0', 'it')}") from exc


def _classify(engine, name: str, inputs: list[list[int]], out: TextIO) -> None:
    """The predicted label on one line, then every label's probability, most likely first."""
    from lorakit.serve.jobs import ClassificationJob, Classified, Failed

    events: list[Any] = []
    engine.run_batch([ClassificationJob(name, inputs, events.append)])
    answer = next((e for e in events if isinstance(e, Classified | Failed)), None)
    if not isinstance(answer, Classified):
        raise LorakitError(answer.message if isinstance(answer, Failed) else "the classifier gave no answer")
    result = answer.results[0]
    ranked = sorted(result["probabilities"].items(), key=lambda kv: -kv[1])
    _write(out, f"{result['label']}\n" + " ".join(f"p({label})={p:.4f}" for label, p in ranked) + "\n")


def _write(out: TextIO, text: str) -> None:
    out.write(text)
    out.flush()


__all__ = ["GenerateOptions", "build", "generate", "read_prompt"]
