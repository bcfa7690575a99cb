"""Defaults that suit a model: each method's strength swept on a development seed of the shapes world.

``python -m seeright.testbed.tune_defaults --model seeright/shapes-smol --seed 7 --images 40`` runs the baseline and
every candidate of :data:`GRID` (each method at the model's current defaults, then weaker settings) through the
shapes tables (``seeright eval shapes``), and picks per method, by :func:`choose`: no empty answer, POPE accuracy
not below the baseline's beyond its paired 95% interval, then the highest POPE gain, then the lowest CHAIR_I. Seed 7
is a development seed: no reported table uses it (those are 1234, 2027, 2031, 4242). The chosen values go into the
model's config entry by hand, each with its source (this command's record, under ``results/tune-defaults/``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from seeright.service.engine import Engine, EngineGenerator
from seeright.testbed import results as shapes_results
from seeright.tools import records

# Weaker settings of the strength that the releases tuned on 7B-13B models (their defaults, or the model config's,
# run first as the method's own row).
GRID: dict[str, list[dict[str, Any]]] = {
    "vhr": [{"alpha": 1.5}, {"alpha": 1.2}],
    "gift": [{"alpha": 3.0}, {"alpha": 2.0}, {"alpha": 1.0}],
    "pai": [{"alpha": 0.1}, {"alpha": 0.05}],
    "paint": [{"alpha": 0.35, "beta": 0.15}, {"alpha": 0.2, "beta": 0.1}],
    "vcd": [{"alpha": 0.5}, {"alpha": 0.25}],
    "ritual": [{"alpha": 1.0}, {"alpha": 0.5}],
}


def label(name: str, given: dict[str, Any]) -> str:
    return " ".join([name, *(f"{k}={v}" for k, v in given.items())])


def choose(results: dict[str, Any], name: str) -> tuple[str, list[str]]:
    """The row chosen for ``name`` (its defaults' row is ``name``) and why each other row was set aside."""
    rows = {lab: row for lab, row in results["methods"].items() if lab.split()[0] == name}
    reasons, kept = [], []
    for lab, row in rows.items():
        empty = row["pope"].get("empty_answers", 0) + row["chair"].get("empty_answers", 0)
        gain = row["pope"]["gain_vs_baseline"]
        if empty:
            reasons.append(f"{lab}: {empty} empty answers")
        elif gain["points"] + gain["interval95"] < 0:
            reasons.append(f"{lab}: POPE {gain['points']:+.1f} ±{gain['interval95']:.1f} below the baseline")
        else:
            kept.append(lab)
    if not kept:
        return name, reasons
    best = max(kept, key=lambda lab: (rows[lab]["pope"]["gain_vs_baseline"]["points"], -rows[lab]["chair"]["CHAIR_I"]))
    return best, reasons


def run(engine: Engine, seed: int, n_images: int, out: Path, batch_size: int = 16) -> dict[str, Any]:
    names = [n for n in GRID if engine.unavailable(n) is None]
    rows = (("baseline", {}), *((label(n, g), {n: g}) for n in names for g in ({}, *GRID[n])))
    results = shapes_results.run(EngineGenerator(engine), out, seed, n_images, rows, batch_size,
                                 log=lambda msg: print(msg, file=sys.stderr))
    chosen = {}
    for name in names:
        best, reasons = choose(results, name)
        chosen[name] = {"row": best, "params": rows[[r[0] for r in rows].index(best)][1].get(name, {}), "set_aside": reasons}
    return {"model": engine.model_id, "seed": seed, "images": n_images, "table": results, "chosen": chosen}


def markdown(result: dict[str, Any]) -> str:
    lines = [shapes_results.markdown(result["table"]).rstrip(), "",
             f"Chosen on development seed {result['seed']} ({result['images']} scenes): no empty answer, POPE not "
             "below the baseline beyond its paired interval, then the best POPE gain, then the lowest CHAIR_I.", "",
             "| method | chosen | set aside |", "|---|---|---|"]
    for name, pick in result["chosen"].items():
        params = ", ".join(f"{k}={v}" for k, v in pick["params"].items()) or "its defaults"
        lines.append(f"| {name} | {params} | {'; '.join(pick['set_aside']) or '-'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="seeright/shapes-smol")
    parser.add_argument("--seed", type=int, default=7, help="a development seed no reported table uses")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--out", default="runs/tune-defaults")
    parser.add_argument("--results", default="results", help="folder of result records")
    args = parser.parse_args()
    result = run(Engine.from_pretrained(args.model), args.seed, args.images, Path(args.out))
    print(markdown(result))
    records.write("tune-defaults", f"{args.model.replace('/', '-')}-seed{args.seed}", result,
                  ["python", "-m", "seeright.testbed.tune_defaults", *sys.argv[1:]], args.results)


if __name__ == "__main__":
    main()
