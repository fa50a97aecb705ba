"""What an evaluation reads: adapters (folders or run folders), the model they belong to, and the
task and keep files as examples paired with what can be shown of them.

A ``lorakit train`` run folder carries its own answers (model, task, data, seed, max length in
``config.yaml``), so ``lorakit eval --adapter runs/x`` needs no other flag; an explicit flag
always wins over what the run says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.io.adapter_files import CONFIG_NAME, AdapterFile, adapter_folder, read_adapter
from lorakit.train import batches as B
from lorakit.train.data import DataError, classification_data, held_out_rows, lm_examples, read_rows
from lorakit.train.models import loads_offline

DEFAULT_DATA = "default"  # the shipped drug reviews' test split


@dataclass
class AdapterSource:
    """One ``--adapter``: its files, read and checked, and the run it came from (if it did)."""

    name: str
    folder: Path
    file: AdapterFile
    run_config: dict[str, Any] | None

    @property
    def metadata(self) -> dict[str, Any]:
        return self.file.lorakit or {}

    def setting(self, key: str) -> Any:
        return (self.run_config or {}).get(key)


def adapter_sources(paths: list[str]) -> list[AdapterSource]:
    """Read every adapter (refusing a bad one before any model work), named after its folder."""
    import yaml

    sources = []
    taken: set[str] = set()
    for path in paths:
        given = Path(path)
        folder = adapter_folder(given)
        file = read_adapter(folder)
        run_config = None
        if folder != given and (given / "config.yaml").is_file():
            run_config = yaml.safe_load((given / "config.yaml").read_text(encoding="utf-8")) or {}
        name = _free_name(_clean(given.resolve().name if folder != given else folder.resolve().name), taken)
        taken.add(name)
        sources.append(AdapterSource(name, folder, file, run_config))
    return sources


def _clean(name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name).strip("_")
    return cleaned or "adapter"


def _free_name(name: str, taken: set[str]) -> str:
    if name in ("base", "combined"):
        name = f"{name}_adapter"
    candidate, k = name, 2
    while candidate in taken:
        candidate, k = f"{name}_{k}", k + 1
    return candidate


def decide_model(given: str | None, sources: list[AdapterSource]) -> str:
    if given:
        return given
    for source in sources:
        if source.setting("model"):
            return str(source.setting("model"))
    import json

    for source in sources:
        base = json.loads((source.folder / CONFIG_NAME).read_text(encoding="utf-8")).get("base_model_name_or_path")
        if base and loads_offline(base):
            return str(base)
    raise ConfigError("give --model: the adapters do not say which base they were trained on (pass a run folder, "
                      "or the model folder / 'default')")


def decide_task(given: str | None, sources: list[AdapterSource]) -> str:
    if given:
        return given
    for source in sources:
        task = source.setting("task") or source.metadata.get("task")
        if task:
            return str(task)
    from lorakit.merge_export import head_labels

    return "classify" if any(head_labels(s.file) for s in sources) else "causal-lm"


def task_files(given: list[str], sources: list[AdapterSource]) -> list[str]:
    """One task file per adapter: ``--data`` once for all, once per adapter, or each run's own."""
    if len(given) == 1:
        return given * len(sources)
    if given:
        if len(given) != len(sources):
            raise ConfigError(f"give --data once (shared) or once per --adapter: {len(sources)} adapters, "
                              f"{len(given)} --data")
        return list(given)
    files = []
    for source in sources:
        chosen = source.setting("eval_data") or source.setting("data")
        if not chosen:
            raise ConfigError(f"adapter {source.name!r} is not a run folder, so its task data is unknown: give --data "
                              "(a CSV/TSV/JSONL file, or 'default' for the shipped drug reviews)")
        if not source.setting("eval_data") and chosen != DEFAULT_DATA:
            chosen = f"{chosen}#heldout"  # the run's own held-out split of its training file
        files.append(str(chosen))
    return files


@dataclass
class EvalSet:
    """Examples of one file, encoded, with what a report shows of each."""

    source: str
    task: str
    encoded: list[B.Encoded]
    texts: list[str]  # classify: the text; causal-lm: the prompt
    references: list[str]  # classify: the true label's name; causal-lm: the reference answer
    label_names: list[str] | None = None
    dropped: int = 0  # causal-lm examples whose prompt alone fills max_length
    prompts: list[list[int]] = field(default_factory=list)  # causal-lm: prompt token ids (for generation)

    def __len__(self) -> int:
        return len(self.encoded)


@dataclass(frozen=True)
class Reading:
    """How files are read: the settings a run used, or the eval command's flags."""

    task: str
    tokenizer: Any
    max_length: int
    label_names: list[str] | None
    text_column: str | None = None
    label_column: str | None = None
    seed: int = 0
    eval_split: float = 0.1


def load_eval_set(spec: str, reading: Reading) -> EvalSet:
    if reading.task == "classify":
        return _classify_set(spec, reading)
    return _lm_set(spec, reading)


def _rows(spec: str, reading: Reading) -> tuple[list[dict[str, Any]], str]:
    """Rows of a file, or of a run's held-out split (``FILE#heldout``, as the run drew it)."""
    if spec.endswith("#heldout"):
        return held_out_rows(spec[: -len("#heldout")], reading.seed, reading.eval_split)
    return read_rows(spec), spec


def _classify_set(spec: str, reading: Reading) -> EvalSet:
    if spec == DEFAULT_DATA:
        from lorakit.embedded import load_drug_reviews

        names = reading.label_names or ["negative", "positive"]
        _, test = load_drug_reviews()
        texts, labels, source = [e.text for e in test], [e.label for e in test], "drug reviews (test split)"
    else:
        rows, source = _rows(spec, reading)
        data = classification_data(rows, source, reading.text_column, reading.label_column, reading.label_names)
        texts, labels, names = data.texts, data.labels, data.label_names
    encoded = [B.Encoded(B.encode_text(reading.tokenizer, t, reading.max_length), y)
               for t, y in zip(texts, labels, strict=True)]
    return EvalSet(source, "classify", encoded, texts, [names[y] for y in labels], names)


def _lm_set(spec: str, reading: Reading) -> EvalSet:
    if spec == DEFAULT_DATA:
        raise DataError("the embedded default data is a classification set; give --data for a causal-lm adapter")
    rows, source = _rows(spec, reading)
    examples = lm_examples(rows, source, reading.tokenizer, turns="last")  # exact match: the final answer
    kept = EvalSet(source, "causal-lm", [], [], [])
    for example in examples:
        try:
            (encoded,) = B.encode_lm([example], reading.tokenizer, reading.max_length, source)
        except DataError:
            kept.dropped += 1
            continue
        kept.encoded.append(encoded)
        kept.texts.append(example.prompt)
        kept.references.append(example.reference)
        kept.prompts.append([t for t, label in zip(encoded.input_ids, encoded.labels, strict=True)
                             if label == B.IGNORE])
    if not kept.encoded:
        raise DataError(f"{source}: no example has answer tokens within max_length={reading.max_length}")
    return kept

