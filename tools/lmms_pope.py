"""``seeright eval lmms-pope``: lmms-eval's POPE task against a running server, scored twice.

For each model id (the served model and its ``+preset`` ids), runs ``python -m lmms_eval --model openai``
(lmms-eval's OpenAI-compatible chat model) on the local shapes-world POPE split written by
:func:`seeright.testbed.lmms_task.write_task`, then scores the very answers lmms-eval logged with seeright's own POPE
scorer (``seeright score pope``, the official parser). lmms-eval runs in its own environment
(``--lmms-python``): it pulls a torchvision that cannot load beside a CPU torch, so it is kept apart from
the server's (docs/evaluation.md, "lmms-eval against the server").
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from seeright.eval import pope
from seeright.testbed import lmms_task

LMMS_METRICS = ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")


def lmms_pope_yaml(python: str) -> Path:
    """lmms-eval's POPE task file in the environment of ``python``."""
    found = subprocess.run(
        [python, "-c", "import importlib.util as u; s = u.find_spec('lmms_eval'); print(s.origin if s else '')"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    if not found:
        raise ValueError(f"lmms_python: {python} has no lmms_eval installed")
    return Path(found).parent / "tasks" / "pope" / "pope.yaml"


def run_lmms_eval(python: str, endpoint: str, model: str, task_dir: Path, out: Path, concurrency: int) -> tuple[Path, Path]:
    """One lmms-eval run; the paths of its results and samples files."""
    args = f"model_version={model},base_url={endpoint.rstrip('/')}/v1,num_concurrent={concurrency}"
    env = {**os.environ, "OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY", "unused"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    subprocess.run(
        [python, "-m", "lmms_eval", "--model", "openai", "--model_args", args, "--tasks", lmms_task.TASK,
         "--include_path", str(task_dir), "--output_path", str(out), "--log_samples"],
        check=True, env=env, stdout=subprocess.DEVNULL,
    )
    newest = [sorted(out.rglob(pattern), key=lambda p: p.stat().st_mtime)
              for pattern in ("*_results.json", f"*_samples_{lmms_task.TASK}.jsonl")]
    if not all(newest):
        raise ValueError(f"lmms-eval wrote no results or samples under {out}")
    return newest[0][-1], newest[1][-1]


def lmms_scores(results: Path, samples: Path) -> dict[str, float]:
    """lmms-eval's own POPE metrics (exact match of the lower-cased answer with "yes"/"no"), in percent, and
    the share of answers that were exactly "yes" or "no"."""
    metrics = json.loads(results.read_text())["results"][lmms_task.TASK]
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    exact = sum(r["pope_accuracy"]["prediction"] in ("yes", "no") for r in rows)
    return {name: 100 * metrics[f"pope_{key},none"] for name, key in
            (("accuracy", "accuracy"), ("precision", "precision"), ("recall", "recall"), ("f1", "f1_score"))} | {
        "yes_or_no": 100 * exact / len(rows)}


def run(
    endpoint: str, models: list[str], python: str, out: Path, images: int, seed: int, split: str, concurrency: int
) -> list[dict[str, Any]]:
    """Write the task once, run lmms-eval per model id, score each run's answers both ways."""
    task = lmms_task.write_task(out / "task", images, seed, split, pope_yaml=lmms_pope_yaml(python))
    rows = []
    for model in models:
        results, samples = run_lmms_eval(
            python, endpoint, model, out / "task", out / "runs" / model.replace("/", "__"), concurrency)
        ours = pope.score_by_id(pope.answers_from_lmms_samples(samples), [task["labels"]])["mean"]
        rows.append({"model": model, "questions": task["questions"], "lmms_eval": lmms_scores(results, samples),
                     "seeright": {k: ours[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")},
                     "samples": str(samples)})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """One row per model id: lmms-eval's scores, then seeright's official-parser scores of the same answers."""
    lines = ["| model id | questions | answers exactly yes/no % | lmms-eval acc | lmms-eval F1 | seeright acc | seeright F1 "
             "| seeright yes % |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a, b = r["lmms_eval"], r["seeright"]
        lines.append(f"| `{r['model']}` | {r['questions']} | {a['yes_or_no']:.1f} | {a['accuracy']:.1f} | {a['f1']:.1f} | "
                     f"{b['accuracy']:.1f} | {b['f1']:.1f} | {b['yes_ratio']:.1f} |")
    return "\n".join(lines)
