"""Reports comparing methods: a JSON file, a markdown table and a PNG bar plot."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

POPE_COLUMNS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
CHAIR_COLUMNS = ("CHAIR_S", "CHAIR_I", "Recall", "Len")


def pope_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for method, res in results.items():
        for split, m in sorted(res["splits"].items()):
            rows.append([method, split, *(f"{m[c]:.2f}" for c in POPE_COLUMNS)])
    return rows


def chair_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    return [[method, *(f"{m[c]:.2f}" for c in CHAIR_COLUMNS)] for method, m in results.items()]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def score_table(result: dict[str, Any]) -> str:
    """``seeright score pope|chair`` output as Markdown: POPE per split with its confusion counts, or CHAIR."""
    if result.get("benchmark") == "chair":
        m = result["metrics"]
        return markdown_table(["captions", *CHAIR_COLUMNS], [[str(m["n"]), *(f"{m[c]:.1f}" for c in CHAIR_COLUMNS)]])
    header = ["split", "n", "TP", "FP", "TN", "FN", "accuracy", "F1", "yes %"]
    rows = [[split, *(str(m[k]) for k in ("n", "TP", "FP", "TN", "FN")), f"{m['accuracy']:.2f}", f"{m['f1']:.2f}",
             f"{m['yes_ratio']:.1f}"] for split, m in result["splits"].items()]
    if len(rows) > 1:
        rows.append(["mean", "", "", "", "", "", f"{sum(m['accuracy'] for m in result['splits'].values()) / len(rows):.2f}",
                     f"{sum(m['f1'] for m in result['splits'].values()) / len(rows):.2f}", ""])
    return markdown_table(header, rows)


def write_report(out_dir: Path, benchmark: str, results: dict[str, dict[str, Any]]) -> None:
    """``metrics.json``, ``report.md`` and ``plot.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    if benchmark == "pope":
        header, rows, metric = ["method", "split", *POPE_COLUMNS], pope_rows(results), "f1"
        values = {m: res["mean"][metric] for m, res in results.items()}
    else:
        header, rows, metric = ["method", *CHAIR_COLUMNS], chair_rows(results), "CHAIR_I"
        values = {m: res[metric] for m, res in results.items()}
    (out_dir / "report.md").write_text(f"# {benchmark.upper()}\n\n" + markdown_table(header, rows))
    _plot(out_dir / "plot.png", values, f"{benchmark.upper()} {metric} by method")


def _plot(path: Path, values: dict[str, float], title: str) -> None:
    try:
        import matplotlib
    except ImportError:  # serving installs leave out the plots: pip install "seeright[eval]"
        log.warning("no plot %s: matplotlib is not installed (pip install 'seeright[eval]')", path)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(values)), 3))
    ax.bar(list(values), list(values.values()), color="#4c72b0")
    ax.set_title(title)
    for i, v in enumerate(values.values()):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
