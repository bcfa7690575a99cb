"""``seeright/shapes-smol``'s method defaults: every method a user can tick suits the default model (a file of its
own: the longest test of the suite, so that a worker of its own runs it beside the rest)."""

from __future__ import annotations

import pytest

from seeright.service.engine import Engine, EngineGenerator
from seeright.testbed import results as shapes_results

MODEL = "seeright/shapes-smol"


@pytest.fixture(scope="module")
def smol() -> Engine:
    return Engine.from_pretrained(MODEL)


DEV_SEED = 7  # the development seed the defaults were tuned on (testbed/tune_defaults.py); no reported table uses it


def test_no_method_at_its_defaults_answers_empty_or_costs_pope_accuracy(smol, tmp_path):
    """A user ticking a method on the default model gets it at settings that suit the model: on development-seed
    scenes, no empty caption or answer, and POPE accuracy not below the baseline's beyond its paired interval."""
    names = [n for n in smol.runnable() if not smol.methods[n].signal]
    rows = (("baseline", {}), *((name, {name: {}}) for name in names))
    results = shapes_results.run(EngineGenerator(smol), tmp_path, DEV_SEED, 8, rows, 16, log=lambda message: None)
    failures = []
    for label, row in results["methods"].items():
        empty = row["pope"]["empty_answers"] + row["chair"]["empty_answers"]
        gain = row["pope"].get("gain_vs_baseline", {"points": 0.0, "interval95": 0.0})
        if empty or gain["points"] + gain["interval95"] < 0:
            failures.append(f"{label}: {empty} empty answers, POPE {gain['points']:+.1f} ±{gain['interval95']:.1f}")
    assert not failures
