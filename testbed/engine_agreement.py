"""``python -m seeright.testbed.engine_agreement``: the shapes testbed on both engines, side by side.

Every method the vLLM engine hosts (at the model's defaults; PAI with and without its CFG branch) and the baseline
run on the same scenes of one seed, first on the transformers engine in process, then on the vLLM engine
(:class:`~seeright.service.vllm.generator.VllmGenerator`), through the same evaluation runner and scorers. Per row
the record keeps both engines' POPE accuracy (mean of the three splits), CHAIR_S, CHAIR_I and recall, their
differences, and how many of the row's answers are the same text. The issue's bar: every difference within 0.5
points. Run it in the vLLM environment (``.ci/vllm`` builds one), one engine at a time.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

from seeright.testbed import results as shapes_results
from seeright.tools import records

EXTRA_ROWS = {"pai cfg=true": {"pai": {"cfg": True}}}  # a contrast branch of a method whose defaults have none
FIGURES = (("POPE acc", "pope", "accuracy"), ("CHAIR_S", "chair", "CHAIR_S"), ("CHAIR_I", "chair", "CHAIR_I"),
           ("Recall", "chair", "Recall"))


def figures(row: dict[str, Any]) -> dict[str, float]:
    """A testbed row's headline figures: POPE accuracy (mean of the splits), CHAIR_S, CHAIR_I, recall."""
    return {label: row[bench]["mean"][key] if bench == "pope" else row[bench][key] for label, bench, key in FIGURES}


def answers(folder: Path) -> dict[str, str]:
    """Every answer of a testbed run's rows, by row, benchmark and item key."""
    found = {}
    for path in sorted(folder.glob("runs/*/*/*.jsonl")):
        for line in path.read_text().splitlines():
            item = json.loads(line)
            found[f"{path.parent.name}/{path.stem}/{item['key']}"] = item["text"]
    return found


def compare(on_hf: dict[str, Any], on_vllm: dict[str, Any], hf_dir: Path, vllm_dir: Path) -> dict[str, Any]:
    """Both engines' figures per row, the differences (vLLM - transformers) and the rows' answers that agree."""
    hf_answers, vllm_answers = answers(hf_dir), answers(vllm_dir)
    rows = {}
    for label, row in on_hf["methods"].items():
        hf, vl = figures(row), figures(on_vllm["methods"][label])
        folder = label.replace(" ", "_").replace("=", "-") + "/"
        keys = [k for k in hf_answers if k.startswith(folder)]
        rows[label] = {"transformers": hf, "vllm": vl, "difference": {k: vl[k] - hf[k] for k in hf},
                       "answers": len(keys), "same_answers": sum(hf_answers[k] == vllm_answers.get(k) for k in keys),
                       "seconds": {"transformers": row["seconds"], "vllm": on_vllm["methods"][label]["seconds"]}}
    return {"seed": on_hf["seed"], "images": on_hf["images"], "questions": on_hf["questions"], "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    caption = (f"shapes benchmark, seed {result['seed']}, {result['images']} scenes; each figure transformers / vLLM "
               "(difference)")
    lines = [caption, "",
             "| row | " + " | ".join(label for label, _, _ in FIGURES) + " | same answers | seconds |",
             "|---|" + "---|" * (len(FIGURES) + 2)]
    for label, row in result["rows"].items():
        cells = [f"{row['transformers'][k]:.1f} / {row['vllm'][k]:.1f} ({row['difference'][k]:+.1f})" for k, _, _ in FIGURES]
        seconds = row["seconds"]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['same_answers']} / {row['answers']} | "
                     f"{seconds['transformers']:.0f} / {seconds['vllm']:.0f} |")
    worst = max(abs(v) for row in result["rows"].values() for v in row["difference"].values())
    lines += ["", f"Largest difference: {worst:.2f} points."]
    return "\n".join(lines) + "\n"


def hosted_rows(client: Any, model_rows: tuple[tuple[str, dict[str, Any]], ...]) -> tuple[tuple[str, dict[str, Any]], ...]:
    """The baseline, each method at the model's defaults that ``client`` (a vLLM engine client) hosts, and the
    extra contrast rows."""
    defaults = [(label, row) for label, row in model_rows if label == "baseline" or (len(row) == 1 and label in row)]
    rows = [*defaults, *EXTRA_ROWS.items()]
    return tuple((label, row) for label, row in rows if all(client.refusal(n, p) is None for n, p in row.items()))


def run(model: str, seed: int, images: int, out: Path, batch_size: int = 32, only: list[str] | None = None) -> dict[str, Any]:
    from seeright.service.engine import Engine, EngineGenerator
    from seeright.service.settings import Settings
    from seeright.service.vllm.generator import VllmGenerator

    settings = Settings(model=model, engine="vllm")
    with VllmGenerator.started(settings) as generator:
        rows = hosted_rows(generator.client, shapes_results.configs(generator.client.spec.methods,
                                                                     generator.client.spec.model_config.sweeps))
        rows = tuple(r for r in rows if not only or r[0] in only)
        on_vllm = shapes_results.run(generator, out / "vllm", seed, images, rows, batch_size, log=_log)
    engine = Engine.from_pretrained(model)
    on_hf = shapes_results.run(EngineGenerator(engine), out / "transformers", seed, images, rows, batch_size, log=_log)
    del engine
    gc.collect()
    return {"model": model, **compare(on_hf, on_vllm, out / "transformers", out / "vllm")}


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="seeright/shapes-smol")
    parser.add_argument("--seed", type=int, default=2051, help="a seed no table, detector or tuning was made from")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--only", nargs="+", metavar="LABEL", help="only these rows")
    parser.add_argument("--out", default="runs/engine-agreement", help="the runs' folder (answers, resumable)")
    parser.add_argument("--results", default="results", help="folder of result records")
    args = parser.parse_args()
    result = run(args.model, args.seed, args.images, Path(args.out), only=args.only)
    print(markdown(result))
    records.write("engine-agreement", f"{args.model.replace('/', '-')}-seed{args.seed}-{args.images}", result,
                  ["python", "-m", "seeright.testbed.engine_agreement", *sys.argv[1:]], args.results)


if __name__ == "__main__":
    main()
