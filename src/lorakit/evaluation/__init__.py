"""``lorakit eval``: what an adapter learned, what it broke, what it forgot, and whether its merge
ships the same model: paired base/adapted passes, bootstrap intervals, flips, KL, general-text
forgetting and merge parity, written as report.json / report.md / report.html."""

from lorakit.evaluation.gates import crossed, parse_conditions
from lorakit.evaluation.report_files import summary_lines, write_report
from lorakit.evaluation.run import EvalOptions, evaluate

__all__ = ["EvalOptions", "crossed", "evaluate", "parse_conditions", "summary_lines", "write_report"]
