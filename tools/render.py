"""Render the docs' result tables from records (:mod:`seeright.tools.records`), or check that they agree.

A page marks a table with two comments; everything between them is rendered, never typed::

    <!-- results: bench bench-random-llava -->
    ...
    <!-- /results -->

The first word names the record's kind, the rest its name; the newest such record is rendered with the formatter
its measurement command prints with, followed by the record's caption (command, commit, machine, date).
``seeright results render`` rewrites the pages; ``seeright results check`` lists every block that differs from
its records (the test suite runs it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from seeright.tools import records

BLOCK = re.compile(r"(^<!-- results: (?P<kind>[\w-]+) (?P<name>[^>]+?) -->\n)(?P<body>.*?)(^<!-- /results -->)", re.S | re.M)


def _bench(values: dict[str, Any]) -> str:
    from seeright.tools import bench

    return bench.table(values)


def _bench_vllm(values: dict[str, Any]) -> str:
    from seeright.tools import engine_bench

    return engine_bench.table(values)


def _bench_serving(values: dict[str, Any]) -> str:
    from seeright.tools import serving_bench

    return serving_bench.table(values)


def _eval_shapes(values: dict[str, Any]) -> str:
    from seeright.testbed import results

    return results.markdown(values)


def _lookback_lens(values: dict[str, Any]) -> str:
    from seeright.testbed import lookback_lens

    return lookback_lens.markdown(values)


def _agser(values: dict[str, Any]) -> str:
    from seeright.testbed import agser_eval

    return agser_eval.markdown(values)


def _vif_chain(values: dict[str, Any]) -> str:
    from seeright.testbed import vif_chain

    return vif_chain.markdown(values)


def _engine_agreement(values: dict[str, Any]) -> str:
    from seeright.testbed import engine_agreement

    return engine_agreement.markdown(values)


def _tune_defaults(values: dict[str, Any]) -> str:
    from seeright.testbed import tune_defaults

    return tune_defaults.markdown(values)


def _lmms_pope(values: list[dict[str, Any]]) -> str:
    from seeright.tools import lmms_pope

    return lmms_pope.markdown(values)


def _loadtest(values: dict[str, Any] | list[dict[str, Any]]) -> str:
    from seeright.tools import loadtest

    return loadtest.table(values if isinstance(values, list) else [values])


def _hostile(values: list[dict[str, Any]]) -> str:
    from seeright.tools import hostile

    return hostile.table(values)


def _score(values: dict[str, Any]) -> str:
    from seeright.eval import report

    return report.score_table(values)


def summary(root: Path | str = records.RESULTS_DIR) -> str:
    """The README's table: one line per headline figure, each from the newest record it names."""
    def get(kind: str, name: str) -> records.Record:
        return records.newest(kind, name, root)

    pope13 = get("score", "llava-v1.5-13b.jsonl").values["splits"]
    chair7 = get("score", "llava-v1.5-7b_coco_chair_long_ans.jsonl").values["metrics"]
    smol = get("eval-shapes", "seeright/shapes-smol seed 4242 500 scenes").values["methods"]["baseline"]
    pope = {split: smol["pope"]["splits"][split]["accuracy"] for split in ("random", "adversarial")}
    lookback = get("lookback-lens", "shapes-smol-lookback-lens").values
    bench = get("bench", "bench-random/llava").values["decode_ratio"]
    mean_f1 = sum(s["f1"] for s in pope13.values()) / len(pope13)
    rows = [
        ["POPE scorer, LLaVA-1.5-13B's released answers: mean F1", f"{mean_f1:.1f}", "85.9 published",
         "[Evaluation](docs/evaluation.md)"],
        ["CHAIR scorer, LLaVA-1.5-7B long captions: CHAIR_S / CHAIR_I", f"{chair7['CHAIR_S']:.1f} / {chair7['CHAIR_I']:.1f}",
         "46.2 / 12.9 published", "[Evaluation](docs/evaluation.md)"],
        ["`seeright/shapes-smol`, fresh seed: POPE random / adversarial accuracy",
         f"{pope['random']:.1f} / {pope['adversarial']:.1f}", "", "[Testbed](docs/testbed.md)"],
        ["Lookback Lens detector on shapes-smol: AUROC, fresh seed",
         f"{lookback['auroc']:.3f} ±{lookback['auroc_interval95']:.3f}", "", "[Testbed](docs/testbed.md)"],
        ["Per-token decode cost, VAR / VHR / GIFT / PAI / VCD (x plain)",
         " / ".join(f"{bench[m]:.2f}" for m in ("var", "vhr", "gift", "pai", "vcd") if m in bench), "",
         "[Performance](docs/performance.md)"],
    ]
    from seeright.eval import report

    return report.markdown_table(["what", "measured", "reference", "more"], rows)


FORMATTERS: dict[str, Callable[[Any], str]] = {
    "bench": _bench, "bench-vllm": _bench_vllm, "bench-serving": _bench_serving, "eval-shapes": _eval_shapes,
    "lookback-lens": _lookback_lens, "agser": _agser, "vif-chain": _vif_chain, "engine-agreement": _engine_agreement, "tune-defaults": _tune_defaults, "lmms-pope": _lmms_pope, "loadtest": _loadtest, "hostile": _hostile, "score": _score,
}


def block(kind: str, name: str, root: Path | str = records.RESULTS_DIR) -> str:
    """The rendered body of one block: the newest record's table and its caption (``summary``: the README's)."""
    if kind == "summary":
        return summary(root) + "\n<small>Each figure is the newest record of its kind under `results/`; "\
            "`seeright results render` writes this table.</small>\n"
    record = records.newest(kind, name, root)
    return f"{FORMATTERS[kind](record.values).rstrip()}\n\n<small>{record.caption()}</small>\n"


def render_page(text: str, root: Path | str = records.RESULTS_DIR) -> str:
    """``text`` with every results block rendered from its records."""
    return BLOCK.sub(lambda m: m.group(1) + block(m["kind"], m["name"].strip(), root) + m.group(5), text)


def pages(docs: Path | str) -> list[Path]:
    """The pages that hold results blocks: Markdown files under ``docs``, and the README beside that folder."""
    readme = Path(docs).resolve().parent / "README.md"
    found = [*Path(docs).rglob("*.md"), *([readme] if readme.is_file() else [])]
    return sorted(p for p in found if BLOCK.search(p.read_text()))


def render(docs: Path | str, root: Path | str = records.RESULTS_DIR) -> list[Path]:
    """Rewrite every page's results blocks; returns the pages that changed."""
    changed = []
    for page in pages(docs):
        old = page.read_text()
        new = render_page(old, root)
        if new != old:
            page.write_text(new)
            changed.append(page)
    return changed


def check(docs: Path | str, root: Path | str = records.RESULTS_DIR) -> list[str]:
    """Every results block whose text differs from what its records render, as ``page: kind name``."""
    stale = []
    for page in pages(docs):
        for m in BLOCK.finditer(page.read_text()):
            try:
                fresh = block(m["kind"], m["name"].strip(), root)
            except (FileNotFoundError, KeyError, TypeError) as exc:
                stale.append(f"{page}: {m['kind']} {m['name'].strip()} ({exc})")
                continue
            if fresh != m["body"]:
                stale.append(f"{page}: {m['kind']} {m['name'].strip()}")
    return stale
