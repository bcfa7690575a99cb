"""The shapes results table: baseline and every method on shapes-POPE (3 splits) and shapes-CHAIR.

``seeright eval shapes --out DIR [--seed S] [--images N]`` writes the benchmark for seed ``S`` under
``DIR/benchmark``, runs each row of :func:`configs` through the evaluation runner (resumable
JSONL per configuration, kept per seed and size), and writes ``DIR/results.json`` and ``DIR/results.md``.
The baseline's POPE accuracy comes with a 95% interval from a bootstrap over images (a scene's six
questions are not independent), so runs on different seeds can be compared against sampling noise; each
method's accuracy over the three splits comes as a gain over the baseline's with a paired interval (both
runs resampled by the same images).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from seeright.eval import chair, pope, report, runner
from seeright.testbed import world as shapes


def configs(methods: Any, sweeps: Mapping[str, Any] | None = None) -> tuple[tuple[str, dict[str, dict[str, Any]]], ...]:
    """``(label, interventions)`` rows: the baseline, then each method of ``methods`` (a
    :class:`~seeright.interventions.registry.MethodRegistry`) at the model's defaults and at its sweep settings (the
    model config's ``sweeps`` where it has them)."""
    return (("baseline", {}), *methods.sweep(sweeps))


def row_adapter(label: str) -> str | None:
    """The LoRA adapter a row runs on: ``"@sentinel vcd"`` runs VCD on adapter ``sentinel`` (None: the base model)."""
    first = label.split()[0] if label.split() else ""
    return first[1:] if first.startswith("@") else None


def parse_row(label: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """``"gift alpha=2 content_words=all"`` -> ``(label, {"gift": {"alpha": 2, "content_words": "all"}})``: values
    read as YAML scalars or lists (``layers=[10,11]``); the label is kept as given. A first word ``@NAME`` names the
    row's LoRA adapter (:func:`row_adapter`): ``"@sentinel"`` alone is the adapter without a method."""
    words = label.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    if not words:
        return label, {}
    name, *pairs = words
    given = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"row: {pair!r} in {label!r} is not KEY=VALUE")
        given[key] = yaml.safe_load(value)
    return label, {name: given}


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


def noise(records: list[dict[str, Any]], rounds: int = 1000) -> dict[str, Any]:
    """95% half-widths of each split's accuracy, and the random - adversarial accuracy gap with its own
    half-width. A bootstrap over images: a scene's questions move together, and the gap is paired (both
    splits ask about the same images and positives)."""
    splits = list(pope.SPLITS)
    images = sorted({r["image"] for r in records})
    row = {image: i for i, image in enumerate(images)}
    hits, counts = np.zeros((len(images), len(splits))), np.zeros((len(images), len(splits)))
    for r in records:
        cell = row[r["image"]], splits.index(r["split"])
        hits[cell] += pope.parse_official(r["text"]) == r["label"]
        counts[cell] += 1
    draws = np.random.default_rng(0).integers(0, len(images), size=(rounds, len(images)))
    acc = 100 * hits[draws].sum(1) / np.maximum(counts[draws].sum(1), 1)  # [rounds, splits]
    gap = acc[:, splits.index("random")] - acc[:, splits.index("adversarial")]

    def half_width(values: np.ndarray) -> float:
        low, high = np.percentile(values, [2.5, 97.5])
        return round(float(high - low) / 2, 2)

    observed = 100 * hits.sum(0) / np.maximum(counts.sum(0), 1)
    return {
        "interval95": {s: half_width(acc[:, i]) for i, s in enumerate(splits)},
        "adversarial_gap": {
            "points": round(float(observed[splits.index("random")] - observed[splits.index("adversarial")]), 2),
            "interval95": half_width(gap),
        },
    }


def paired_gain(records: list[dict[str, Any]], base: list[dict[str, Any]], rounds: int = 1000) -> dict[str, float]:
    """POPE accuracy over all three splits minus the baseline's on the same questions, in points, with a 95%
    half-width from a bootstrap over images that resamples both runs together (paired)."""
    key = lambda r: (r["split"], r["question_id"])  # noqa: E731
    theirs = {key(r): pope.parse_official(r["text"]) == r["label"] for r in base}
    images = sorted({r["image"] for r in records})
    row = {image: i for i, image in enumerate(images)}
    delta, counts = np.zeros(len(images)), np.zeros(len(images))
    for r in records:
        delta[row[r["image"]]] += (pope.parse_official(r["text"]) == r["label"]) - theirs[key(r)]
        counts[row[r["image"]]] += 1
    draws = np.random.default_rng(0).integers(0, len(images), size=(rounds, len(images)))
    gains = 100 * delta[draws].sum(1) / np.maximum(counts[draws].sum(1), 1)
    low, high = np.percentile(gains, [2.5, 97.5])
    return {"points": round(float(100 * delta.sum() / counts.sum()), 2), "interval95": round(float(high - low) / 2, 2)}


def chair_counts(spec: runner.BenchmarkSpec, records: list[dict[str, Any]]) -> dict[int, np.ndarray]:
    """Per image: [hallucinated caption 0/1, hallucinated mentions, mentions, recalled objects, ground-truth objects],
    the sums CHAIR_S, CHAIR_I and recall are ratios of."""
    scorer = chair.ChairScorer(lemmatizer=spec.lemmatizer, synonyms=spec.synonyms.read_text() if spec.synonyms else None)
    gt = chair.load_ground_truth(spec.gt)
    scored = scorer.score([{"image_id": r["image_id"], "caption": r["text"]} for r in records], gt, per_caption=True)
    return {c["image_id"]: np.array([bool(c["mscoco_hallucinated_words"]), len(c["mscoco_hallucinated_words"]),
                                     len(c["mscoco_generated_words"]), c["metrics"]["Recall"] * len(c["mscoco_gt_words"]),
                                     len(c["mscoco_gt_words"])], dtype=float)
            for c in scored["captions"]}


def chair_paired_gain(counts: dict[int, np.ndarray], base: dict[int, np.ndarray], rounds: int = 1000) -> dict[str, dict[str, float]]:
    """CHAIR_S, CHAIR_I and recall minus the baseline's on the same images, in points, with 95% half-widths from a
    bootstrap over images that resamples both runs together (paired)."""
    images = sorted(counts)
    mine, theirs = np.stack([counts[i] for i in images]), np.stack([base[i] for i in images])
    draws = np.random.default_rng(0).integers(0, len(images), size=(rounds, len(images)))

    def metrics(table: np.ndarray) -> np.ndarray:  # [..., 5] sums -> [..., 3] percentages
        return 100 * np.stack([table[..., 0] / len(images), table[..., 1] / np.maximum(table[..., 2], 1),
                               table[..., 3] / np.maximum(table[..., 4], 1)], -1)

    observed = metrics(mine.sum(0)) - metrics(theirs.sum(0))
    boot = metrics(mine[draws].sum(1)) - metrics(theirs[draws].sum(1))
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    return {name: {"points": round(float(observed[k]), 2), "interval95": round(float(high[k] - low[k]) / 2, 2)}
            for k, name in enumerate(("CHAIR_S", "CHAIR_I", "Recall"))}


def run(
    generator: runner.Generator,
    out: Path,
    seed: int = shapes.DEFAULT_SEED,
    n_images: int = 500,
    rows: tuple[tuple[str, dict[str, dict[str, Any]]], ...] = (("baseline", {}),),
    batch_size: int = 32,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every row (see :func:`configs`) on both benchmarks; the results, also written to ``out``. A row labelled
    ``@NAME ...`` runs on LoRA adapter NAME (``generator.on_adapter(NAME)``)."""
    bench = out / "benchmark"
    counts = shapes.write_benchmark(bench, n_images, seed)
    results: dict[str, Any] = {"seed": seed, "images": n_images, "questions": counts, "methods": {}}
    runs = out / "runs" / f"seed{seed}-images{n_images}"  # resumed only by the same benchmark
    pope_records: dict[str, list[dict[str, Any]]] = {}
    chair_by_image: dict[str, dict[int, np.ndarray]] = {}
    for label, interventions in rows:
        start = time.perf_counter()
        row: dict[str, Any] = {}
        adapter = row_adapter(label)
        row_generator = generator if adapter is None else generator.on_adapter(adapter)  # type: ignore[attr-defined]
        for name, spec in specs(bench, batch_size).items():
            path = runs / label.replace(" ", "_").replace("=", "-") / f"{name}.jsonl"
            records = runner.run_items(
                runner.benchmark_items(spec), row_generator, path, interventions, spec.new_tokens, spec.batch_size, progress
            )
            row[name] = runner.score_records(spec, records)
            row[name]["empty_answers"] = sum(not r["text"].strip() for r in records)
            if name == "pope":
                row["pope"].update(noise(records))
                pope_records[label] = records
                if "baseline" in pope_records:
                    row["pope"]["gain_vs_baseline"] = paired_gain(records, pope_records["baseline"])
            else:
                chair_by_image[label] = chair_counts(spec, records)
                if "baseline" in chair_by_image:
                    row["chair"]["gain_vs_baseline"] = chair_paired_gain(chair_by_image[label], chair_by_image["baseline"])
        row["seconds"] = round(time.perf_counter() - start, 1)
        results["methods"][label] = row
        log(f"{label}: {row['seconds']} s")
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (out / "results.md").write_text(markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    """One row per configuration: POPE accuracy / F1 / yes-ratio per split, then CHAIR."""
    splits = pope.SPLITS
    header = ["method"]
    for split in splits:
        header += [f"{split} acc", f"{split} F1", f"{split} yes%"]
    header += list(report.CHAIR_COLUMNS) + ["POPE acc vs baseline (paired 95%)"]
    paired_chair = any("gain_vs_baseline" in row["chair"] for row in results["methods"].values())
    if paired_chair:  # records from before CHAIR's paired intervals have none
        header += ["CHAIR_S / CHAIR_I / Recall vs baseline (paired 95%)"]
    rows = []
    for label, row in results["methods"].items():
        cells = [label]
        for split in splits:
            m = row["pope"]["splits"][split]
            cells += [f"{m['accuracy']:.1f}", f"{m['f1']:.1f}", f"{m['yes_ratio']:.1f}"]
        cells += [f"{row['chair'][c]:.1f}" for c in report.CHAIR_COLUMNS]
        gain = row["pope"].get("gain_vs_baseline")
        cells.append("-" if gain is None or label == "baseline" else f"{gain['points']:+.1f} ±{gain['interval95']:.1f}")
        if paired_chair:
            gains = row["chair"].get("gain_vs_baseline")
            cells.append("-" if gains is None or label == "baseline" else " / ".join(
                f"{gains[k]['points']:+.1f} ±{gains[k]['interval95']:.1f}" for k in ("CHAIR_S", "CHAIR_I", "Recall")))
        rows.append(cells)
    n = results["questions"]
    base = results["methods"].get("baseline")
    noise_line = ""
    if base is not None:
        widths = ", ".join(f"{s} ±{base['pope']['interval95'][s]:.1f}" for s in splits)
        gap = base["pope"]["adversarial_gap"]
        noise_line = (
            f"95% intervals of baseline accuracy (bootstrap over images): {widths} points; "
            f"random - adversarial accuracy: {gap['points']:.1f} ±{gap['interval95']:.1f} points.\n"
        )
    head = (
        f"shapes benchmark, seed {results['seed']}, {results['images']} images, "
        f"{n['random']} / {n['popular']} / {n['adversarial']} POPE questions.\n{noise_line}\n"
    )
    return head + report.markdown_table(header, rows)
