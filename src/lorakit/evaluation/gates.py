"""``--fail-if``: thresholds on report figures, so CI can stop an adapter before it ships.

A condition names a figure by its dotted path in ``report.json`` (``keep.flips_right_to_wrong``,
``candidates.combined.general.forgetting_nats``) and compares it with a number. A path that does
not exist, or does not hold a number, is an error that lists the paths that do: a typo must not
pass a gate silently.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

from lorakit.errors import ConfigError

OPERATORS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt,
             "<": operator.lt}
_CONDITION = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(>=|<=|==|!=|>|<)\s*([-+0-9.eE]+|inf|-inf)\s*$")


@dataclass(frozen=True)
class Condition:
    path: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.path}{self.op}{self.threshold:g}"


def parse_conditions(text: str) -> list[Condition]:
    """``"keep.flips_right_to_wrong>5,general.forgetting_nats>0.1"`` → conditions."""
    conditions = []
    for part in (p for p in text.split(",") if p.strip()):
        match = _CONDITION.match(part)
        if match is None:
            raise ConfigError(f"--fail-if: cannot read {part.strip()!r}; write PATH OP NUMBER with OP one of "
                              f"{' '.join(OPERATORS)}, e.g. keep.flips_right_to_wrong>5")
        conditions.append(Condition(match.group(1), match.group(2), float(match.group(3))))
    if not conditions:
        raise ConfigError("--fail-if is empty")
    return conditions


def numeric_paths(report: dict[str, Any], prefix: str = "") -> list[str]:
    """Every dotted path in ``report`` that holds a number (what a condition can name)."""
    found = []
    for key, value in report.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            found.extend(numeric_paths(value, path + "."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            found.append(path)
    return found


def lookup(report: dict[str, Any], path: str) -> float:
    value: Any = report
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            value = None
            break
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, int | float):
        import difflib

        known = numeric_paths(report)
        near = difflib.get_close_matches(path, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        state = "holds no number" if value is None or isinstance(value, dict | list | str | bool) else "is not a number"
        raise ConfigError(f"--fail-if: {path} {state} in this report{hint} Figures a condition can name: "
                          f"{', '.join(known[:40])}{' ...' if len(known) > 40 else ''}")
    return float(value)


def crossed(report: dict[str, Any], conditions: list[Condition]) -> list[tuple[Condition, float]]:
    """The conditions that hold (each a reason to fail), with the value found."""
    out = []
    for condition in conditions:
        value = lookup(report, condition.path)
        if OPERATORS[condition.op](value, condition.threshold):
            out.append((condition, value))
    return out
