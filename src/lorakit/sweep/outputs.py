"""What a sweep writes: leaderboard.md and .csv, pareto.png, best.yaml, and one line per trial.

Everything is rebuilt from the study's trials (their user attributes hold each run's figures),
so whichever worker finishes a trial refreshes the files, and a killed sweep leaves them current.

The Pareto front: with several objectives, the trials no other trial beats on every objective;
with one, the same on (metric, trainable parameters), which is what pareto.png shows. The best
trial is the completed trial with the best metric (fewer trainable parameters break a tie), and
always lies on the front.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from lorakit.io.atomic import write_atomically, write_text_atomically
from lorakit.sweep.spec import SweepSpec
from lorakit.sweep.study import optuna

LEADERBOARD = "leaderboard"
BEST = "best.yaml"
PARETO = "pareto.png"
ORDER = {"complete": 0, "pruned": 1, "failed": 2, "running": 3, "waiting": 4}


def _state(trial) -> str:
    return {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
            "WAITING": "waiting"}[trial.state.name]


def shown(trials: list) -> list:
    """Every trial but the surplus asks dropped unrun."""
    return [t for t in trials if not t.user_attrs.get("surplus")]


def metric_of(trial) -> float | None:
    """A completed trial's metric (summary.json's metric_after); a pruned one's last evaluation."""
    result = trial.user_attrs.get("result") or {}
    if "metric" in result:
        return result["metric"]
    if _state(trial) == "pruned" and trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return None


def better(a: float, b: float, direction: str) -> bool:
    return a > b if direction == "maximize" else a < b


def best_trial(spec: SweepSpec, trials: list):
    """The completed trial with the best metric (ties: fewer trainable parameters, then the earlier)."""
    done = [t for t in shown(trials) if _state(t) == "complete" and metric_of(t) is not None]
    if not done:
        return None
    sign = -1 if spec.directions()[spec.objectives.index("metric")] == "maximize" else 1
    return min(done, key=lambda t: (sign * metric_of(t), t.user_attrs["result"]["trainable_params"], t.number))


def front(spec: SweepSpec, trials: list) -> list[int]:
    """The numbers of the Pareto-front trials (see the module's docstring)."""
    done = [t for t in shown(trials) if _state(t) == "complete"]
    if len(spec.objectives) > 1:
        points = {t.number: list(t.values) for t in done}
        directions = spec.directions()
    else:
        points = {t.number: [metric_of(t), t.user_attrs["result"]["trainable_params"]] for t in done}
        directions = [spec.directions()[0], "minimize"]
    signed = {n: [v if d == "minimize" else -v for v, d in zip(p, directions, strict=True)] for n, p in points.items()}

    def dominated(n: int) -> bool:
        mine = signed[n]
        return any(all(o <= m for o, m in zip(other, mine, strict=True)) and other != mine
                   for k, other in signed.items() if k != n)

    return sorted(n for n in signed if not dominated(n))


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def settings_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{name}={_value(value)}" for name, value in params.items())


def rows(spec: SweepSpec, trials: list) -> list[dict[str, Any]]:
    """One row per trial: number, state, its settings, its figures, a note, its run folder."""
    trials = shown(trials)
    rerun_as = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
    on_front = set(front(spec, trials))
    table = []
    for t in sorted(trials, key=lambda t: t.number):
        result = t.user_attrs.get("result") or {}
        row: dict[str, Any] = {"number": t.number, "state": _state(t)}
        row.update({name: t.params.get(name, "") for name in spec.space.names})
        row[spec.metric_name] = metric_of(t)
        if "forgetting" in spec.objectives or result.get("forgetting") is not None:
            row["forgetting"] = result.get("forgetting")
        row.update(trainable_params=result.get("trainable_params"), adapter_bytes=result.get("adapter_bytes"),
                   seconds=result.get("seconds"), pareto=t.number in on_front, note=_note(t, rerun_as),
                   folder=t.user_attrs.get("folder", ""))
        table.append(row)
    return table


def _note(trial, rerun_as: dict[int, int]) -> str:
    notes = []
    if "retry_of" in trial.user_attrs:
        notes.append(f"re-run of trial {trial.user_attrs['retry_of']}")
    if trial.user_attrs.get("error"):
        notes.append(trial.user_attrs["error"].splitlines()[0])
    if (trial.user_attrs.get("result") or {}).get("pruned"):
        notes.append(trial.user_attrs["result"]["pruned"])
    if _state(trial) == "failed" and not trial.user_attrs.get("error"):
        how = "interrupted" if trial.user_attrs.get("interrupted") else "its worker died"
        notes.append(f"{how}; re-run as trial {rerun_as[trial.number]}" if trial.number in rerun_as else how)
    return "; ".join(notes)


def write_tables(study, spec: SweepSpec, out: Path, trials: list | None = None) -> None:
    """leaderboard.csv (by trial number), leaderboard.md (best first) and best.yaml."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    table = rows(spec, trials)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    if table:
        writer = csv.DictWriter(buffer, fieldnames=list(table[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in table)
    write_text_atomically(out / f"{LEADERBOARD}.csv", buffer.getvalue())
    write_text_atomically(out / f"{LEADERBOARD}.md", _markdown(spec, trials, table, out))
    best = best_trial(spec, trials)
    if best is not None:
        write_text_atomically(out / BEST, best_yaml(spec, best, out))


def _markdown(spec: SweepSpec, trials: list, table: list[dict[str, Any]], out: Path) -> str:
    sign = -1 if spec.directions()[spec.objectives.index("metric")] == "maximize" else 1
    ordered = sorted(table, key=lambda r: (ORDER[r["state"]], sign * (r[spec.metric_name] or 0), r["number"]))
    best = best_trial(spec, trials)
    lines = [f"# Sweep leaderboard: {len(table)} trials, objectives {', '.join(spec.objectives)}", ""]
    if best is not None:
        lines += [f"Best: trial {best.number}, {spec.metric_name} {metric_of(best):.4f} "
                  f"({settings_text(best.params)}), run folder `{best.user_attrs.get('folder', '')}`. "
                  f"Reproduce it: `lorakit train --config {out / BEST}`.", ""]
    columns = [c for c in (table[0] if table else {}) if c != "folder"]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in ordered:
        cells = []
        for column in columns:
            value = row[column]
            if column == "pareto":
                value = "★" if value else ""
            elif column in ("trainable_params", "adapter_bytes") and isinstance(value, int):
                value = f"{value:,d}"
            cells.append("" if value is None else _value(value).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def best_yaml(spec: SweepSpec, trial, out: Path) -> str:
    """The best trial's full TrainConfig, its out moved to DIR/best: `lorakit train --config`
    reruns it exactly (same seed, data, threads and settings)."""
    import yaml

    config = dict(trial.user_attrs["config"])
    config.update(out=str(out / "best"), quiet=False, resume=False)
    head = (f"# lorakit sweep: the best trial, {trial.number} ({spec.metric_name} {metric_of(trial):.6g}), "
            f"trained in {trial.user_attrs.get('folder', '')}\n"
            f"# reproduce it: lorakit train --config {out / BEST}\n")
    return head + yaml.safe_dump(config, sort_keys=False)


def progress_line(spec: SweepSpec, trials: list, number: int) -> str:
    """One line for a finished trial: its number, settings, figures, and the best so far."""
    trial = next(t for t in trials if t.number == number)
    result = trial.user_attrs.get("result") or {}
    state = _state(trial)
    seconds = f" in {result['seconds']:.1f} s" if result.get("seconds") is not None else ""
    line = f"trial {number} {state}{seconds}: {settings_text(trial.params) or '(no settings)'}"
    if state == "failed":
        return f"{line} | {_note(trial, {}) or 'failed'}"
    figures = [f"{spec.metric_name} {metric_of(trial):.4f}"] if metric_of(trial) is not None else []
    if result.get("forgetting") is not None and "forgetting" in spec.objectives:
        figures.append(f"forgetting {result['forgetting']:.4g}")
    if result.get("trainable_params") is not None:
        figures.append(f"{result['trainable_params']:,d} params")
    if state == "pruned":
        figures.append(result.get("pruned", "pruned"))
    line += " | " + ", ".join(figures)
    best = best_trial(spec, trials)
    if best is not None:
        line += f" | best: trial {best.number}, {spec.metric_name} {metric_of(best):.4f}"
    if len(spec.objectives) > 1:
        line += f" | front: trials {', '.join(map(str, front(spec, trials))) or 'none yet'}"
    return line


def plot(spec: SweepSpec, trials: list, out: Path) -> None:
    """pareto.png: each completed trial's metric against its trainable parameters, the front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in shown(trials) if _state(t) == "complete"]
    on_front = set(front(spec, trials))
    best = best_trial(spec, trials)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in done:
        x, y = t.user_attrs["result"]["trainable_params"], metric_of(t)
        ax.scatter([x], [y], color="tab:red" if t.number in on_front else "tab:grey", zorder=3,
                   s=60 if t.number in on_front else 25)
        ax.annotate(str(t.number), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if len(spec.objectives) == 1 and on_front:
        line = sorted((t.user_attrs["result"]["trainable_params"], metric_of(t)) for t in done if t.number in on_front)
        ax.step(*zip(*line, strict=True), where="post", color="tab:red", lw=1, alpha=0.6, label="Pareto front")
    if best is not None:
        ax.scatter([best.user_attrs["result"]["trainable_params"]], [metric_of(best)], marker="*", s=220,
                   color="gold", edgecolors="black", zorder=4, label=f"best: trial {best.number}")
    xs = [t.user_attrs["result"]["trainable_params"] for t in done]
    if xs and max(xs) > 10 * max(min(xs), 1):
        ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(spec.metric_name)
    title = "front (red): no trial is better on " + ("every objective" if len(spec.objectives) > 1 else
                                                      f"{spec.metric_name} and size")
    ax.set_title(title, fontsize=10)
    if best is not None:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    write_atomically(out / PARETO, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def final_lines(spec: SweepSpec, trials: list, out: Path, seconds: float) -> list[str]:
    """What `lorakit sweep` prints at the end."""
    table = shown(trials)
    count = {state: sum(_state(t) == state for t in table) for state in ORDER}
    retried = {t.user_attrs["retry_of"] for t in table if "retry_of" in t.user_attrs}
    failed = sum(1 for t in table if _state(t) == "failed" and t.number not in retried)
    lines = [f"sweep: {count['complete']} completed, {count['pruned']} pruned, {failed} failed "
             f"of {spec.trials} trials in {seconds:.1f} s"]
    best = best_trial(spec, trials)
    if best is not None:
        result = best.user_attrs["result"]
        lines.append(f"best: trial {best.number} | {spec.metric_name} {metric_of(best):.4f} | "
                     f"{result['trainable_params']:,d} params | {settings_text(best.params)} | "
                     f"{best.user_attrs.get('folder', '')}")
        lines.append(f"reproduce: lorakit train --config {out / BEST}")
    else:
        lines.append("no trial completed: see the notes in the leaderboard and each trial's train.log")
    if len(spec.objectives) > 1:
        lines.append(f"Pareto front ({', '.join(spec.objectives)}): trials {', '.join(map(str, front(spec, trials)))}")
    lines.append(f"leaderboard: {out / LEADERBOARD}.md (and .csv), {out / PARETO}")
    return lines


def finish(study, spec: SweepSpec, out: Path, seconds: float) -> list[str]:
    """Write every output once more (with the plot) and return the closing lines."""
    optuna()
    trials = study.get_trials(deepcopy=False)
    write_tables(study, spec, out, trials)
    plot(spec, trials, out)
    return final_lines(spec, trials, out, seconds)
