"""Reading training data: CSV/TSV/JSONL rows → classification or causal-LM examples.

Every problem is reported before training starts, with the file and line it came from: a
missing column (and the columns that exist), an empty file, a malformed JSONL line, a label in
the evaluation data that training never saw.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.train import chat
from lorakit.train.chat import Piece

TEXT_COLUMNS = ("text", "sentence", "review", "content", "document")
LABEL_COLUMNS = ("label", "labels", "rating", "sentiment", "class")


class DataError(LorakitError, ValueError):
    """Training or evaluation data that cannot be used as given."""


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------
def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .csv, .tsv or .jsonl/.json file as dicts (JSONL: one object per line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".json" and _starts_with_array(path):
        rows = _read_json_array(path)
    elif suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path)
    elif suffix in (".csv", ".tsv"):
        rows = _read_delimited(path, "\t" if suffix == ".tsv" else ",")
    else:
        raise DataError(f"{path}: unknown data format {suffix!r}; use .csv, .tsv or .jsonl")
    if not rows:
        raise DataError(f"{path} holds no examples")
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = _parse_json(line, path, number)
            rows.append(_json_object(row, f"{path}:{number}: each line", number))
    return rows


def _parse_json(text: str, path: Path, line: int | None = None) -> Any:
    """JSON, or a DataError at the file's line (``line``, else the parser's) and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{line or exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from exc


def _json_object(row: Any, what: str, where: int | str) -> dict[str, Any]:
    """A row that must be a JSON object, marked with where it came from for later errors."""
    if not isinstance(row, dict):
        raise DataError(f"{what} must be a JSON object, got {type(row).__name__}")
    return {**row, "_line": where}


def _starts_with_array(path: Path) -> bool:
    with path.open(encoding="utf-8") as f:
        head = f.read(4096).lstrip("\ufeff \t\r\n")
    return head.startswith("[")


def _read_json_array(path: Path) -> list[dict[str, Any]]:
    """A .json file holding one array of objects (a common export), read whole; rows know their index."""
    data = _parse_json(path.read_text(encoding="utf-8"), path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected an array of objects, or JSON Lines (one object per line)")
    return [_json_object(row, f"{path}: item {n} of the array", f"item {n}") for n, row in enumerate(data, start=1)]


def _read_delimited(path: Path, delimiter: str) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        rows = []
        for row in reader:
            row = {k: v for k, v in row.items() if k is not None}
            row["_line"] = reader.line_num
            rows.append(row)
    return rows


def pick_column(rows: list[dict[str, Any]], wanted: str | None, candidates: Sequence[str], what: str,
                source: str) -> str:
    """The named column, or the first of ``candidates`` present; a clear error otherwise."""
    columns = [c for c in rows[0] if c != "_line"]
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{source}: no {what} column {wanted!r}; columns are: {', '.join(columns)}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    shape = lm_shape(columns)
    if shape:
        raise DataError(f"{source}: these are {shape} examples (columns: {', '.join(columns)}), which train a "
                        "language model; pass --task causal-lm")
    raise DataError(
        f"{source}: cannot tell which column holds the {what}; columns are: {', '.join(columns)}. "
        f"Name it with --{what}-column."
    )


def held_out_split(rows: list[dict[str, Any]], seed: int, share: float, source: str
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, held out): a fixed-seed share of a file kept for evaluation. `lorakit train` holds
    it out when given no --eval-data, and `lorakit eval` draws the same rows again from the seed."""
    import math

    import torch

    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, math.floor(len(rows) * share))
    if len(rows) - n_eval < 1:
        raise DataError(f"{source}: too few examples ({len(rows)}) to hold out an evaluation split")
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# ---------------------------------------------------------------------------------------------
# data mixes: --data a.jsonl:0.7,b.jsonl:0.3
# ---------------------------------------------------------------------------------------------
MIX_NAME = "mix"  # how messages name a mix's rows: "mix:b.jsonl:3" is line 3 of b.jsonl
_WEIGHTED = re.compile(r"^(?P<path>.+):(?P<weight>[^:/\\]+)$")


@dataclass(frozen=True)
class MixSource:
    path: str
    weight: float  # this source's share of the mix (the weights of a mix sum to 1)


def parse_mix(spec: str) -> list[MixSource] | None:
    """The sources of ``--data a.jsonl:0.7,b.jsonl:0.3`` with their weights normalised to sum to 1,
    or None when ``spec`` names one file. Every problem (a source without a weight, a weight that
    is not a positive number, a missing file) is reported here, before any work."""
    parts = [part.strip() for part in spec.split(",")]
    matched = [_WEIGHTED.match(part) for part in parts]
    if not any(m and _looks_numeric(m["weight"]) for m in matched):
        return None  # a plain file name (which may hold a comma or a colon)
    unweighted = [part for part, m in zip(parts, matched, strict=True) if not m]
    if unweighted:
        raise DataError(f"--data {spec}: every source of a mix needs a weight (path:weight), "
                        f"{', '.join(repr(p) for p in unweighted)} has none")
    sources = []
    for m in matched:
        path, text = m["path"].strip(), m["weight"].strip()
        try:
            weight = float(text)
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise DataError(f"--data {spec}: the weight of {path} must be a positive number, got {text!r}")
        sources.append((path, weight))
    paths = [path for path, _ in sources]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise DataError(f"--data {spec}: {', '.join(twice)} appears more than once; give each source once, "
                        "with its whole weight")
    if "default" in paths:
        raise DataError(f"--data {spec}: the shipped 'default' data cannot be part of a mix; mix files")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"--data {spec}: {', '.join(missing)} does not exist" if len(missing) == 1 else
                        f"--data {spec}: {', '.join(missing)} do not exist")
    total = sum(weight for _, weight in sources)
    return [MixSource(path, weight / total) for path, weight in sources]


def _looks_numeric(text: str) -> bool:
    return bool(re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*|\s*[-+]?(nan|inf)\s*", text, re.I))


@dataclass
class MixedRows:
    """A mix's training rows and, unless the run has --eval-data, its held-out rows."""

    train: list[dict[str, Any]]
    held_out: list[dict[str, Any]]
    sources: list[dict[str, Any]] = field(default_factory=list)  # summary.json → data → sources


def mix_rows(sources: list[MixSource], seed: int, eval_split: float | None) -> MixedRows:
    """Draw a mix's training rows, reproducibly for ``seed``.

    Each source is first split as a single file would be (``eval_split`` of it held out, by
    :func:`held_out_split`) unless ``eval_split`` is None (the run has --eval-data). The mix then
    has as many rows as the sources' training rows together; each source gives its weight's share
    of them (rounded so the counts add up), drawn without replacement, in shuffled whole passes
    when its share is larger than the source: no row repeats before every row of its source is used.
    The held-out rows of every source are kept as they are, unweighted."""
    read = []
    for source in sources:
        rows = [{**row, "_line": f"{source.path}:{row['_line']}"} for row in read_rows(source.path)]
        if eval_split is None:
            read.append((rows, []))
        else:
            read.append(held_out_split(rows, seed, eval_split, source.path))
    total = sum(len(train) for train, _ in read)
    counts = _shares(total, [s.weight for s in sources])
    rng = random.Random(f"lorakit data mix {seed}")
    train: list[dict[str, Any]] = []
    report = []
    for source, (rows, held), count in zip(sources, read, counts, strict=True):
        train += _draw(rows, count, rng)
        report.append({"path": source.path, "weight": round(source.weight, 6), "rows": len(rows),
                       "drawn": count, "held_out": len(held)})
    rng.shuffle(train)
    return MixedRows(train, [row for _, held in read for row in held], report)


def _shares(total: int, weights: list[float]) -> list[int]:
    """``total`` split by ``weights`` into whole counts that add up to it (largest remainders first)."""
    exact = [total * w for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _draw(rows: list[dict[str, Any]], count: int, rng: random.Random) -> list[dict[str, Any]]:
    drawn: list[dict[str, Any]] = []
    while len(drawn) < count:
        order = list(range(len(rows)))
        rng.shuffle(order)
        drawn += [rows[i] for i in order[: count - len(drawn)]]
    return drawn


def held_out_rows(spec: str, seed: int, share: float) -> tuple[list[dict[str, Any]], str]:
    """The rows a run held out of its --data (a file or a mix) when it had no --eval-data, as it
    drew them, and their name for messages: what `lorakit eval` evaluates a run on by default."""
    mix = parse_mix(spec)
    if mix is None:
        _, held = held_out_split(read_rows(spec), seed, share, spec)
        return held, f"{spec} (the run's held-out split)"
    return mix_rows(mix, seed, share).held_out, f"{MIX_NAME} (the run's held-out splits of {spec})"


def lm_shape(columns: Sequence[str]) -> str | None:
    """The causal-LM example shape a set of columns has (chat, Alpaca, prompt/completion), or None."""
    present = set(columns)
    if "messages" in present:
        return "chat ('messages')"
    if {"instruction", "output"} <= present:
        return "Alpaca ('instruction'/'output')"
    if {"prompt", "completion"} <= present:
        return "prompt/completion"
    return None


# ---------------------------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassifyData:
    texts: list[str]
    labels: list[int]
    label_names: list[str]


def classification_data(
    rows: list[dict[str, Any]], source: str, text_column: str | None, label_column: str | None,
    label_names: list[str] | None = None,
) -> ClassifyData:
    """Texts and integer labels; ``label_names`` (from training) fixes the mapping for eval data."""
    text_col = pick_column(rows, text_column, TEXT_COLUMNS, "text", source)
    label_col = pick_column(rows, label_column, LABEL_COLUMNS, "label", source)
    texts, raw = [], []
    for row in rows:
        text, label = row.get(text_col), row.get(label_col)
        if text is None or label is None or str(label).strip() == "":
            raise DataError(f"{source}:{row['_line']}: missing {text_col!r} or {label_col!r}")
        texts.append(str(text))
        raw.append(str(label).strip())
    if label_names is None:
        label_names = sorted(set(raw), key=_label_sort_key)
        if len(label_names) < 2:
            raise DataError(f"{source}: a classifier needs at least two labels, found {label_names}")
    index = {name: i for i, name in enumerate(label_names)}
    unseen = sorted(set(raw) - set(index))
    if unseen:
        raise DataError(
            f"{source}: labels {unseen} never appear in the training data (training labels: {label_names})"
        )
    return ClassifyData(texts, [index[label] for label in raw], label_names)


def _label_sort_key(label: str) -> tuple[int, float | str]:
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


# ---------------------------------------------------------------------------------------------
# causal language modelling
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LMExample:
    """Text pieces in order: context carries no loss, answers do (one answer, or every assistant
    turn of a multi-turn chat)."""

    pieces: tuple[Piece, ...]
    # False for text a chat template rendered: the template writes every special token itself
    # (transformers tokenizes it so too), and the tokenizer must not add another BOS.
    special_tokens: bool = True
    # chat: the last assistant message as written (the completion also holds the template's
    # closing tokens); what an evaluation shows and compares answers with
    answer: str | None = None

    @classmethod
    def of(cls, prompt: str, completion: str) -> LMExample:
        return cls((Piece(prompt), Piece(completion, answer=True)))

    @property
    def prompt(self) -> str:
        """Everything before the last answer."""
        return "".join(p.text for p in self.pieces[:-1])

    @property
    def completion(self) -> str:
        """The last answer: what the model should say after :attr:`prompt`."""
        return self.pieces[-1].text

    @property
    def reference(self) -> str:
        """The last answer as a person wrote it (without a chat template's closing tokens)."""
        return self.answer if self.answer is not None else self.completion


def lm_examples(rows: list[dict[str, Any]], source: str, tokenizer: Any = None, turns: str = "all"
                ) -> list[LMExample]:
    """Recognise the common JSONL shapes: text; prompt/completion; Alpaca; chat messages (whose
    assistant turns all carry the loss, or only the last with ``turns="last"``)."""
    examples = []
    for row in rows:
        where = f"{source}:{row.get('_line', '?')}"
        if "messages" in row:
            examples.append(_chat_example(row["messages"], where, tokenizer, turns))
        elif "instruction" in row and "output" in row:
            examples.append(_alpaca_example(row))
        elif "prompt" in row and "completion" in row:
            examples.append(LMExample.of(str(row["prompt"]), str(row["completion"])))
        elif "text" in row:
            examples.append(LMExample.of("", str(row["text"])))
        else:
            keys = ", ".join(k for k in row if k != "_line")
            raise DataError(
                f"{where}: unrecognised example with keys {keys}; expected 'text', 'prompt'+'completion', "
                "'instruction'+'output' (Alpaca) or 'messages' (chat)"
            )
    return examples


def _alpaca_example(row: dict[str, Any]) -> LMExample:
    instruction, context = str(row["instruction"]), str(row.get("input") or "")
    prompt = f"### Instruction:\n{instruction}\n\n"
    if context:
        prompt += f"### Input:\n{context}\n\n"
    return LMExample.of(prompt + "### Response:\n", str(row["output"]))


def _chat_example(messages: Any, where: str, tokenizer: Any, turns: str) -> LMExample:
    """The conversation cut at its assistant turns, read as the server reads a chat (lorakit.train.chat)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: each message needs 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's answer to train on")
    try:
        pieces = chat.conversation_pieces(tokenizer, messages, turns)
    except chat.TemplateError as exc:
        raise DataError(f"{where}: {exc}") from exc
    # lorakit's default template is plain text: the tokenizer adds its special tokens as for any prompt
    return LMExample(tuple(pieces), special_tokens=not chat.has_template(tokenizer),
                     answer=str(messages[-1]["content"]))
