"""How much one CPU's compute slows while another CPU is busy: whether this machine's CPUs share a physical core.

On a VM two vCPUs may be hyperthreads of one host core, or time-sliced on it; ``lscpu`` need not say so. Then any
work in the API process (a request's image processing, a method's client-side passes) slows the engine's forward
on the other CPU, and a running stream's step grows while a request arrives, whatever the step budget. This times a
single-threaded matrix product loop pinned to one CPU, with the others idle and with a Python loop spinning on
another, and prints the medians and their ratio (about 1 on separate cores, up to about 2 on one shared core).

``python -m seeright.tools.cpu_contention [--rounds N]`` (Linux: it pins with ``os.sched_setaffinity``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

SPIN = "while True: pass"


def _median_round_ms(rounds: int, size: int = 256, products: int = 20) -> float:
    """The median time of ``rounds`` rounds of ``products`` ``size``-square matrix products, in ms."""
    a = torch.randn(size, size)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(products):
            a @ a
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def measure(rounds: int = 200) -> dict[str, float]:
    """The loop's median round on the first CPU this process may use, alone and beside a spin on another."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("cpu_contention: needs two CPUs this process may use")
    threads = torch.get_num_threads()
    os.sched_setaffinity(0, {cpus[0]})
    torch.set_num_threads(1)
    try:
        idle = _median_round_ms(rounds)
        spin = subprocess.Popen([sys.executable, "-c", SPIN], preexec_fn=lambda: os.sched_setaffinity(0, {cpus[1]}))
        try:
            time.sleep(0.3)
            busy = _median_round_ms(rounds)
        finally:
            spin.kill()
            spin.wait()
    finally:
        os.sched_setaffinity(0, set(cpus))
        torch.set_num_threads(threads)
    return {"idle_ms": idle, "busy_ms": busy, "ratio": busy / idle}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seeright.tools.cpu_contention", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200, help="rounds timed in each condition")
    result = measure(parser.parse_args(argv).rounds)
    print(f"one CPU's matrix products: {result['idle_ms']:.2f} ms a round with the other CPUs idle, "
          f"{result['busy_ms']:.2f} ms beside a spinning CPU ({result['ratio']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
