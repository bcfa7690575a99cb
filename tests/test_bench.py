"""``seeright bench`` produces every ratio the performance issue asks for (no timing assertions)."""

from __future__ import annotations

import json
import math

import pytest

from seeright.cli import main
from seeright.interventions.registry import MethodRegistry
from seeright.tools import serving_bench


def test_bench_json_has_every_ratio(capsys):
    assert main(["bench", "--model", "tiny-random/llava", "--new-tokens", "4", "--reps", "1", "--warmup", "0",
                 "--batch-reps", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    methods = set(MethodRegistry.builtin())
    for key in ("decode_ratio", "request_ratio", "memory_ratio", "reference_ratio"):
        assert set(result[key]) == methods and all(math.isfinite(v) and v > 0 for v in result[key].values()), key
    for key in ("mixed_vs_uniform_ratio", "mixed_vs_sequential_ratio", "uniform_vs_sequential_ratio"):
        assert result["batch"][key] > 0
    assert result["runtime_overhead"]["decode_ratio"] > 0
    assert all(math.isfinite(result["adapters"][k]) and result["adapters"][k] > 0
               for k in ("decode_ratio", "request_ratio", "batch_vs_base_ratio"))
    assert all(n == [4] for n in result["tokens"].values())


def test_bench_table(capsys):
    assert main(["bench", "--model", "tiny-random/llava", "--new-tokens", "3", "--reps", "1", "--warmup", "0",
                 "--batch-reps", "1", "--no-memory", "--no-reference"]) == 0
    out = capsys.readouterr().out
    assert "| var |" in out and "batch of 8" in out and "LoRA adapters (rank 16" in out


def test_serving_bench_reports_short_behind_long_joiners_and_open_loop_per_step_budget(capsys):
    assert main(["bench", "--serving", "--model", "tiny-random/llava", "--reps", "1", "--long-tokens", "12", "--delay", "0.05",
                 "--rate", "50", "--requests", "6", "--joiners", "vhr", "--joiner-stream-tokens", "30",
                 "--joiner-delay", "0.05", "--joiner-repeats", "2", "--step-budget", "0", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [run["step_budget"] for run in result["runs"]] == [None, 2.0]
    for run in result["runs"]:
        assert run["short_behind_long"]["ratio"] > 0
        assert [j["joiner"] for j in run["joiners"]] == ["plain", "vhr"] and all(j["status"] == "ok" for j in run["joiners"])
        assert all(j["longest_gap_s"] >= j["median_gap_s"] > 0 and j["alone_gap_s"] > 0 for j in run["joiners"])
        assert all(len(j["ratios"]) == 2 and j["ratio"] == min(j["ratios"]) for j in run["joiners"])  # the lower median
        # what the longest gap held, from the scheduler's turns: a decode step at least, nothing beyond the gap
        assert all(j["gap_step_s"] > 0 and j["gap_work_s"] >= 0 and j["gap_work_s"] + j["gap_step_s"] <= j["longest_gap_s"] + 1e-6
                   for j in run["joiners"])
        load = run["open_loop"][0]
        assert load["requests"] == 6 and load["refused"] == 0 and load["failed"] == 0
        assert 0 < load["ttft_s"]["p50"] <= load["ttft_s"]["p99"] and load["tokens_per_s"] > 0
    contention = result["cpu_contention"]  # the machine's, before and after (None with one CPU)
    assert set(contention) == {"before", "after"} and all(v is None or v > 0 for v in contention.values())
    assert (contention["before"] is None) != ("seeright.tools.cpu_contention" in serving_bench.table(result))
    assert "step budget 2" in serving_bench.table(result) and "; alone " in serving_bench.table(result)
    assert "; worst " in serving_bench.table(result) and "the run of 2 whose ratio is the median" in serving_bench.table(result)
    assert "step budget 2: newcomer work + longest step" in serving_bench.table(result)
    assert "(worst run: " in serving_bench.table(result)
    assert all(j["worst"]["ratio"] == max(j["ratios"]) for run in result["runs"] for j in run["joiners"])


def test_serving_bench_refuses_a_joiner_no_method_is_named():
    """(``--joiners plain`` once ran a joiner whose every request failed as an unknown method.)"""
    with pytest.raises(SystemExit, match="no method named plain"):
        main(["bench", "--serving", "--model", "tiny-random/llava", "--joiners", "plain", "vhr"])


def test_vllm_serving_runs_name_the_engine_cores_threads_they_chose():
    """``--engine-threads`` runs vLLM's engine core on each count in turn; a run names its count, a run without one
    (the engine's default) reads as before."""
    run = {"step_tokens": 512, "step_budget": 1.0, "paced": True}
    assert serving_bench._budget(run) == "512 tokens at most, 1x a decode step of newcomer work per step"
    assert serving_bench._budget({**run, "engine_threads": 1}).endswith("per step, engine core on 1 thread")
    assert serving_bench._budget({**run, "engine_threads": 2}).endswith("per step, engine core on 2 threads")
