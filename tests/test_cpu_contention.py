"""``python -m seeright.tools.cpu_contention`` times one CPU alone and beside a busy one (no timing assertions)."""

from __future__ import annotations

import os

import pytest

from seeright.tools import cpu_contention


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_it_reports_both_conditions_and_leaves_the_process_as_it_was(capsys):
    cpus, threads = os.sched_getaffinity(0), cpu_contention.torch.get_num_threads()
    assert cpu_contention.main(["--rounds", "3"]) == 0
    out = capsys.readouterr().out
    assert "a round with the other CPUs idle" in out and "beside a spinning CPU" in out
    assert os.sched_getaffinity(0) == cpus and cpu_contention.torch.get_num_threads() == threads
