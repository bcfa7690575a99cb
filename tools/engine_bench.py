"""``seeright bench --engine vllm``: the vLLM engine beside the transformers engine, on the default vision-language
model with an image, in one run on the same machine.

* plain greedy decoding throughput (generated tokens per second of wall time) of each engine at batch 1 and 8;
* per method the worker hosts, its decode time per token over plain decoding on the same engine, for both engines
  (the time between a request's first and last streamed token over the tokens between them: prefill and
  analysis passes excluded; guided decoding streams a chunk at a time, so its span runs from its first chunk's
  arrival to its last's), at batch 1, in rounds: each round streams a plain request and then one per method,
  and a method's figure is the median over rounds of its time over the same round's plain time (a slow spell of
  a shared machine then moves a round's plain and method times together instead of one method's figure);
* on vLLM, the same rounds' decode forwards as the worker times them (its first layer to the sampled token, the
  median of the request's forwards), over plain's: the method's cost in the worker, without the scheduling, output
  processing and API process that share the cores and make the streamed figure noisy;
* the cost of the idle hooks on vLLM (installed, no request using them) per token, against the same vLLM engine
  without them, the two in turn (the hooks taken out and put back each round), the median of the rounds' ratios;
* the tokens/s of the plain half of a vLLM batch of 8 whose other half carries methods (their tokens over the time
  until the last of them ends: the method rows may run on after it), against the same 8 requests without the
  methods (both with the hooks installed), the two batches run in turn, the median of the rounds' ratios;
* on a CPU, plain decoding with vLLM's worker in a process of its own (vLLM's CPU default) against the worker in
  the engine core, as seeright runs it (:func:`~seeright.service.vllm.engine.worker_in_engine_core`).

Each figure is the median of ``reps`` rounds; rows stop at EOS or ``new_tokens``.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from importlib import resources
from typing import Any

from PIL import Image

from seeright.service.engine import Engine, GenerationRequest

DEFAULT_MODEL = "seeright/shapes-smol"
BATCHES = (1, 8)
PROMPTS = ("Describe the image.", "What shapes are there?", "Name the colours in the image.", "Describe the image in detail.")
CONTRAST_VARIANTS = {"pai+cfg": {"pai": {"cfg": True}}}  # a contrast branch of a method whose defaults have none
PAIRED = ", the median of each round's ratio"  # records since rounds pair each method with a plain run
MIXED = ("var", "vhr", "gift", "pai")  # the method half of the mixed batch (edits in every decode step, no extra rows)


def method_settings() -> dict[str, dict[str, Any]]:
    """Each method the vLLM worker hosts, at its defaults, by name (and the contrast variants)."""
    from seeright.interventions.registry import MethodRegistry
    from seeright.service.vllm.engine import not_hosted

    methods = MethodRegistry.builtin()
    hosted = {name: {name: {}} for name in methods if not_hosted(methods[name], tower=True) is None}  # LLaVA: a tower
    return {**hosted, **CONTRAST_VARIANTS}


def _image() -> Image.Image:
    return Image.open(resources.files("seeright.service") / "ui" / "examples" / "shapes-1.png").convert("RGB")


def _requests(batch: int, new_tokens: int, interventions: dict[str, Any] | None = None) -> list[GenerationRequest]:
    image = _image()
    return [GenerationRequest(prompt=PROMPTS[i % len(PROMPTS)], images=[image], max_new_tokens=new_tokens,
                              interventions=interventions or {}) for i in range(batch)]


def _median_rate(runs: list[tuple[int, float]]) -> float:
    return statistics.median(tokens / seconds for tokens, seconds in runs)


def _per_token(times: list[float]) -> float | None:
    """Seconds per decoded token from a request's token arrival times (first token, i.e. prefill, excluded)."""
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None


def _over_plain(rounds: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per setting, from rounds of seconds per token (each with ``"plain"``): the median seconds and the median
    of each round's time over that round's plain time."""
    return {name: {"seconds": statistics.median(r[name] for r in rounds),
                   "over_plain": statistics.median(r[name] / r["plain"] for r in rounds)} for name in rounds[0]}


def _engine_per_token(engine: Engine, interventions: dict[str, Any] | None, new_tokens: int) -> float | None:
    """Seconds per decoded token of one request on the transformers engine."""
    times: list[float] = []
    engine.generate_batch(_requests(1, new_tokens, interventions), on_token=lambda row, tok: times.append(time.perf_counter()))
    return _per_token(times)


def _transformers(model: str, new_tokens: int, reps: int) -> dict[str, Any]:
    engine = Engine.from_pretrained(model)
    engine.generate_batch(_requests(1, 4))  # warm-up
    rates = {}
    for batch in BATCHES:
        runs = []
        for _ in range(reps):
            start = time.perf_counter()
            outs = engine.generate_batch(_requests(batch, new_tokens))
            runs.append((sum(len(o.token_ids) for o in outs), time.perf_counter() - start))
        rates[batch] = _median_rate(runs)
    settings = {"plain": None, **method_settings()}
    per_token = _over_plain([{name: _engine_per_token(engine, i, new_tokens) for name, i in settings.items()}
                             for _ in range(reps)])
    del engine
    gc.collect()
    return {"rates": rates, "per_token": per_token}


async def _started_client(model: str, block_size: int | None = None) -> Any:
    """A vLLM engine client on ``model`` (KV blocks of ``block_size`` tokens; none: vLLM's default), started without
    the hooks (``install()`` adds them)."""
    from seeright.service.settings import Settings
    from seeright.service.vllm.engine import VllmEngineClient

    client = VllmEngineClient.from_settings(Settings(model=model, engine="vllm", max_batch_size=max(BATCHES),
                                                     vllm_block_size=block_size))
    await client.start(install=False)
    return client


async def _rate(client: Any, requests: list[GenerationRequest], reps: int) -> float:
    """Median tokens/s of ``requests`` sent at once."""
    runs = []
    for _ in range(reps):
        start = time.perf_counter()
        outs = await asyncio.gather(*(client.generate(r) for r in requests))
        runs.append((sum(len(o.token_ids) for o in outs), time.perf_counter() - start))
    return _median_rate(runs)


async def _rows_rate(client: Any, requests: list[GenerationRequest], rows: list[int]) -> float:
    """Tokens/s of ``requests[rows]`` with all of ``requests`` sent at once: their tokens over the time until the
    last of them ended (the other rows may run on after it)."""
    start = time.perf_counter()

    async def ended(request: GenerationRequest) -> tuple[int, float]:
        out = await client.generate(request)
        return len(out.token_ids), time.perf_counter() - start

    done = await asyncio.gather(*(ended(requests[i]) for i in rows), *(client.generate(r) for i, r in
                                                                       enumerate(requests) if i not in rows))
    return sum(tokens for tokens, _ in done[:len(rows)]) / max(took for _, took in done[:len(rows)])


async def _stream_per_token(client: Any, interventions: dict[str, Any] | None, new_tokens: int, reps: int = 1) -> float:
    """Median seconds per decoded token of one streamed request."""
    samples = []
    for _ in range(reps):
        times = []
        async for _ in client.stream(_requests(1, new_tokens, interventions)[0]):
            times.append(time.perf_counter())
        samples.append(_per_token(times))
    return statistics.median(x for x in samples if x is not None)


async def _stream_and_forwards(client: Any, interventions: dict[str, Any] | None, new_tokens: int) -> tuple[float, float]:
    """One streamed request's seconds per decoded token, and the median time of its decode forwards as the worker
    timed them (first layer to sampled token: without vLLM's scheduling, its output processing and the API process,
    which share this machine's cores and move the streamed figure)."""
    await client.llm.collective_rpc("seeright_decode_times")  # (what earlier requests left)
    per_token = await _stream_per_token(client, interventions, new_tokens)
    times = (await client.llm.collective_rpc("seeright_decode_times"))[0]
    return per_token, statistics.median(times) if times else math.nan


async def _vllm(model: str, new_tokens: int, reps: int, block_size: int | None) -> dict[str, Any]:
    client = await _started_client(model, block_size)
    try:
        await client.generate(_requests(1, 4)[0])  # warm-up
        plain_token = await _stream_per_token(client, None, new_tokens, reps)
        plain, idle = {b: [] for b in BATCHES}, {b: [] for b in BATCHES}
        for _ in range(reps):  # without the hooks, then with them idle, in turn
            await client.uninstall()
            for b in BATCHES:
                plain[b].append(await _rate(client, _requests(b, new_tokens), 1))
            await client.install()
            for b in BATCHES:
                idle[b].append(await _rate(client, _requests(b, new_tokens), 1))
        settings = {"plain": None, **method_settings()}
        rounds, forwards = [], []
        for _ in range(reps):
            timed = {name: await _stream_and_forwards(client, i, new_tokens) for name, i in settings.items()}
            rounds.append({name: per_token for name, (per_token, _) in timed.items()})
            forwards.append({name: forward for name, (_, forward) in timed.items()})
        mixing = [{name: {}} for name in MIXED]
        half = [r if i % 2 == 0 else replace(r, interventions=mixing[i // 2 % len(mixing)])
                for i, r in enumerate(_requests(8, new_tokens))]
        plain_half = [i for i, r in enumerate(half) if not r.interventions]
        mixed = []
        for _ in range(reps):  # the plain half's rows beside the methods, then beside the same requests without them
            beside = await _rows_rate(client, half, plain_half)
            mixed.append(beside / await _rows_rate(client, _requests(8, new_tokens), plain_half))
    finally:
        await client.stop()
    return {"plain": {b: statistics.median(r) for b, r in plain.items()}, "plain_per_token_before_hooks": plain_token,
            "hooks_idle": {b: statistics.median(r) for b, r in idle.items()},
            "hooks_idle_cost": {b: statistics.median(p / i - 1 for p, i in zip(plain[b], idle[b])) for b in BATCHES},
            "per_token": _over_plain(rounds), "forward": _over_plain(forwards),
            "mixed_plain_half_over_plain_batch": statistics.median(mixed)}


async def _plain_only(model: str, new_tokens: int, reps: int, block_size: int | None) -> dict[str, float]:
    """Plain per-token decode time at batch 1 and tokens/s at batch 8, without the hooks."""
    client = await _started_client(model, block_size)
    try:
        await client.generate(_requests(1, 4)[0])  # warm-up
        return {"ms_per_token": 1000 * await _stream_per_token(client, None, new_tokens, reps),
                "batch8_tokens_per_s": await _rate(client, _requests(8, new_tokens), reps)}
    finally:
        await client.stop()


def _worker_process(model: str, new_tokens: int, reps: int, block_size: int | None) -> dict[str, float] | None:
    """On a CPU, plain vLLM with its worker in a process of its own (vLLM's CPU default); None on a GPU or where
    the user chose the layout (``VLLM_ENABLE_V1_MULTIPROCESSING`` set)."""
    import torch

    from seeright.service.vllm.engine import MULTIPROCESSING_VARIABLE

    if torch.cuda.is_available() or MULTIPROCESSING_VARIABLE in os.environ:
        return None
    os.environ[MULTIPROCESSING_VARIABLE] = "1"
    try:
        return asyncio.run(_plain_only(model, new_tokens, reps, block_size))
    finally:
        del os.environ[MULTIPROCESSING_VARIABLE]


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """vLLM's processes log to stdout (file descriptor 1): keep it for the result."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run(model: str = DEFAULT_MODEL, new_tokens: int = 48, reps: int = 3, block_size: int | None = None) -> dict[str, Any]:
    """Both engines on ``model`` (a built-in model is exported to a folder vLLM loads, as ``serve`` does); vLLM's KV
    blocks of ``block_size`` tokens (none: vLLM's default for the device)."""
    from seeright.service.vllm.engine import vllm_folder

    with _stdout_to_stderr():
        folder = vllm_folder(model)
        hf = _transformers(folder, new_tokens, reps)
        separate = _worker_process(model, new_tokens, reps, block_size)  # before the runs below set the engine-core layout
        vllm = asyncio.run(_vllm(model, new_tokens, reps, block_size))
    batches = {
        batch: {"transformers_tokens_per_s": hf["rates"][batch], "vllm_tokens_per_s": vllm["plain"][batch],
                "vllm_hooks_idle_tokens_per_s": vllm["hooks_idle"][batch]}
        for batch in BATCHES
    }
    for row in batches.values():
        row["vllm_over_transformers"] = row["vllm_tokens_per_s"] / row["transformers_tokens_per_s"]
    for batch, row in batches.items():
        row["hooks_idle_cost"] = vllm["hooks_idle_cost"][batch]
    methods = {
        name: {"transformers_over_plain": hf["per_token"][name]["over_plain"],
               "vllm_over_plain": vllm["per_token"][name]["over_plain"],
               "vllm_ms_per_token": 1000 * vllm["per_token"][name]["seconds"],
               "vllm_forward_over_plain": vllm["forward"][name]["over_plain"],
               "vllm_forward_ms": 1000 * vllm["forward"][name]["seconds"],
               "transformers_ms_per_token": 1000 * hf["per_token"][name]["seconds"]}
        for name in method_settings()
    }
    processes = None if separate is None else {
        "worker_process": separate,
        "worker_in_engine_core": {"ms_per_token": 1000 * vllm["plain_per_token_before_hooks"],
                                  "batch8_tokens_per_s": vllm["plain"][8]},
    }
    if processes is not None:
        inside = processes["worker_in_engine_core"]
        processes["speedup_batch1"] = separate["ms_per_token"] / inside["ms_per_token"]
        processes["speedup_batch8"] = inside["batch8_tokens_per_s"] / separate["batch8_tokens_per_s"]
    return {"model": model, "new_tokens": new_tokens, "reps": reps, "block_size": block_size, "paired_rounds": True,
            "batches": batches, "methods": methods,
            "plain_ms_per_token": {"transformers": 1000 * hf["per_token"]["plain"]["seconds"],
                                   "vllm": 1000 * vllm["per_token"]["plain"]["seconds"],
                                   "vllm_forward": 1000 * vllm["forward"]["plain"]["seconds"]},
            "mixed_plain_half_over_plain_batch": vllm["mixed_plain_half_over_plain_batch"], "cpu_worker_processes": processes}


def table(result: dict[str, Any]) -> str:
    lines = [
        (f"model {result['model']} with an image, up to {result['new_tokens']} new tokens, median of {result['reps']}"
         + (f"; vLLM's KV blocks of {result['block_size']} tokens" if result.get("block_size") else "")),
        "",
        "| batch | transformers tok/s | vLLM tok/s | vLLM / transformers | vLLM, hooks idle | idle hooks' cost |",
        "|---|---|---|---|---|---|",
    ]
    for batch, row in result["batches"].items():
        lines.append(f"| {batch} | {row['transformers_tokens_per_s']:.1f} | {row['vllm_tokens_per_s']:.1f} | "
                     f"{row['vllm_over_transformers']:.2f}x | {row['vllm_hooks_idle_tokens_per_s']:.1f} | {100 * row['hooks_idle_cost']:+.1f}% |")
    plain = result["plain_ms_per_token"]
    lines += [
        "",
        (f"Decode time per token over plain decoding on the same engine, batch 1{PAIRED if result.get('paired_rounds') else ''} "
         f"(plain: transformers {plain['transformers']:.1f} ms, vLLM {plain['vllm']:.1f} ms):"),
        "",
        "| method | transformers | vLLM | vLLM ms/token | vLLM's forward |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["methods"].items():
        forward = f"{row['vllm_forward_over_plain']:.2f}x" if "vllm_forward_over_plain" in row else "-"
        lines.append(f"| {name} | {row['transformers_over_plain']:.2f}x | {row['vllm_over_plain']:.2f}x | "
                     f"{row['vllm_ms_per_token']:.1f} | {forward} |")
    if "vllm_forward" in plain:
        lines += ["", (f"vLLM's forward: the worker's decode forwards of the request (first layer to sampled token, "
                       f"median), over plain's in the same round (plain: {plain['vllm_forward']:.1f} ms); the rest of "
                       "a streamed token's time is vLLM's scheduling and output processing and the API process.")]
    if "mixed_plain_half_over_plain_batch" in result:
        lines += ["", ("The plain half's tokens/s (until its last row ends) in a vLLM batch of 8 whose other half carries "
                       f"methods, over the same 8 requests without them: {result['mixed_plain_half_over_plain_batch']:.2f}x")]
    else:  # (records before 2026-12-07: until every row ended, against 8 plain rows of other prompts)
        mixed = result["mixed_half_plain_rows_over_all_plain"]
        lines += ["", f"Plain rows' tokens/s per row in a vLLM batch of 8 whose other half carries methods, over 8 plain rows: {mixed:.2f}x"]
    if processes := result.get("cpu_worker_processes"):
        separate, inside = processes["worker_process"], processes["worker_in_engine_core"]
        lines += [
            "", ("Plain vLLM on this CPU, the worker in a process of its own (vLLM's default) or in the engine core "
                 "(seeright's):"), "",
            "| worker | ms/token, batch 1 | tok/s, batch 8 |", "|---|---|---|",
            f"| own process | {separate['ms_per_token']:.1f} | {separate['batch8_tokens_per_s']:.1f} |",
            f"| in the engine core | {inside['ms_per_token']:.1f} | {inside['batch8_tokens_per_s']:.1f} |",
            f"| speed-up | {processes['speedup_batch1']:.2f}x | {processes['speedup_batch8']:.2f}x |",
        ]
    return "\n".join(lines)
