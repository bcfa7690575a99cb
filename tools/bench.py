"""``seeright bench``: what each intervention costs, as ratios to a baseline measured in the same process.

All timing runs happen in one process, interleaved (baseline, then each registered method, baseline, ...),
after warm-up rounds; each figure is the median over repetitions. Per-token decode time is the time
between the first and the last streamed token divided by the tokens in between (guided decoding streams a chunk
at a time, so a median gap would read zero); request time covers
everything from the request to its last token (extra passes included). The baseline is the same
engine with no intervention (its hooks return at their first check); its own cost over stock
``transformers`` generation is reported as ``runtime_overhead`` for the built-in models.

Peak memory: the most bytes a request holds allocated above what was allocated before it. On CUDA that
is ``max_memory_allocated``; on CPU, where torch keeps no such counter, the allocation timeline of the
profiler (each op's allocated-minus-freed bytes, in order). Both count tensors, not the model's weights.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from torch.profiler import ProfilerActivity, profile

from seeright.interventions.registry import MethodRegistry
from seeright.model_zoo import builtin_model
from seeright.service.engine import Engine, GenerationRequest

PROMPT = "Describe the image in detail: which objects are there, what colors do they have and where are they?"


def mixed_batch(engine: Engine) -> tuple[str, ...]:
    """Eight rows: no method, then each method of the mixed loads this model runs, repeated."""
    names = ("none", *engine.runnable(engine.methods.mixed_traffic()))
    return tuple(names[i % len(names)] for i in range(8))


def bench_image(size: int = 336, seed: int = 0) -> Image.Image:
    """A scene of coloured shapes on a textured background."""
    rng = np.random.RandomState(seed)
    image = Image.fromarray((rng.rand(size, size, 3) * 60 + 150).astype("uint8"))
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        x, y, r = rng.randint(0, size, 2).tolist() + [int(rng.randint(size // 12, size // 5))]
        color = tuple(int(c) for c in rng.randint(0, 255, 3))
        (draw.ellipse if rng.rand() < 0.5 else draw.rectangle)([x - r, y - r, x + r, y + r], fill=color)
    return image


@dataclass
class Run:
    request_s: float
    decode_s_per_token: float
    tokens: int


def timed(engine: Engine, requests: list[GenerationRequest]) -> tuple[float, list[list[float]], list]:
    """Wall time of one batch and the arrival time of every streamed token per row; every run starts with the
    engine's analysis cache empty (as for a new image), so that a method's own passes are always timed."""
    engine.passes.cache.clear()
    stamps: list[list[float]] = [[] for _ in requests]
    start = time.perf_counter()
    outs = engine.generate_batch(requests, on_token=lambda row, tok: stamps[row].append(time.perf_counter()))
    return time.perf_counter() - start, stamps, outs


def one(engine: Engine, name: str, image: Image.Image, new_tokens: int, adapter: str | None = None) -> Run:
    interventions = {} if name == "none" else {name: {}}
    req = GenerationRequest(prompt=PROMPT, images=[image], interventions=interventions, max_new_tokens=new_tokens,
                            adapter=adapter)
    wall, stamps, outs = timed(engine, [req])
    return Run(wall, token_gap(stamps[0]), len(outs[0].token_ids))


def token_gap(stamps: list[float]) -> float:
    """Time per token after the first: from the first streamed token to the last, over the tokens in between."""
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_lora(engine: Engine, folder: Path, rank: int = 16, seed: int = 0, scale: float = 0.05) -> Path:
    """A random LoRA adapter in PEFT's file layout (without PEFT) on every attention and MLP linear layer of the
    engine's language model: ``A ~ N(0, 1/in)``, ``B ~ N(0, scale^2)``, ``lora_alpha = 2r``."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, linear in engine.runtime.lora_modules.items():
        if name.rsplit(".", 1)[-1] in LORA_TARGETS:
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=generator) / linear.in_features ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=generator) * scale
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(LORA_TARGETS),
              "bias": "none", "base_model_name_or_path": engine.model_id, "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def adapter_costs(engine: Engine, image: Image.Image, new_tokens: int, reps: int, warmup: int, rank: int = 16) -> dict[str, float]:
    """What LoRA adapters cost (rank ``rank`` on every attention and MLP layer): an adapter row's decode time per
    token and request time over a base row's, and the tokens/s of a batch of 8 rows on 4 adapters (two rows each)
    over the same batch on the base model."""
    names = [f"bench-lora-{i}" for i in range(4)]
    with tempfile.TemporaryDirectory() as folder:
        for i, name in enumerate(names):
            engine.load_lora(name, write_random_lora(engine, Path(folder) / name, rank, seed=i), max_rank=rank)
    runs: dict[str, list[Run]] = {"base": [], "adapter": []}
    tps: dict[str, list[float]] = {"base": [], "adapters": []}
    try:
        for rep in range(warmup + reps):
            for kind, adapter in (("base", None), ("adapter", names[0])):
                run = one(engine, "none", image, new_tokens, adapter)
                if rep >= warmup:
                    runs[kind].append(run)
            for kind, row_adapters in (("base", [None] * 8), ("adapters", [names[i % 4] for i in range(8)])):
                batch = [GenerationRequest(prompt=PROMPT, images=[image], max_new_tokens=new_tokens, adapter=a) for a in row_adapters]
                wall, _, outs = timed(engine, batch)
                if rep >= warmup:
                    tps[kind].append(sum(len(o.token_ids) for o in outs) / wall)
    finally:
        for name in names:
            engine.unload_lora(name)
    return {
        "rank": rank,
        "decode_ratio": median([r.decode_s_per_token for r in runs["adapter"]]) / median([r.decode_s_per_token for r in runs["base"]]),
        "request_ratio": median([r.request_s for r in runs["adapter"]]) / median([r.request_s for r in runs["base"]]),
        "batch_tokens_per_s": median(tps["adapters"]),
        "batch_vs_base_ratio": median(tps["adapters"]) / median(tps["base"]),
    }


def stock_run(model: torch.nn.Module, engine: Engine, image: Image.Image, new_tokens: int) -> Run:
    """Stock ``generate`` on an untouched copy of the model (same inputs, same greedy decoding)."""
    prompt = engine.encode(GenerationRequest(prompt=PROMPT, images=[image]).chat(), [image])
    stamps: list[float] = []

    class Stamps:
        def put(self, value: Any) -> None:
            stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**engine.collate([prompt]), max_new_tokens=new_tokens, do_sample=False,
                             streamer=Stamps(), pad_token_id=engine.tokenizer.pad_token_id, eos_token_id=engine.eos_token_ids())
    wall = time.perf_counter() - start
    return Run(wall, token_gap(stamps[1:]), out.shape[1] - len(prompt.input_ids))  # the first put is the prompt


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_bytes(engine: Engine, name: str, image: Image.Image, new_tokens: int) -> float:
    """Peak bytes the request allocates above what was allocated before it."""
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        one(engine, name, image, new_tokens)
        return float(torch.cuda.max_memory_allocated() - base)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        one(engine, name, image, new_tokens)
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:  # the allocation timeline: bytes each op kept (allocated minus freed), in order
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return float(peak)


def memory_ratios(engine: Engine, image: Image.Image, new_tokens: int) -> dict[str, Any]:
    peaks = {n: peak_bytes(engine, n, image, new_tokens) for n in ("none", *engine.runnable())}
    return {"peak_bytes": peaks, "memory_ratio": {m: peaks[m] / peaks["none"] for m in engine.runnable()}}


def reference_ratios(methods: MethodRegistry, new_tokens: int = 6) -> dict[str, float]:
    """Request time with each method's literal loops / with the fast method, on ``tiny-random/llava``
    (methods that declare a literal version)."""
    engine = Engine.from_pretrained("tiny-random/llava", methods=methods)
    fast = engine.methods
    image = bench_image(48)
    out = {}
    for name in fast:
        literal = fast.literal(name)
        if literal is None:
            continue
        times = {"fast": [], "reference": []}
        for _ in range(2):
            for kind, methods in (("fast", fast), ("reference", fast.with_methods(literal))):
                engine.methods = methods
                times[kind].append(one(engine, name, image, new_tokens).request_s)
        out[name] = median(times["reference"][1:] or times["reference"]) / median(times["fast"][1:] or times["fast"])
    engine.methods = fast
    return out


def run_bench(
    model_id: str, new_tokens: int, reps: int, warmup: int, device: str, dtype: str, memory: bool, reference: bool,
    batch_reps: int = 3, methods: MethodRegistry | None = None,
) -> dict[str, Any]:
    engine = Engine.from_pretrained(model_id, device=device, dtype=dtype, methods=methods)
    image = bench_image()
    built = builtin_model(model_id, device=device)
    stock = built[0].to(device=device, dtype=engine.model.dtype) if built is not None else None
    names = ("none", *engine.runnable())  # a method this model refuses (PAINT without [CLS]) has no row
    runs: dict[str, list[Run]] = {n: [] for n in (*names, "stock")}
    for rep in range(warmup + reps):
        for name in names:
            run = one(engine, name, image, new_tokens)
            if rep >= warmup:
                runs[name].append(run)
        if stock is not None:
            run = stock_run(stock, engine, image, new_tokens)
            if rep >= warmup:
                runs["stock"].append(run)

    decode = {n: median([r.decode_s_per_token for r in runs[n]]) for n in names}
    request = {n: median([r.request_s for r in runs[n]]) for n in names}
    result: dict[str, Any] = {
        "model": model_id,
        "device": device,
        "dtype": dtype,
        "new_tokens": new_tokens,
        "prompt_tokens": len(engine.encode(GenerationRequest(prompt=PROMPT, images=[image]).chat(), [image]).input_ids),
        "reps": reps,
        "decode_ratio": {m: decode[m] / decode["none"] for m in names[1:]},
        "request_ratio": {m: request[m] / request["none"] for m in names[1:]},
        "baseline": {"decode_ms_per_token": 1000 * decode["none"], "request_s": request["none"]},
        "tokens": {n: [r.tokens for r in runs[n]] for n in names},
    }
    if stock is not None:
        result["runtime_overhead"] = {
            "decode_ratio": decode["none"] / median([r.decode_s_per_token for r in runs["stock"]]),
            "request_ratio": request["none"] / median([r.request_s for r in runs["stock"]]),
        }
    result["batch"] = batch_throughput(engine, image, new_tokens, batch_reps, warmup, runs)
    result["adapters"] = adapter_costs(engine, image, new_tokens, batch_reps, warmup)
    if memory:
        result.update(memory_ratios(engine, image, new_tokens))
    if reference:
        result["reference_ratio"] = reference_ratios(engine.methods)
    return result


def batch_throughput(
    engine: Engine, image: Image.Image, new_tokens: int, reps: int, warmup: int, single: dict[str, list[Run]]
) -> dict[str, float]:
    """Tokens/s of 8 requests: mixed methods in one batch, no methods in one batch, and the same 8 mixed
    requests one by one (from the single-request medians of this run)."""

    def requests(names: tuple[str, ...]) -> list[GenerationRequest]:
        return [
            GenerationRequest(prompt=PROMPT, images=[image], interventions={} if n == "none" else {n: {}}, max_new_tokens=new_tokens)
            for n in names
        ]

    mixed = mixed_batch(engine)
    tps: dict[str, list[float]] = {"mixed": [], "uniform": []}
    for rep in range(warmup + reps):
        for kind, names in (("mixed", mixed), ("uniform", ("none",) * len(mixed))):
            wall, _, outs = timed(engine, requests(names))
            if rep >= warmup:
                tps[kind].append(sum(len(o.token_ids) for o in outs) / wall)
    tokens = sum(median([r.tokens for r in single[n]]) for n in mixed)
    seconds = sum(median([r.request_s for r in single[n]]) for n in mixed)
    m = {k: median(v) for k, v in tps.items()} | {"sequential": tokens / seconds}
    return {
        "mixed_tokens_per_s": m["mixed"],
        "uniform_tokens_per_s": m["uniform"],
        "sequential_tokens_per_s": m["sequential"],
        "mixed_vs_uniform_ratio": m["mixed"] / m["uniform"],
        "mixed_vs_sequential_ratio": m["mixed"] / m["sequential"],
        "uniform_vs_sequential_ratio": m["uniform"] / m["sequential"],  # what batching itself buys here
    }


def table(result: dict[str, Any]) -> str:
    rows = [f"model {result['model']} on {result['device']} ({result['dtype']}), {result['prompt_tokens']} prompt tokens, "
            f"{result['new_tokens']} new tokens, median of {result['reps']}",
            f"baseline: {result['baseline']['decode_ms_per_token']:.2f} ms/token, {result['baseline']['request_s']:.3f} s/request",
            "", "| method | decode/token | request | peak memory | fast vs literal |", "|---|---|---|---|---|"]
    for m in result["decode_ratio"]:
        mem = result.get("memory_ratio", {}).get(m)
        refr = result.get("reference_ratio", {}).get(m)
        rows.append(f"| {m} | {result['decode_ratio'][m]:.3f}x | {result['request_ratio'][m]:.3f}x | "
                    f"{'-' if mem is None else f'{mem:.3f}x'} | {'-' if refr is None else f'{refr:.1f}x faster'} |")
    b = result["batch"]
    rows += ["", f"batch of 8, mixed methods: {b['mixed_tokens_per_s']:.1f} tok/s = {b['mixed_vs_uniform_ratio']:.3f}x the same "
             f"batch without methods, {b['mixed_vs_sequential_ratio']:.2f}x the 8 requests one by one "
             f"(batching alone, no methods: {b['uniform_vs_sequential_ratio']:.2f}x)"]
    if "adapters" in result:
        a = result["adapters"]
        rows.append(f"LoRA adapters (rank {a['rank']}, every attention and MLP layer): an adapter row {a['decode_ratio']:.3f}x a "
                    f"base row per token, {a['request_ratio']:.3f}x per request; a batch of 8 rows on 4 adapters "
                    f"{a['batch_vs_base_ratio']:.3f}x the tokens/s of the same batch on the base model")
    if "runtime_overhead" in result:
        o = result["runtime_overhead"]
        rows.append(f"seeright without interventions vs stock generate: {o['decode_ratio']:.3f}x per token, {o['request_ratio']:.3f}x per request")
    return "\n".join(rows)

