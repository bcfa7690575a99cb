"""Defaults that suit a model: each method's strength swept on a development seed of the shapes world.

``python -m seeright.testbed.tune_defaults --model seeright/shapes-smol --seed 7 --images 30`` runs the baseline and
every candidate of :data:`GRID` (each method at its release's strength, then weaker ones) through the shapes tables
(``seeright eval shapes``), and keeps per method (:func:`choose`) the release's value when it suits the model, else
the strongest weaker one that does: no empty answer, neither POPE accuracy below the baseline's nor CHAIR_I above it
beyond the paired 95% interval. Seed 7
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

# Each method's strength: the release's value first, then weaker ones. Every row names its settings, so a record
# never depends on what the model's config said when it ran.
GRID: dict[str, list[dict[str, Any]]] = {
    "vhr": [{"alpha": 2.0}, {"alpha": 1.5}, {"alpha": 1.2}],
    "gift": [{"alpha": 5.0}, {"alpha": 3.0}, {"alpha": 2.0}, {"alpha": 1.0}],
    "pai": [{"alpha": 0.2}, {"alpha": 0.1}, {"alpha": 0.05}],
    "paint": [{"alpha": 0.7, "beta": 0.3}, {"alpha": 0.35, "beta": 0.15}, {"alpha": 0.2, "beta": 0.1}],
    "vcd": [{"alpha": 1.0}, {"alpha": 0.5}, {"alpha": 0.25}],
    "ritual": [{"alpha": 3.0}, {"alpha": 1.0}, {"alpha": 0.5}],
    # CARVE: more of the image kept (a gentler crop), then the answer from the refined image alone (its paper's Alg. 1)
    "carve": [{"top_p": 0.2}, {"top_p": 0.4}, {"top_p": 0.7}, {"requery": "refined"}],
    # ViF: the release's attention temperature (0.8 sharpens every reallocated layer), then none, then half the moves
    "vif": [{"tau": 0.8}, {"tau": 0.9}, {"tau": 1.0}, {"tau": 1.0, "alpha_mid": 0.1, "alpha_deep": 0.05}],
}


def label(name: str, given: dict[str, Any]) -> str:
    return " ".join([name, *(f"{k}={v}" for k, v in given.items())])


def failures(row: dict[str, Any]) -> list[str]:
    """Why a row's settings do not suit the model: empty answers, POPE accuracy below the baseline's or CHAIR_I
    above it, each beyond its paired 95% interval."""
    found = []
    empty = row["pope"].get("empty_answers", 0) + row["chair"].get("empty_answers", 0)
    if empty:
        found.append(f"{empty} empty answers")
    pope_gain = row["pope"]["gain_vs_baseline"]
    if pope_gain["points"] + pope_gain["interval95"] < 0:
        found.append(f"POPE {pope_gain['points']:+.1f} ±{pope_gain['interval95']:.1f}")
    chair_i = row["chair"]["gain_vs_baseline"]["CHAIR_I"]
    if chair_i["points"] - chair_i["interval95"] > 0:
        found.append(f"CHAIR_I {chair_i['points']:+.1f} ±{chair_i['interval95']:.1f}")
    return found


def choose(results: dict[str, Any], name: str) -> tuple[str | None, list[str]]:
    """The row chosen for ``name``: the release's value when it suits the model (:func:`failures`), else the
    strongest weaker one that does (None: none does); and why each row before it was set aside."""
    rows = {lab: row for lab, row in results["methods"].items() if lab.split()[0] == name}
    reasons = []
    for lab, row in rows.items():  # GRID's order: the release's value first
        found = failures(row)
        if not found:
            return lab, reasons
        reasons.append(f"{lab}: {', '.join(found)}")
    return None, reasons


def run(engine: Engine, seed: int, n_images: int, out: Path, batch_size: int = 16,
        methods: list[str] | None = None) -> dict[str, Any]:
    names = [n for n in (methods or GRID) if engine.unavailable(n) is None]
    rows = (("baseline", {}), *((label(n, g), {n: g}) for n in names for g in GRID[n]))
    results = shapes_results.run(EngineGenerator(engine), out, seed, n_images, rows, batch_size,
                                 log=lambda msg: print(msg, file=sys.stderr))
    chosen = {}
    for name in names:
        best, reasons = choose(results, name)
        params = None if best is None else dict(rows)[best][name]
        chosen[name] = {"row": best, "params": params, "release": GRID[name][0], "set_aside": reasons}
    return {"model": engine.model_id, "seed": seed, "images": n_images, "table": results, "chosen": chosen}


def markdown(result: dict[str, Any]) -> str:
    lines = [shapes_results.markdown(result["table"]).rstrip(), "",
             f"Chosen on development seed {result['seed']} ({result['images']} scenes): each method's release value "
             "when it suits the model, else the strongest weaker one that does (no empty answer, neither POPE "
             "accuracy below the baseline's nor CHAIR_I above it beyond the paired 95% interval).", "",
             "| method | chosen | set aside |", "|---|---|---|"]
    for name, pick in result["chosen"].items():
        if pick["params"] is None:
            params = "none suits the model"
        elif pick["params"] == pick["release"]:
            params = "the release's " + ", ".join(f"{k}={v}" for k, v in pick["params"].items())
        else:
            params = ", ".join(f"{k}={v}" for k, v in pick["params"].items())
        lines.append(f"| {name} | {params} | {'; '.join(pick['set_aside']) or '-'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="seeright/shapes-smol")
    parser.add_argument("--seed", type=int, default=7, help="a development seed no reported table uses")
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--out", default="runs/tune-defaults")
    parser.add_argument("--results", default="results", help="folder of result records")
    parser.add_argument("--methods", nargs="+", choices=sorted(GRID), help="only these (the record's name says which)")
    args = parser.parse_args()
    result = run(Engine.from_pretrained(args.model), args.seed, args.images, Path(args.out), methods=args.methods)
    print(markdown(result))
    suffix = "".join(f"-{m}" for m in args.methods or ())
    records.write("tune-defaults", f"{args.model.replace('/', '-')}-seed{args.seed}{suffix}", result,
                  ["python", "-m", "seeright.testbed.tune_defaults", *sys.argv[1:]], args.results)


if __name__ == "__main__":
    main()
