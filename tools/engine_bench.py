"""``seeright bench --engine vllm``: the vLLM engine against the transformers engine on one text model.

Reported, in one run on the same machine:

* plain greedy decoding throughput (generated tokens per second of wall time) of each engine at batch 1 (one
  request at a time) and batch 8 (eight at once), and vLLM's over the transformers engine's;
* the cost of the head-scaling hook on vLLM, per generated token: with the hooks installed but no request
  using them (every request's cost on ``--engine vllm``), and with every request scaling heads (VHR with fixed
  heads, half the heads of every layer), both against the same vLLM engine before the hooks were installed.

Each figure is the median of ``reps`` rounds. Prompts are fixed; rows stop at EOS or ``new_tokens``, and only
tokens actually generated count.
"""

from __future__ import annotations

import asyncio
import gc
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from seeright.model_zoo import builtin_model, resolve_model_path
from seeright.service.engine import Engine, GenerationRequest

DEFAULT_MODEL = "seeright/smollm2-135m-instruct"
BATCHES = (1, 8)
PROMPTS = (
    "Write a short story about a lighthouse keeper.", "Explain how a bicycle works.", "List some facts about the moon.",
    "Describe a busy market in the morning.", "What makes a good cup of tea?", "Tell me about the history of maps.",
    "How do bees make honey?", "Describe a walk through a forest in autumn.",
)


def _requests(batch: int, new_tokens: int, interventions: dict[str, Any] | None = None) -> list[GenerationRequest]:
    return [GenerationRequest(prompt=PROMPTS[i % len(PROMPTS)], max_new_tokens=new_tokens, interventions=interventions or {})
            for i in range(batch)]


def _median_rate(runs: list[tuple[int, float]]) -> float:
    return statistics.median(tokens / seconds for tokens, seconds in runs)


def _transformers(model: str, new_tokens: int, reps: int) -> dict[int, float]:
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
    del engine
    gc.collect()
    return rates


async def _vllm(model: str, new_tokens: int, reps: int) -> dict[str, Any]:
    from seeright.service.settings import Settings
    from seeright.service.vllm.engine import VllmEngineClient

    client = VllmEngineClient.from_settings(Settings(model=model, engine="vllm", max_batch_size=max(BATCHES)))
    info = client.spec.info
    heads = {str(layer): list(range(0, info.num_heads, 2)) for layer in range(info.num_layers)}
    await client.start(install=False)

    async def rate(batch: int, interventions: dict[str, Any] | None = None) -> tuple[float, float]:
        runs = []
        for _ in range(reps):
            start = time.perf_counter()
            outs = await asyncio.gather(*(client.generate(r) for r in _requests(batch, new_tokens, interventions)))
            runs.append((sum(len(o.token_ids) for o in outs), time.perf_counter() - start))
        tokens = statistics.median(t for t, _ in runs)
        return _median_rate(runs), tokens

    try:
        await client.generate(_requests(1, 4)[0])  # warm-up
        plain = {b: await rate(b) for b in BATCHES}
        await client.install()
        idle = {b: await rate(b) for b in BATCHES}
        scaled = {b: await rate(b, {"vhr": {"heads": heads, "alpha": 2.0}}) for b in BATCHES}
    finally:
        await client.stop()
    return {"plain": plain, "hooks_idle": idle, "vhr_fixed_heads": scaled}


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


def run(model: str = DEFAULT_MODEL, new_tokens: int = 64, reps: int = 3) -> dict[str, Any]:
    """Both engines on ``model`` (a folder vLLM can load: built-in random models are saved to a temporary one)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, _stdout_to_stderr():
        if builtin_model(model) is not None:
            Engine.from_pretrained(model).save_pretrained(Path(tmp))
            model = tmp
        hf = _transformers(resolve_model_path(model), new_tokens, reps)
        vllm = asyncio.run(_vllm(model, new_tokens, reps))
    rows = {}
    for batch in BATCHES:
        plain, _ = vllm["plain"][batch]
        per_token = lambda r: 1000 / r  # noqa: E731 - ms of wall time per generated token (batch-wide)
        rows[batch] = {
            "transformers_tokens_per_s": hf[batch], "vllm_tokens_per_s": plain, "vllm_over_transformers": plain / hf[batch],
            "hook_idle_ms_per_token": per_token(vllm["hooks_idle"][batch][0]) - per_token(plain),
            "hook_vhr_ms_per_token": per_token(vllm["vhr_fixed_heads"][batch][0]) - per_token(plain),
            "vllm_hooks_idle_tokens_per_s": vllm["hooks_idle"][batch][0],
            "vllm_vhr_tokens_per_s": vllm["vhr_fixed_heads"][batch][0],
        }
    return {"model": model, "new_tokens": new_tokens, "reps": reps, "batches": rows}


def table(result: dict[str, Any]) -> str:
    lines = [
        f"model {result['model']}, up to {result['new_tokens']} new tokens, median of {result['reps']}",
        "| batch | transformers tok/s | vLLM tok/s | vLLM / transformers | hook idle, ms/token | VHR hook, ms/token |",
        "|---|---|---|---|---|---|",
    ]
    for batch, row in result["batches"].items():
        lines.append(
            f"| {batch} | {row['transformers_tokens_per_s']:.1f} | {row['vllm_tokens_per_s']:.1f} | "
            f"{row['vllm_over_transformers']:.2f}x | {row['hook_idle_ms_per_token']:+.3f} | {row['hook_vhr_ms_per_token']:+.3f} |"
        )
    return "\n".join(lines)
