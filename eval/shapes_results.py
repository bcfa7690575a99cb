"""The shapes results table: baseline and every method on shapes-POPE (3 splits) and shapes-CHAIR.

``seeright eval shapes --out DIR [--seed S] [--images N]`` writes the benchmark for seed ``S`` under
``DIR/benchmark``, runs each configuration of :data:`CONFIGS` through the evaluation runner (resumable
JSONL per configuration, kept per seed and size), and writes ``DIR/results.json`` and ``DIR/results.md``.
The baseline's POPE accuracy comes with a 95% interval from a bootstrap over images (a scene's six
questions are not independent), so runs on different seeds can be compared against sampling noise.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eval import pope, report, runner, shapes

# (label, interventions): each method at the model's defaults, and a small sweep of its main parameter.
CONFIGS: tuple[tuple[str, dict[str, dict[str, Any]]], ...] = (
    ("baseline", {}),
    ("var", {"var": {}}),
    ("var tau=3", {"var": {"tau": 3.0}}),
    ("vhr", {"vhr": {}}),
    ("vhr alpha=1.5", {"vhr": {"alpha": 1.5}}),
    ("vhr alpha=4", {"vhr": {"alpha": 4.0}}),
    ("gift", {"gift": {}}),
    ("gift alpha=1", {"gift": {"alpha": 1.0}}),
    ("carve", {"carve": {}}),
    ("carve top_p=0.4", {"carve": {"top_p": 0.4}}),
)


def specs(bench: Path, batch_size: int) -> dict[str, runner.BenchmarkSpec]:
    """The POPE and CHAIR runs over a benchmark folder written by :func:`shapes.write_benchmark`."""
    return {
        "pope": runner.BenchmarkSpec(
            benchmark="pope", images=bench / "images", questions=bench / "pope", max_new_tokens=3, batch_size=batch_size
        ),
        "chair": runner.BenchmarkSpec(
            benchmark="chair", images=bench / "images", gt=bench / "chair" / "gt.json",
            synonyms=bench / "chair" / "synonyms.txt", chair_prompt=shapes.CAPTION_PROMPT, max_new_tokens=48,
            batch_size=batch_size,
        ),
    }


def bootstrap_halfwidth(records: list[dict[str, Any]], split: str, rounds: int = 1000, seed: int = 0) -> float:
    """Half the width of the 95% bootstrap interval of a split's accuracy (in points), resampling images."""
    by_image: dict[str, list[bool]] = {}
    for r in records:
        if r["split"] == split:
            by_image.setdefault(r["image"], []).append(pope.parse_official(r["text"]) == r["label"])
    groups = [(sum(v), len(v)) for v in by_image.values()]
    rng = random.Random(seed)
    accs = []
    for _ in range(rounds):
        sample = rng.choices(groups, k=len(groups))
        accs.append(100 * sum(c for c, _ in sample) / sum(n for _, n in sample))
    accs.sort()
    return (accs[int(0.975 * rounds) - 1] - accs[int(0.025 * rounds)]) / 2


def run(
    generator: runner.Generator,
    out: Path,
    seed: int = shapes.DEFAULT_SEED,
    n_images: int = 500,
    configs: tuple[tuple[str, dict[str, dict[str, Any]]], ...] = CONFIGS,
    batch_size: int = 32,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every configuration on both benchmarks; the results, also written to ``out``."""
    bench = out / "benchmark"
    counts = shapes.write_benchmark(bench, n_images, seed)
    results: dict[str, Any] = {"seed": seed, "images": n_images, "questions": counts, "methods": {}}
    runs = out / "runs" / f"seed{seed}-images{n_images}"  # resumed only by the same benchmark
    for label, interventions in configs:
        start = time.perf_counter()
        row: dict[str, Any] = {}
        for name, spec in specs(bench, batch_size).items():
            path = runs / label.replace(" ", "_").replace("=", "-") / f"{name}.jsonl"
            row[name] = runner.run_benchmark(spec, generator, path, interventions, progress=progress)
            if name == "pope":
                records = runner.read_done(path)
                row["pope"]["interval95"] = {s: round(bootstrap_halfwidth(records, s), 2) for s in pope.SPLITS}
        row["seconds"] = round(time.perf_counter() - start, 1)
        results["methods"][label] = row
        log(f"{label}: {row['seconds']} s")
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (out / "results.md").write_text(markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    """One row per configuration: POPE accuracy / F1 / yes-ratio per split, then CHAIR."""
    splits = ("random", "popular", "adversarial")
    header = ["method"]
    for split in splits:
        header += [f"{split} acc", f"{split} F1", f"{split} yes%"]
    header += list(report.CHAIR_COLUMNS)
    rows = []
    for label, row in results["methods"].items():
        cells = [label]
        for split in splits:
            m = row["pope"]["splits"][split]
            cells += [f"{m['accuracy']:.1f}", f"{m['f1']:.1f}", f"{m['yes_ratio']:.1f}"]
        cells += [f"{row['chair'][c]:.1f}" for c in report.CHAIR_COLUMNS]
        rows.append(cells)
    n = results["questions"]
    base = results["methods"].get("baseline")
    noise = ""
    if base is not None:
        widths = ", ".join(f"{s} ±{base['pope']['interval95'][s]:.1f}" for s in splits)
        noise = f"95% interval of baseline accuracy (bootstrap over images): {widths} points.\n"
    head = (
        f"shapes benchmark, seed {results['seed']}, {results['images']} images, "
        f"{n['random']} / {n['popular']} / {n['adversarial']} POPE questions.\n{noise}\n"
    )
    return head + report.markdown_table(header, rows)
