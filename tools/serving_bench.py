"""``seeright bench --serving``: the scheduler under load, in-process (the serving path without HTTP).

* **Short behind long**: a ``--short-tokens`` request sent ``--delay`` seconds after a ``--long-tokens``
  request starts, against the same short request alone (medians of ``--reps``). Continuous batching keeps
  the ratio near 1; a scheduler that runs batches to completion makes the short one wait for the long one.
* **Joiners**: a plain streamed caption of ``--joiner-stream-tokens`` tokens runs alone; ``--joiner-delay``
  seconds after it starts, one ``--short-tokens`` request joins, plain or with one method (``--joiners``). Reported
  per joiner: the running stream's median gap between tokens and its longest gap (the freeze a streaming client
  sees while the newcomer's prefill and method passes run), and their ratio; with ``--joiner-repeats N``, the run
  whose ratio is the median of N (each with a stream and a joiner of their own), and every run's ratio.
* **Open loop**: requests arrive at a fixed rate whatever the server does (``--rate`` per second, for
  ``--requests``), a mix of short answers and long captions, with and without interventions (the methods of
  the mixed loads). Reported: time to first token and per-token latency percentiles, tokens/s, and how many
  were refused (a full queue, a 503 over HTTP) or failed.

Every measurement runs once per ``--step-budget`` (by default 0, off: whole admissions between two decode
steps, and the server's default), on one engine, so before and after come from one run. With ``--engine vllm`` the
same measurements run on the vLLM engine client (``service/vllm``), once per ``--step-tokens`` (vLLM's per-step token
budget, ``vllm_step_tokens``; 0: chunked prefill off) and ``--step-budget`` (the prompt tokens a step takes beside
decoding rows, in decode steps' time, :mod:`seeright.service.vllm.pacing`, and the engine client's tower work per
pause of the engine, :mod:`seeright.service.vllm.pauses`; 0: the token budget alone and the tower work beside the
steps), each on a vLLM engine started with them. Before and after it all, the machine's CPU contention
(:mod:`seeright.tools.cpu_contention`): on a shared VM the gaps move with it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from seeright.interventions.registry import MethodRegistry
from seeright.service.api.app import frozen_heap
from seeright.service.engine import Engine, GenerationRequest
from seeright.service.scheduler import Job, QueueFull, Scheduler
from seeright.service.slicing import StepBudget
from seeright.tools import cpu_contention

PROMPTS = {"short": "Is there a circle in the image? Answer yes or no.", "long": "Describe the image in detail."}


@dataclass
class Timeline:
    """When a request was sent, got its tokens and finished."""

    sent: float
    tokens: list[float] = field(default_factory=list)
    done: float | None = None
    status: str = "ok"


@dataclass
class Turns:
    """The transformers scheduler's turns (:attr:`Scheduler.timeline`): each turn of newcomer work and each decode
    step, with when it started and ended."""

    items: list[tuple[str, float, float]] = field(default_factory=list)

    def __call__(self, kind: str, start: float, end: float) -> None:
        self.items.append((kind, start, end))

    def held(self, start: float, end: float) -> dict[str, float]:
        """What ran in ``[start, end]`` (a gap between two tokens): the newcomer work's seconds, and the longest
        decode step's."""
        def overlap(a: float, b: float) -> float:
            return max(0.0, min(b, end) - max(a, start))

        work = sum(overlap(a, b) for kind, a, b in self.items if kind == "work")
        step = max((overlap(a, b) for kind, a, b in self.items if kind == "step"), default=0.0)
        return {"gap_work_s": work, "gap_step_s": step}


def _image(seed: int) -> Image.Image:
    """A plain image of its own for each seed below 65536 (no two requests share an image: the vLLM engine's
    prefix cache would answer a repeated one without its prefill and image encoding)."""
    return Image.new("RGB", (64, 48), (seed % 256, seed // 256 % 256, 200))


async def _send(target: Any, request: GenerationRequest) -> Timeline:
    """Send ``request`` to the transformers engine's :class:`Scheduler` or to an engine client (the vLLM engine's
    ``stream``) and record when its tokens came."""
    timeline = Timeline(time.perf_counter())
    try:
        if isinstance(target, Scheduler):
            loop = asyncio.get_running_loop()
            job = Job(request, loop, loop.create_future(), lambda token: timeline.tokens.append(time.perf_counter()))
            target.submit(job)
            await job.future
        else:
            async for _ in target.stream(request):
                timeline.tokens.append(time.perf_counter())
    except QueueFull:
        timeline.status = "refused"
    except Exception:  # noqa: BLE001 - counted, the load goes on
        timeline.status = "failed"
    timeline.done = time.perf_counter()
    return timeline


def _request(kind: str, tokens: int, seed: int, interventions: dict | None = None) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPTS[kind], images=[_image(seed)], interventions=interventions or {}, max_new_tokens=tokens)


async def short_behind_long(scheduler: Scheduler, short_tokens: int, long_tokens: int, delay: float, reps: int) -> dict[str, Any]:
    alone, behind = [], []
    for rep in range(reps):
        t = await _send(scheduler, _request("short", short_tokens, 1000 + rep))
        alone.append(t.done - t.sent)
        long_task = asyncio.ensure_future(_send(scheduler, _request("long", long_tokens, 100 + rep)))
        await asyncio.sleep(delay)
        t = await _send(scheduler, _request("short", short_tokens, 1100 + rep))
        behind.append(t.done - t.sent)
        await long_task
    a, b = statistics.median(alone), statistics.median(behind)
    return {"short_alone_s": a, "short_behind_long_s": b, "ratio": b / a}


async def joiner(
    scheduler: Scheduler, method: str | None, stream_tokens: int, join_tokens: int, delay: float, seed: int = 0,
    alone: Timeline | None = None,
) -> dict[str, Any]:
    """One plain stream, one request joining it after ``delay`` (plain, or with ``method`` at its defaults). The
    longest gap counts the stream's gaps while the joiner was there (from its sending to its end, its leaving
    included); ``alone``, the same stream run with nothing joining, gives the longest gap of the same window without
    a joiner: what the machine's own jitter puts there. On the transformers scheduler, what that gap held (newcomer
    work, the longest decode step) comes from its turns."""
    turns = getattr(scheduler, "timeline", None)
    if isinstance(turns, Turns):
        turns.items.clear()
    running = asyncio.ensure_future(_send(scheduler, _request("long", stream_tokens, 200 + seed)))
    await asyncio.sleep(delay)
    joined = await _send(scheduler, _request("short", join_tokens, 300 + seed, {method: {}} if method else None))
    stream = await running
    start, end = joined.sent - stream.sent, joined.done - stream.sent  # the joiner's window, from the stream's start
    pairs = list(zip(stream.tokens, stream.tokens[1:]))
    beside = [b - a for a, b in pairs if joined.tokens and joined.tokens[0] < b <= joined.done]  # while it decodes too
    median = statistics.median(b - a for a, b in pairs)
    gap = max(_window(stream, start, end), key=lambda p: p[1] - p[0], default=None)
    longest = gap[1] - gap[0] if gap else 0.0
    control = [b - a for a, b in _window(alone, start, end)] if alone is not None else []
    return {"joiner": method or "plain", "stream_tokens": len(stream.tokens), "joined_s": joined.done - joined.sent,
            "median_gap_s": median, "longest_gap_s": longest, "ratio": longest / median, "status": joined.status,
            "alone_gap_s": max(control) if control else None,
            "beside_gap_s": statistics.median(beside) if beside else None, "stream_outlasted": stream.done >= joined.done,
            **(turns.held(*gap) if isinstance(turns, Turns) and gap else {})}


def _window(timeline: Timeline, start: float, end: float) -> list[tuple[float, float]]:
    """The gaps of ``timeline`` (their two tokens' times) that overlap ``[start, end]`` (seconds after it was sent)."""
    return [(a, b) for a, b in zip(timeline.tokens, timeline.tokens[1:]) if b - timeline.sent >= start and a - timeline.sent <= end]


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


async def open_loop(scheduler: Scheduler, rate: float, requests: int, methods: list[str], long_tokens: int) -> dict[str, Any]:
    """``requests`` arrivals ``1 / rate`` s apart: every third a long caption, every other one with a method."""
    plans = [{}, *({m: {}} for m in methods)]
    tasks = []
    start = time.perf_counter()
    for i in range(requests):
        kind, tokens = ("long", long_tokens) if i % 3 == 2 else ("short", 4)
        plan = plans[(i // 2) % len(plans)] if i % 2 else {}
        tasks.append(asyncio.ensure_future(_send(scheduler, _request(kind, tokens, i, plan))))
        await asyncio.sleep(max(start + (i + 1) / rate - time.perf_counter(), 0))
    timelines = await asyncio.gather(*tasks)
    served = [t for t in timelines if t.status == "ok" and t.tokens]
    gaps = [b - a for t in served for a, b in zip(t.tokens, t.tokens[1:])]
    wall = max(t.done for t in timelines) - start
    return {
        "rate_per_s": rate, "requests": requests, "refused": sum(t.status == "refused" for t in timelines),
        "failed": sum(t.status == "failed" for t in timelines),
        "ttft_s": _percentiles([t.tokens[0] - t.sent for t in served]), "per_token_s": _percentiles(gaps),
        "tokens_per_s": sum(len(t.tokens) for t in served) / wall,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement once per ``--step-budget`` (0: off, whole admissions between decode steps), on one engine;
    with ``--engine vllm``, once per ``--step-tokens`` on a vLLM engine started with it."""
    unknown = sorted(set(args.joiners or ()) - set(MethodRegistry.builtin()))
    if unknown:  # (a name no method has would run as a joiner whose every request fails)
        raise SystemExit(f"--joiners: no method named {', '.join(unknown)} (the plain joiner always runs, first)")
    before = _contention()
    result = _run_vllm(args) if getattr(args, "engine", "transformers") == "vllm" else _run_transformers(args)
    return {**result, "cpu_contention": {"before": before, "after": _contention()}}


def _contention() -> float | None:
    """This machine's CPU contention now (:mod:`~seeright.tools.cpu_contention`: how much one CPU slows while
    another is busy; on a shared VM it changes from hour to hour, and with it every gap here); None with one CPU."""
    return cpu_contention.measure(rounds=100)["ratio"] if len(os.sched_getaffinity(0)) > 1 else None


def _run_transformers(args: argparse.Namespace) -> dict[str, Any]:
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    methods = args.methods if args.methods is not None else engine.runnable(engine.methods.mixed_traffic())
    joiners = args.joiners or engine.runnable()
    runs = []
    for budget in args.step_budget:
        scheduler = Scheduler(engine, max_batch_size=args.max_batch_size, batch_wait_s=0.005, queue_size=args.queue_size,
                              step_budget=StepBudget(budget) if budget else None, timeline=Turns())
        scheduler.start()
        try:
            with frozen_heap():  # as the app serves it
                runs.append({"step_budget": budget or None, **asyncio.run(_measure(scheduler, methods, joiners, args))})
        finally:
            scheduler.stop()
    return {"model": args.model, "max_batch_size": args.max_batch_size, "runs": runs}


def _run_vllm(args: argparse.Namespace) -> dict[str, Any]:
    from seeright.service.settings import Settings
    from seeright.service.vllm.engine import VllmEngineClient, not_hosted

    async def measure(tokens: int, budget: float, threads: int | None) -> dict[str, Any]:
        settings = Settings(model=args.model, engine="vllm", max_batch_size=args.max_batch_size, queue_size=args.queue_size,
                            vllm_step_tokens=tokens or None, step_budget=budget or None, vllm_engine_threads=threads)
        client = VllmEngineClient.from_settings(settings)
        await client.start()
        try:
            hosted = [n for n in client.methods if not_hosted(client.methods[n], tower=client.tower) is None]
            methods = args.methods if args.methods is not None else [m for m in client.methods.mixed_traffic() if m in hosted]
            with frozen_heap():  # as the app serves it
                return {"step_tokens": tokens or None, "step_budget": budget or None, "paced": True,
                        **({} if threads is None else {"engine_threads": threads}),
                        **await _measure(client, methods, args.joiners or hosted, args)}
        finally:
            await client.stop()

    runs = [asyncio.run(measure(tokens, budget, threads)) for tokens in args.step_tokens for budget in args.step_budget
            for threads in args.engine_threads or [None]]
    return {"model": args.model, "engine": "vllm", "max_batch_size": args.max_batch_size, "runs": runs}


async def _measure(scheduler: Any, methods: list[str], joiners: list[str], args: argparse.Namespace) -> dict[str, Any]:
    await _send(scheduler, _request("short", 2, 999))  # warm-up
    result = {"short_behind_long": await short_behind_long(scheduler, args.short_tokens, args.long_tokens, args.delay, args.reps)}
    if args.joiners is not None:
        names = [None, *joiners]
        alone = await _send(scheduler, _request("long", args.joiner_stream_tokens, 199))  # the control: nothing joins
        result["joiners"] = [await _repeated(scheduler, name, i, alone, args) for i, name in enumerate(names)]
    for rate in args.rate:
        result.setdefault("open_loop", []).append(await open_loop(scheduler, rate, args.requests, methods, args.long_tokens))
    return result


async def _repeated(scheduler: Any, method: str | None, index: int, alone: Timeline, args: argparse.Namespace) -> dict[str, Any]:
    """``--joiner-repeats`` runs of one joiner (each its own seeds): the run whose ratio is the median (the lower
    one of an even count), with every run's ratio (``ratios``)."""
    runs = [await joiner(scheduler, method, args.joiner_stream_tokens, args.short_tokens, args.joiner_delay,
                         index + 100 * k, alone) for k in range(args.joiner_repeats)]
    ordered = sorted(runs, key=lambda r: r["ratio"])
    worst = {k: ordered[-1][k] for k in ("longest_gap_s", "ratio", "gap_work_s", "gap_step_s") if k in ordered[-1]}
    return {**ordered[(len(ordered) - 1) // 2], "ratios": [r["ratio"] for r in runs], "worst": worst}


def _budget(run: dict[str, Any]) -> str:
    if "engine_threads" in run:  # vLLM's engine core on a CPU, on as many torch threads as the run chose
        threads = run["engine_threads"]
        return f"{_budget({k: v for k, v in run.items() if k != 'engine_threads'})}, engine core on {threads} thread{'s' * (threads > 1)}"
    if "step_tokens" in run:  # the vLLM engine's budget, in tokens per step, and its client's tower work (since it had one)
        tokens = "off" if not run["step_tokens"] else f"{run['step_tokens']} tokens"
        if "step_budget" not in run:
            return tokens
        if run.get("paced") and tokens != "off":  # since the budget in time: step_budget paces the prompt tokens too
            if not run["step_budget"]:
                return f"{tokens}, tower work beside vLLM's steps"
            return f"{tokens} at most, {run['step_budget']:g}x a decode step of newcomer work per step"
        paused = "beside vLLM's steps" if not run["step_budget"] else f"in pauses of {run['step_budget']:g}x a decode step"
        return f"{tokens}, tower work {paused}"
    return "off" if not run["step_budget"] else f"{run['step_budget']:g}"


def table(result: dict[str, Any]) -> str:
    """The serving benchmark as Markdown, each measurement side by side for every step budget of the run."""
    runs = result.get("runs") or [{**result, "step_budget": None}]  # records from before step budgets: one run, off
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    if result.get("engine") == "vllm":
        head = (f"model {result['model']} on the vLLM engine, batch of {result['max_batch_size']}; step budget: tokens one "
                "step runs, decoding rows and newcomers' prompts together (off: vLLM's chunked prefill off, whole prompts)")
        if any(run.get("paced") for run in runs):
            head += ("; with `step_budget`, while rows decode each step takes the prompt tokens that the step budget "
                     "times the decode step's measured time holds (and at least 16), and the engine client's tower work "
                     "(a method's tower passes, VE masking's attack) runs with the engine paused between two steps, each "
                     "pause at most that budget; without, the token budget alone and the tower work beside the steps")
        elif any("step_budget" in run for run in runs):
            head += ("; the engine client's tower work (a method's tower passes, VE masking's attack) runs either beside "
                     "vLLM's steps or with the engine paused between two steps, each pause at most the step budget "
                     "times the decode step's time (`step_budget`)")
    else:
        head = (f"model {result['model']}, batch of {result['max_batch_size']}; step budget: newcomer work per decode "
                "step, x the decode step's time (off: whole admissions between two decode steps)")
    rows = [head, ""]
    if (contention := result.get("cpu_contention")) and contention["before"] is not None:
        rows += [f"one CPU's compute beside a busy one (`python -m seeright.tools.cpu_contention`): "
                 f"{contention['before']:.2f}x its time alone before the run, {contention['after']:.2f}x after", ""]
    for run in runs:
        s = run["short_behind_long"]
        rows.append(f"* step budget {_budget(run)}: a short request sent while a long one decodes: "
                    f"{s['short_behind_long_s']:.2f} s against {s['short_alone_s']:.2f} s alone ({s['ratio']:.2f}x)")
    if any(run.get("joiners") for run in runs):
        heads = [f"step budget {_budget(run)}" for run in runs if run.get("joiners")]
        tables = [run["joiners"] for run in runs if run.get("joiners")]
        windowed = any("alone_gap_s" in r for t in tables for r in t)  # records before it: every gap after the sending
        longest = ("its longest gap while the joiner was there, from its sending to its leaving (x its median gap; "
                   "alone: the longest gap of the same window in the same stream with nothing joining)" if windowed
                   else "its longest gap after the joiner was sent (x its median gap)")
        repeats = max(len(r.get("ratios", [])) for t in tables for r in t)
        of = f"; each the run of {repeats} whose ratio is the median, the worst run's ratio beside it" if repeats > 1 else ""
        rows += ["", f"A running stream while one request joins: {longest}, its median gap while the joiner decodes beside "
                 f"it (the grown batch's step), and the joiner's own time{of}:", "",
                 "| the request that joins | " + " | ".join(f"{h}: longest gap | beside | joiner's time" for h in heads) + " |",
                 "|---|" + "---|---|---|" * len(heads)]
        ms = lambda v: "-" if v is None else f"{v * 1000:.0f} ms"  # noqa: E731
        alone = lambda r: f"; alone {ms(r['alone_gap_s'])}" if r.get("alone_gap_s") is not None else ""  # noqa: E731
        worst = lambda r: f"; worst {max(r['ratios']):.1f}x" if len(r.get("ratios", [])) > 1 else ""  # noqa: E731
        for i, first in enumerate(tables[0]):
            cells = [f"{t[i]['longest_gap_s'] * 1000:.0f} ms ({t[i]['ratio']:.1f}x{worst(t[i])}{alone(t[i])})"
                     f"{'' if t[i].get('stream_outlasted', True) else ' †'}"
                     f" | {ms(t[i].get('beside_gap_s'))} | {t[i]['joined_s']:.2f} s" for t in tables]
            rows.append(f"| {first['joiner']} | " + " | ".join(cells) + " |")
        medians = ", ".join(f"{h}: {statistics.median(r['median_gap_s'] for r in t) * 1000:.0f} ms" for h, t in zip(heads, tables))
        rows += ["", f"median gap between the stream's tokens: {medians}"]
        if any("gap_work_s" in r for t in tables for r in t):
            rows += ["", "What each longest gap above held: the newcomer work that ran in it and its longest decode step of "
                     "the running rows (the scheduler's turns), and the same for the worst run:", "",
                     "| the request that joins | " + " | ".join(f"{h}: newcomer work + longest step" for h in heads) + " |",
                     "|---|" + "---|" * len(heads)]
            def held(r: dict[str, Any]) -> str:
                if "gap_work_s" not in r:
                    return "-"
                w = r.get("worst", {})
                worst = (f" (worst run: {ms(w['gap_work_s'])} + {ms(w['gap_step_s'])} of {ms(w['longest_gap_s'])})"
                         if "gap_work_s" in w and len(r.get("ratios", [])) > 1 else "")
                return f"{ms(r['gap_work_s'])} + {ms(r['gap_step_s'])}{worst}"

            for i, first in enumerate(tables[0]):
                rows.append(f"| {first['joiner']} | " + " | ".join(held(t[i]) for t in tables) + " |")
        if any(not r.get("stream_outlasted", True) for t in tables for r in t):
            rows += ["", "† the stream ended before the joiner did: its longest gap covers only part of the joiner's time "
                     "(a longer --joiner-stream-tokens covers it all)"]
    if any(run.get("open_loop") for run in runs):
        rows += ["", "| arrivals/s | step budget | refused | failed | TTFT p50 / p90 / p99 (s) | per token p50 / p90 / p99 (s) | tokens/s |",
                 "|---|---|---|---|---|---|---|"]
        loops = [(run, r) for run in runs for r in run.get("open_loop", [])]
        for run, r in sorted(loops, key=lambda x: x[1]["rate_per_s"]):
            ttft, tok = r["ttft_s"], r["per_token_s"]
            rows.append(f"| {r['rate_per_s']:g} | {_budget(run)} | {r['refused']} | {r['failed']} | "
                        f"{fmt(ttft['p50'])} / {fmt(ttft['p90'])} / {fmt(ttft['p99'])} | "
                        f"{fmt(tok['p50'])} / {fmt(tok['p90'])} / {fmt(tok['p99'])} | {r['tokens_per_s']:.1f} |")
    return "\n".join(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--short-tokens", type=int, default=4)
    parser.add_argument("--long-tokens", type=int, default=200)
    parser.add_argument("--delay", type=float, default=1.0, help="seconds between the long and the short request")
    parser.add_argument("--rate", type=float, nargs="*", default=[], help="open-loop arrival rates (requests/s)")
    parser.add_argument("--requests", type=int, default=24, help="arrivals per open-loop rate")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--queue-size", type=int, default=64)
    parser.add_argument("--step-budget", type=float, nargs="+", default=[0.0, StepBudget().ratio],
                        help="scheduler step budgets to measure side by side (newcomer work per decode step, x the decode "
                             "step's time; 0: off); --engine vllm: the prompt tokens per step beside decoding rows and "
                             "the engine client's tower work per pause of the engine (0: the token budget alone, the "
                             "tower work beside its steps), each with every --step-tokens")
    parser.add_argument("--step-tokens", type=int, nargs="+", default=[0, 512],
                        help="--engine vllm: per-step token budgets (at most, with a --step-budget) to measure side by "
                             "side, each on a vLLM engine of its own (0: chunked prefill off)")
    parser.add_argument("--engine-threads", type=int, nargs="*", metavar="N",
                        help="--engine vllm on a CPU: torch threads of vLLM's engine core to measure side by side, each "
                             "with every budget (default: the engine's own count: vllm_engine_threads)")
    parser.add_argument("--methods", nargs="*", help="methods of the open-loop mix (default: the registry's mixed loads)")
    parser.add_argument("--joiners", nargs="*", metavar="METHOD",
                        help="measure a plain stream's longest gap while a request joins: plain, then with each METHOD "
                             "(no METHOD: every method the model runs)")
    parser.add_argument("--joiner-stream-tokens", type=int, default=400,
                        help="tokens of the running stream (long enough to outlast the joiner)")
    parser.add_argument("--joiner-delay", type=float, default=1.5, help="seconds after the stream starts that one joins")
    parser.add_argument("--joiner-repeats", type=int, default=1,
                        help="runs per joiner (each with a stream of its own): the median run is reported, and every ratio")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench-random/llava")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--reps", type=int, default=3)
    add_arguments(parser)
    print(json.dumps(run(parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()
