"""One readable HTML page: metrics with deltas, a bar chart, the rubric, every answer side by side."""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

STYLE = """body{font-family:system-ui,'Hiragino Sans','Noto Sans CJK JP',sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.35em .6em;vertical-align:top}
th{background:#f3f3f3}.up{color:#0a7a2f}.down{color:#b00020}td.num{text-align:right}"""


def _chart(results: dict[str, Any]) -> str:
    """A grouped bar chart of every metric, as an inline PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = results["sides"]
    names = list(results["metrics"][sides[0]])
    if not names:
        return ""
    # Task metrics live in 0–1 (accuracy, F1, correlation) and text metrics in 0–100: one scale for the chart.
    scale = {n: 100 if all(abs(results["metrics"][s][n]) <= 1 for s in sides) else 1 for n in names}
    figure, axis = plt.subplots(figsize=(max(6, 1.1 * len(names)), 3.5))
    width = 0.8 / len(sides)
    for k, side in enumerate(sides):
        axis.bar([i + k * width for i in range(len(names))], [results["metrics"][side][n] * scale[n] for n in names],
                 width, label=side)
    labels = [f"{n} ×100" if scale[n] == 100 else n for n in names]
    axis.set_xticks([i + width * (len(sides) - 1) / 2 for i in range(len(names))], labels, rotation=30, ha="right")
    axis.legend()
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return f'<img alt="metrics" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _cell(value: float) -> str:
    return f'<td class="num">{value:.3f}</td>'


def _delta(value: float) -> str:
    kind = "up" if value > 0 else "down" if value < 0 else ""
    return f'<td class="num {kind}">{value:+.3f}</td>'


def render(results: dict[str, Any]) -> str:
    """The report as an HTML string."""
    sides = results["sides"]
    e = html.escape
    parts = [f"<!doctype html><html lang='ja'><meta charset='utf-8'><title>shitate eval</title><style>{STYLE}</style>",
             f"<h1>shitate eval: {' vs '.join(e(s) for s in sides)}</h1>", "<h2>Metrics</h2><table><tr><th>metric</th>"]
    parts += [f"<th>{e(s)}</th>" for s in sides] + (["<th>Δ</th>"] if len(sides) == 2 else []) + ["</tr>"]
    for name in results["metrics"][sides[0]]:
        values = [results["metrics"][s][name] for s in sides]
        parts.append(f"<tr><td>{e(name)}</td>" + "".join(_cell(v) for v in values)
                     + (_delta(values[1] - values[0]) if len(sides) == 2 else "") + "</tr>")
    parts.append("</table>" + _chart(results))
    if results["rubric"] and any(results["rubric"].values()):
        total = results["rubric_total"]
        parts.append("<h2>Rubric</h2><table><tr><th>check</th>" + "".join(f"<th>{e(s)}</th>" for s in sides) + "</tr>")
        for check in results["rubric"][sides[0]]:
            parts.append(f"<tr><td>{e(check)}</td>" + "".join(
                f'<td class="num">{results["rubric"][s][check]}/{total}</td>' for s in sides) + "</tr>")
        parts.append("</table>")
    for key, title in (("judge", "LLM-as-judge"), ("general", "General ability (追加検証): everyday prompts, judged pairwise")):
        if key in results:
            parts.append(_judge_section(title, results[key]))
    if results["answers"]:
        parts.append("<h2>Every answer</h2><table><tr><th>#</th><th>question</th>"
                     + "".join(f"<th>{e(s)}</th>" for s in sides) + "<th>reference</th></tr>")
        for i, question in enumerate(results["questions"]):
            parts.append(f"<tr><td>{i + 1}</td><td>{e(question)}</td>"
                         + "".join(f"<td>{e(results['answers'][s][i])}</td>" for s in sides)
                         + f"<td>{e(results['references'][i] or '')}</td></tr>")
        parts.append("</table>")
    return "".join(parts) + "</html>\n"


def _judge_section(title: str, judged: dict[str, Any]) -> str:
    e = html.escape
    def table(values: dict[str, Any]) -> str:
        return "".join(f"<tr><td>{e(str(k))}</td><td class='num'>{e(_fmt(v))}</td></tr>" for k, v in _flatten(values))

    rows, per_judge = table(judged["combined"]), table(judged["per_judge"])
    agreement = f"<p>agreement between judges: {judged['agreement']:.0%}</p>" if "agreement" in judged else ""
    return (f"<h2>{e(title)}</h2><p>mode: {e(judged['mode'])}; judges: {e(', '.join(judged['judges']))}</p>"
            f"<table><tr><th>combined</th><th></th></tr>{rows}</table>{agreement}"
            f"<details><summary>each judge</summary><table>{per_judge}</table></details>")


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in tree.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key} / ")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def write_report(path: Path, results: dict[str, Any]) -> None:
    """Write the report atomically."""
    partial = path.with_suffix(".partial")
    partial.write_text(render(results), encoding="utf-8")
    os.replace(partial, path)
