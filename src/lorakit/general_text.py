"""General-text passages for forgetting measurements: the shipped sample or a user's file.

Forgetting is measured on text unrelated to the fine-tuning task, so a model that has narrowed
onto its task shows it. The shipped sample (``data/general_text.jsonl``, 300 Wikipedia lead
sections spread over 12 topics; see ``data/GENERAL_TEXT.md`` for source, selection and licence)
is the default; ``--general FILE`` replaces it with the user's own domain text.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

from lorakit.errors import GeneralTextError

SHIPPED = "general_text.jsonl"


def shipped_passages(limit: int | None = None) -> list[str]:
    """The shipped passages in their fixed order; ``limit`` takes the first N.

    The order interleaves the topics, so any prefix is spread across them as evenly as it can be.
    """
    if limit is not None and limit < 0:
        raise GeneralTextError(f"limit must be 0 or more, got {limit}")
    passages = _shipped()
    return list(passages if limit is None else passages[:limit])


@lru_cache(maxsize=1)
def _shipped() -> tuple[str, ...]:
    resource = resources.files("lorakit") / "data" / SHIPPED
    if not resource.is_file():
        raise GeneralTextError(f"the shipped general-text sample lorakit/data/{SHIPPED} is missing; "
                               "reinstall lorakit")
    with resources.as_file(resource) as path:
        return tuple(_read_jsonl(path))


def read_passages(path: str | Path) -> list[str]:
    """Passages of a ``.txt`` file (separated by blank lines) or a ``.jsonl`` file (a ``text`` field per line)."""
    path = Path(path)
    if not path.is_file():
        raise GeneralTextError(f"general-text file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        passages = _read_jsonl(path)
    elif suffix == ".txt":
        passages = _read_txt(path)
    else:
        raise GeneralTextError(f"general-text file {path}: expected .txt (passages separated by blank lines) "
                               f"or .jsonl (one {{\"text\": ...}} per line), got {suffix or 'no extension'}")
    if not passages:
        raise GeneralTextError(f"general-text file {path} holds no passages")
    return passages


def _read_txt(path: Path) -> list[str]:
    passages, current = [], []
    for line in _text(path).splitlines():
        if line.strip():
            current.append(line.strip())
        elif current:
            passages.append(" ".join(current))
            current = []
    if current:
        passages.append(" ".join(current))
    return passages


def _read_jsonl(path: Path) -> list[str]:
    passages = []
    for number, line in enumerate(_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GeneralTextError(f"{path}:{number}: malformed JSON ({e.msg})") from None
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise GeneralTextError(f"{path}:{number}: expected an object with a string field \"text\"")
        if text.strip():
            passages.append(text)
    return passages


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GeneralTextError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


__all__ = ["GeneralTextError", "read_passages", "shipped_passages"]
