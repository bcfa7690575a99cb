"""Property: a row never depends on its batch-mates.

Hypothesis draws batches of 2-6 rows on both tiny families; each row gets random methods (none, one or two,
from a pool of up to three per batch) with random valid parameters read from each method's parameter schema (``param_strategies``), a random
LoRA adapter (none, or one of two), a random prompt, image and token budget. Every row's tokens and log-probs must equal the row served alone (within
1e-4), both in one engine call and sent at once through the serving path (scheduler and async client), so
a scheduler that batches differently (continuous batching) is held to the same property.

``SEERIGHT_BATCH_MATE_EXAMPLES`` sets the number of draws (default 300); ``SEERIGHT_BATCH_MATE_RANDOM=1``
draws fresh examples instead of CI's fixed sequence.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from conftest import FAMILIES, QUESTIONS, make_image
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from lora_folders import peft_adapter
from param_strategies import method_params

from seeright.service.client import EngineClient
from seeright.service.engine import Engine, GenerationOutput, GenerationRequest
from seeright.service.scheduler import Scheduler
from seeright.service.slicing import StepBudget

EXAMPLES = int(os.environ.get("SEERIGHT_BATCH_MATE_EXAMPLES", "300"))
TOLERANCE = 1e-4
IMAGE_SIZES = ((48, 40), (32, 32), (64, 48))
ENGINES: dict[str, Engine] = {}
ADAPTERS = {"a": {}, "b": {"seed": 1, "r": 6, "use_rslora": True}}  # two PEFT adapters per family, of other ranks


def engine_for(family: str) -> Engine:
    if family not in ENGINES:
        engine = Engine.from_pretrained(family)
        folder = Path(tempfile.mkdtemp(prefix="batch-mates-"))
        for name, config in ADAPTERS.items():
            engine.load_lora(name, peft_adapter(family, folder / name, **config))
        ENGINES[family] = engine
    return ENGINES[family]


def serve(engine: Engine, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
    """Requests served together in one engine call."""
    return engine.generate_batch(requests)


def serve_scheduled(engine: Engine, requests: Sequence[GenerationRequest], segments: int | None = None) -> list[GenerationOutput]:
    """Requests sent through the serving path (scheduler and async client), as HTTP routes send them: at once, or
    with ``segments``, the first alone and the others once it decodes, so that their admissions run that many
    segments (between the model's blocks) per decode step of the rows already running."""
    budget = StepBudget() if segments is None else StepBudget(segments=segments)
    scheduler = Scheduler(engine, max_batch_size=8, batch_wait_s=0.05, step_budget=budget)
    client = EngineClient(scheduler)
    scheduler.start()
    try:
        async def send() -> list[GenerationOutput]:
            if segments is None:
                return list(await asyncio.gather(*(client.generate(r) for r in requests)))
            first = asyncio.ensure_future(client.generate(requests[0]))
            await asyncio.sleep(0.1)  # past the burst window: the first decodes alone when the others arrive
            return [await first, *await asyncio.gather(*(client.generate(r) for r in requests[1:]))]

        return asyncio.run(send())
    finally:
        scheduler.stop()


@st.composite
def rows(draw: st.DrawFn, engine: Engine, pool: list[str]) -> dict:
    names = draw(st.lists(st.sampled_from(pool), max_size=2, unique=True))
    interventions = {
        name: draw(method_params(
            engine.methods[name], engine.method_defaults(name), engine.info.num_layers, engine.info.vision_layers
        ))
        for name in names
    }
    contrasting = [n for n, p in interventions.items() if engine.methods[n].contrasts(engine.resolve_params({n: p})[n])]
    for name in contrasting[1:]:  # two contrast branches in one request are refused (tested elsewhere)
        del interventions[name]
    if contrasting:  # candidates beside a contrast branch are refused too
        for name in [n for n, p in interventions.items() if engine.methods[n].candidates(engine.resolve_params({n: p})[n]) > 1]:
            del interventions[name]
    return {
        "prompt": draw(st.sampled_from(QUESTIONS)),
        "image": draw(st.integers(0, 5)),
        "size": draw(st.sampled_from(IMAGE_SIZES)),
        "interventions": interventions,
        "max_new_tokens": draw(st.integers(1, 4)),
        "adapter": draw(st.sampled_from([None, None, *ADAPTERS])),
    }


@st.composite
def batches(draw: st.DrawFn) -> tuple[str, list[dict]]:
    """A batch draws its rows' methods from a pool of one to three, so that rows of one method with
    different settings meet often (where per-row decisions go wrong), plus plain rows."""
    family = draw(st.sampled_from(FAMILIES))
    engine = engine_for(family)
    runnable = sorted(name for name in engine.methods if engine.unavailable(name) is None)
    pool = draw(st.lists(st.sampled_from(runnable), min_size=1, max_size=3, unique=True))
    return family, draw(st.lists(rows(engine, pool), min_size=2, max_size=6))


def request(row: dict) -> GenerationRequest:
    return GenerationRequest(
        prompt=row["prompt"], images=[make_image(row["image"], row["size"])], interventions=row["interventions"],
        max_new_tokens=row["max_new_tokens"], logprobs=True, adapter=row.get("adapter"),
    )


ALONE: dict[str, GenerationOutput] = {}


def alone(family: str, engine: Engine, row: dict) -> GenerationOutput:
    key = json.dumps([family, row], sort_keys=True)
    if key not in ALONE:
        ALONE[key] = serve(engine, [request(row)])[0]
    return ALONE[key]


def _row(interventions: dict, image: int = 0) -> dict:
    return {"prompt": QUESTIONS[2], "image": image, "size": IMAGE_SIZES[0], "interventions": interventions, "max_new_tokens": 4}


# The two bugs this test found on the code before it (issue #18's note): a GIFT row reading its fused saliency
# in a layer left a batch-mate's enhancement of that layer undone; and hooks acted in the order the batch's
# rows brought them, so VAR + GIFT rows were edited GIFT-first beside a GIFT row and VAR-first alone.
GIFT_MATES = ("tiny-random/llava", [
    _row({"gift": {"saliency_layers": [1], "enhance_layers": [2, 3, 4, 5]}}),
    _row({"gift": {"saliency_layers": [3], "enhance_layers": [4, 5]}}, image=1),
])
ORDER_MATES = ("tiny-random/llava", [_row({"gift": {}}), _row({"var": {}, "gift": {}}, image=1)])
# A third, found when this round's schemas shifted the draws: VE masking attacked every request's images in one
# batch, and PGD's sign steps turned the batched kernels' rounding into a different mask for a CARVE + VE row.
ATTACK_MATES = ("tiny-random/llava", [
    {**_row({"carve": {"layers": [2], "top_p": 0.5}, "vemask": {"epsilon": 1.0, "random_start": False}}),
     "prompt": QUESTIONS[0], "size": (48, 40), "max_new_tokens": 2},
    {**_row({"vemask": {"epsilon": 1.0, "random_start": False}}), "prompt": QUESTIONS[0], "size": (48, 40),
     "max_new_tokens": 2},
])

# A fourth, drawn on 2026-12-07: PAINT inherits PAI's order (5), the batch sorted its hooks by order alone, and the tie
# went to the order in which its rows brought them: a PAI + PAINT row was edited PAINT-first beside a PAINT row and
# PAI-first alone (the registry's order and name), two non-linear score edits composed the other way.
SCORE_MATES = ("tiny-random/llava", [_row({"paint": {}, "agser": {}}, image=1), _row({"pai": {"alpha": 2.0}, "paint": {}})])


SETTINGS = dict(
    deadline=None, derandomize=os.environ.get("SEERIGHT_BATCH_MATE_RANDOM") != "1",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], database=None,
)


@example(GIFT_MATES)
@example(ORDER_MATES)
@example(ATTACK_MATES)
@example(SCORE_MATES)
@settings(max_examples=EXAMPLES, **SETTINGS)
@given(batches())
def test_every_row_equals_the_row_alone(batch: tuple[str, list[dict]]) -> None:
    check_rows(batch, serve)


@settings(max_examples=max(EXAMPLES // 6, 10), **SETTINGS)
@given(batches(), st.sampled_from([None, 1, 3, 8]))
def test_every_row_equals_the_row_alone_through_the_scheduler(batch: tuple[str, list[dict]], segments: int | None) -> None:
    """``segments``: None sends the rows at once; else the first, then the others, admitted a slice per step."""
    check_rows(batch, partial(serve_scheduled, segments=segments))


def check_rows(batch: tuple[str, list[dict]], served) -> None:
    family, drawn = batch
    engine = engine_for(family)
    together = served(engine, [request(r) for r in drawn])
    for i, (row, out) in enumerate(zip(drawn, together)):
        ref = alone(family, engine, row)
        where = f"row {i} on {family}, batch {[(r.get('adapter'), r['interventions']) for r in drawn]}"
        assert out.token_ids == ref.token_ids, where
        gap = max(abs(a - b) for a, b in zip(out.logprobs, ref.logprobs))
        assert gap <= TOLERANCE, f"{where}: log-probs differ by {gap:.2e}"
