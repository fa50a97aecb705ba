"""Answers in a format every reference shares (JSON): does the model's own answer keep it?

Exact match says whether the model would give the reference answer; someone shipping a JSON
formatter also needs to know how often its answer parses at all, right or wrong, because a
wrong value breaks one record and invalid JSON breaks the program reading it. When every
reference of a causal-LM task is a JSON object or array, the report adds the share of greedy
answers that parse, before and after, with the same paired intervals as the other figures.
"""

from __future__ import annotations

import json
from typing import Any


def reference_format(references: list[str]) -> str | None:
    """"json" when every reference is a JSON object or array, else None."""
    if references and all(_json_container(r) for r in references):
        return "json"
    return None


def valid_json(text: str) -> bool:
    return _json_container(text)


def _json_container(text: str) -> bool:
    try:
        value: Any = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return False
    return isinstance(value, dict | list)
