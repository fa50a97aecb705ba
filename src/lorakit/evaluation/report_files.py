"""Writing an evaluation report: ``report.json`` for machines, ``report.md`` for reviews and pull
requests, ``report.html`` (one self-contained file, plots inlined) for people, ``report.png`` (the plots of the
candidate that ships), and the one-screen
summary printed at the end. Files are written atomically: a report is never half there.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from lorakit.io.atomic import write_atomically, write_text_atomically

ROWS_SHOWN = 25  # listed examples per table in the Markdown and HTML files (report.json has all)


def write_report(report: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / "report.json", json.dumps(report, indent=2, default=_plain) + "\n")
    write_text_atomically(out / "report.md", markdown(report))
    write_text_atomically(out / "report.html", html_page(report))
    image = _plots_png(report["shipped"], report["candidates"][report["shipped"]])
    if image:  # the shipped candidate's plots as a file too, for pull requests and READMEs
        write_atomically(out / "report.png", lambda tmp: Path(tmp).write_bytes(base64.b64decode(image)))
    return out


def _plain(value: Any) -> Any:
    return float(value) if hasattr(value, "__float__") else str(value)


# -- numbers in words ----------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _ci(pair: list[float] | None, pct: bool) -> str:
    if not pair:
        return ""
    f = _pct if pct else _num
    return f"[{f(pair[0])}, {f(pair[1])}]"


def task_line(task: dict[str, Any]) -> str:
    pct = task["metric_name"] in ("accuracy", "exact_match")
    f = _pct if pct else _num
    sign = "+" if task["difference"] >= 0 else ""
    diff = f"{sign}{100 * task['difference']:.1f} pts" if pct else f"{sign}{task['difference']:.4g}"
    return (f"{task['metric_name']} {f(task['base'])} → {f(task['adapted'])} ({diff}, 95% CI of the change "
            f"{_ci(task['difference_ci'], pct)}) on {task['examples']} examples of {task['source']}")


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The one-screen summary: per candidate, what it learned, broke, forgot, and whether it merges."""
    lines = [f"lorakit eval: {report['model']} ({report['task_kind']}); ships: {report['shipped']}"]
    for name, c in report["candidates"].items():
        lines.append(f"[{name}]")
        lines += [f"  warning: {w}" for w in c.get("warnings", [])]
        for constituent, task in c["tasks"].items():
            label = "task" if constituent == name else f"task of {constituent}"
            alone = task.get("constituent_alone")
            extra = f" | {constituent} alone: {_pct(alone)}" if alone is not None else ""
            lines.append(f"  {label}: {task_line(task)}{extra}")
            if "token_loss" in task:
                t = task["token_loss"]
                lines.append(f"    per-token loss {_num(t['base'])} → {_num(t['adapted'])} nats")
            if "valid_json" in task:
                v = task["valid_json"]
                lines.append(f"    valid JSON {_pct(v['base'])} → {_pct(v['adapted'])} of the greedy answers "
                             f"(95% CI of the change {_ci(v['difference_ci'], True)})")
        k = c["keep"]
        lines.append(f"  keep ({k['source']}): {k['flips_right_to_wrong']} right→wrong, {k['flips_wrong_to_right']} "
                     f"wrong→right of {k['examples']} (base right on {k['base_correct']}); mean KL(base‖adapted) "
                     f"{_num(k['mean_kl'])} per {k['kl_unit']}")
        if k.get("base_head_untrained"):
            lines.append(f"    note: {k['note']}")
        g = c.get("general")
        if g:
            if g.get("forgetting_nats") is not None:
                lines.append(f"  general text ({g['passages']} passages): forgetting {g['forgetting_nats']:+.4f} nats "
                             f"({_num(g.get('nats_before'))} → {_num(g.get('nats_after'))})")
            if g.get("embedding_cosine") is not None:
                lines.append(f"  general text ({g['passages']} passages): pooled-embedding cosine to the base "
                             f"{g['embedding_cosine']:.4f} (drift {g['embedding_drift']:.2e})")
        p = c["parity"]
        note = " (quantised base: merged = dequantised + update)" if p.get("quantized_base") else ""
        if p["max_logit_diff"] is None:
            lines.append(f"  merged vs unmerged: {p['note']}")
        else:
            lines.append(f"  merged vs unmerged: max logit difference {p['max_logit_diff']:.3g} in {p['dtype']}{note}")
    cost = report["cost"]
    lines.append(f"cost: {cost['seconds']:.1f} s, {cost['forward_passes']} example forward passes on {cost['device']}")
    return lines


# -- Markdown ------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    out = [f"# Adapter evaluation: {report['shipped']}", "", "```", *summary_lines(report), "```", ""]
    for name, c in report["candidates"].items():
        out += [f"## {name}", "", "| task | metric | base | adapted | change (95% CI) |", "|---|---|---|---|---|"]
        for constituent, t in c["tasks"].items():
            pct = t["metric_name"] in ("accuracy", "exact_match")
            f = _pct if pct else _num
            change = f"{100 * t['difference']:+.1f} pts" if pct else f"{t['difference']:+.4g}"
            out.append(f"| {constituent}: {t['source']} | {t['metric_name']} | {f(t['base'])} | {f(t['adapted'])} | "
                       f"{change} {_ci(t['difference_ci'], pct)} |")
            if "valid_json" in t:
                v = t["valid_json"]
                out.append(f"| | valid JSON | {_pct(v['base'])} | {_pct(v['adapted'])} | "
                           f"{100 * v['difference']:+.1f} pts {_ci(v['difference_ci'], True)} |")
        k = c["keep"]
        out += ["", f"Keep set {k['source']}: **{k['flips_right_to_wrong']} right→wrong**, "
                f"{k['flips_wrong_to_right']} wrong→right, mean KL {_num(k['mean_kl'])} per {k['kl_unit']}.", ""]
        for title, key in (("Right → wrong", "right_to_wrong"), ("Wrong → right", "wrong_to_right"),
                           ("Moved most (largest KL)", "moved_most")):
            rows = k[key]
            if not rows:
                continue
            out += [f"### {title} ({len(rows)})", "",
                    "| # | text | reference | base answer | base p(ref) | adapted answer | adapted p(ref) | KL |",
                    "|---|---|---|---|---|---|---|---|"]
            for r in rows[:ROWS_SHOWN]:
                out.append(f"| {r['index']} | {_cell(r['text'])} | {_cell(r['reference'])} | "
                           f"{_cell(r['base_answer'])} | {r['base_prob']:.3f} | {_cell(r['adapted_answer'])} | "
                           f"{r['adapted_prob']:.3f} | {r['kl']:.3g} |")
            if len(rows) > ROWS_SHOWN:
                out.append(f"\n({len(rows) - ROWS_SHOWN} more in report.json)")
            out.append("")
    return "\n".join(out) + "\n"


def _cell(value: Any) -> str:
    text = "–" if value is None else str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:120] + "…"


# -- HTML ------------------------------------------------------------------------------------------
def html_page(report: dict[str, Any]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>lorakit eval: {html.escape(report['shipped'])}</title>",
        "<style>body{font:14px/1.4 system-ui,sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
        "th{background:#f4f4f4}pre{background:#f8f8f8;padding:1em;overflow:auto}.broke{background:#fde8e8}"
        ".fixed{background:#e8f6e8}img{max-width:100%}</style></head><body>",
        f"<h1>Adapter evaluation: {html.escape(report['shipped'])}</h1>",
        f"<pre>{html.escape(chr(10).join(summary_lines(report)))}</pre>",
    ]
    for name, c in report["candidates"].items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        image = _plots_png(name, c)
        if image:
            parts.append(f"<img alt='per-example probability shift and KL of {html.escape(name)}' "
                         f"src='data:image/png;base64,{image}'>")
        keep = c["keep"]
        for title, key, css in (("Right → wrong", "right_to_wrong", "broke"), ("Wrong → right", "wrong_to_right",
                                "fixed"), ("Moved most (largest KL)", "moved_most", "")):
            rows = keep[key]
            if not rows:
                continue
            parts.append(f"<h3>{title} ({len(rows)})</h3><table><tr><th>#</th><th>text</th><th>reference</th>"
                         "<th>base answer</th><th>base p(ref)</th><th>adapted answer</th><th>adapted p(ref)</th>"
                         "<th>KL</th></tr>")
            for r in rows[:ROWS_SHOWN]:
                cells = [str(r["index"]), r["text"], r["reference"], r["base_answer"], f"{r['base_prob']:.3f}",
                         r["adapted_answer"], f"{r['adapted_prob']:.3f}", f"{r['kl']:.3g}"]
                parts.append(f"<tr class='{css}'>" + "".join(f"<td>{html.escape('–' if v is None else str(v))}</td>"
                                                             for v in cells) + "</tr>")
            parts.append("</table>")
            if len(rows) > ROWS_SHOWN:
                parts.append(f"<p>{len(rows) - ROWS_SHOWN} more in report.json</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _plots_png(name: str, candidate: dict[str, Any]) -> str | None:
    """Three panels: base vs adapted probability of the reference, its shift, the KL histogram."""
    points = candidate.get("plots")
    if not points or not points["base_prob"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, adapted, kl = points["base_prob"], points["adapted_prob"], points["kl"]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 3.8))
    right_b = points.get("base_correct") or [False] * len(base)
    right_a = points.get("adapted_correct") or [False] * len(base)
    colours = ["tab:red" if b and not a else "tab:green" if a and not b else "tab:grey"
               for b, a in zip(right_b, right_a, strict=True)]
    left.scatter(base, adapted, s=8, alpha=0.6, c=colours)
    left.plot([0, 1], [0, 1], color="grey", lw=0.8)
    left.set_xlabel("base: p(reference)")
    left.set_ylabel("adapted: p(reference)")
    left.set_title("per example (red: right→wrong, green: wrong→right)", fontsize=9)
    middle.hist([a - b for a, b in zip(adapted, base, strict=True)], bins=40, color="tab:purple")
    middle.set_xlabel("adapted − base p(reference)")
    middle.set_title("probability shift")
    right.hist(kl, bins=40, color="tab:orange")
    right.set_yscale("log")
    right.set_xlabel(f"KL(base ‖ adapted) per {candidate['keep']['kl_unit']}")
    right.set_title("KL histogram")
    fig.suptitle(f"{name} on {candidate['keep']['source']}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
