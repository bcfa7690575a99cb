"""Per-row decoding controls for one batched ``generate`` call.

Stock ``generate`` applies one sampling configuration to the whole batch. To batch requests that differ,
rows are decoded greedily and :class:`RowSampler` replaces a sampled row's scores with a one-hot of a
token drawn with that row's own temperature, top-p and seeded generator. :class:`RowStops` ends rows
at their own ``max_new_tokens``, stop strings or cancellation; EOS is left to ``generate``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, StoppingCriteria
from transformers.generation.streamers import BaseStreamer


@dataclass
class RowDecoding:
    """Decoding settings of one batch row."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    @property
    def sampled(self) -> bool:
        return self.temperature > 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def apply_penalties(scores: torch.Tensor, generated: torch.Tensor, seen: torch.Tensor, row: RowDecoding) -> torch.Tensor:
    """One row's scores ``[V]`` after OpenAI's presence / frequency penalties (over the generated tokens:
    ``- c_j * frequency - (c_j > 0) * presence``) and the HF / vLLM repetition penalty (over prompt and
    generated tokens ``seen``: positive scores divided by it, negative ones multiplied)."""
    scores = scores.clone()
    if row.presence_penalty or row.frequency_penalty:
        counts = torch.bincount(generated, minlength=scores.shape[-1]).to(scores.dtype)
        scores -= counts * row.frequency_penalty + (counts > 0).to(scores.dtype) * row.presence_penalty
    if row.repetition_penalty != 1:
        tokens = seen.unique()
        picked = scores[tokens]
        scores[tokens] = torch.where(picked > 0, picked / row.repetition_penalty, picked * row.repetition_penalty)
    return scores


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask logits outside the smallest set of tokens whose probability mass reaches ``top_p``."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
    drop[..., 0] = False  # and the top token always (a top_p below float32's smallest is 0 there)
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def sample(scores: torch.Tensor, row: RowDecoding, generator: torch.Generator | None) -> torch.Tensor:
    """One token ``[1]`` drawn from ``scores`` at the row's temperature and top-p. The scores are shifted to a
    maximum of 0 before the temperature divides them, so a tiny temperature gives the argmax instead of inf / inf."""
    scores = scores.float()
    temperature = max(row.temperature, torch.finfo(torch.float32).tiny)  # a denormal is 0 in float32
    logits = top_p_filter((scores - scores.max()) / temperature, row.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


def candidate_seed(seed: int, i: int) -> int:
    """The seed of guided decoding's candidate ``i`` (the request's own row is candidate 0)."""
    return seed * 65536 + i


def choose_token(scores: torch.Tensor, row: RowDecoding, prompt: Sequence[int] | torch.Tensor, generated: Sequence[int],
                 generator: torch.Generator | None) -> int:
    """A row's next token from its step's raw ``scores`` ``[V]``: its penalties over the ``generated`` tokens (and,
    for the repetition penalty, the ``prompt``'s too), then the argmax or a draw at its temperature and top-p."""
    if row.penalized:
        tokens = torch.tensor(list(generated), dtype=torch.long, device=scores.device)
        seen = torch.cat([torch.as_tensor(prompt, dtype=torch.long).to(scores.device), tokens])
        scores = apply_penalties(scores, tokens, seen, row)
    if not row.sampled:
        return int(scores.argmax())
    return int(sample(scores, row, generator))


def stop_reason(row: RowDecoding, tokens: Sequence[int], eos: Collection[int], decode: Callable[[list[int]], str]) -> str | None:
    """Why a row stops after the last of its generated ``tokens``: ``"stop"`` (EOS, a stop string in the text),
    ``"length"`` (its token budget), or None."""
    if tokens[-1] in eos:
        return "stop"
    if row.stop and any(s in decode(list(tokens)) for s in row.stop):
        return "stop"
    if len(tokens) >= row.max_new_tokens:
        return "length"
    return None


class RowSampler(LogitsProcessor):
    """Applies each row's penalties, then turns sampled rows into one-hot scores of a token drawn with the
    row's own generator (greedy rows keep their scores: ``generate`` takes the argmax)."""

    def __init__(self, rows: Sequence[RowDecoding], device: torch.device, prompt_length: int = 0) -> None:
        self.rows = rows
        self.prompt_length = prompt_length
        self.penalized = [b for b, row in enumerate(rows) if row.penalized]
        self.generators: dict[int, torch.Generator] = {}
        for b, row in enumerate(rows):
            if row.sampled:
                gen = torch.Generator(device=device)
                gen.manual_seed(row.seed if row.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
                self.generators[b] = gen

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.generators and not self.penalized:
            return scores
        scores = scores.clone()
        for b in self.penalized:
            seen = input_ids[b]  # left padding repeats the pad id, which a repetition penalty may touch: harmless
            scores[b] = apply_penalties(scores[b], input_ids[b, self.prompt_length :], seen, self.rows[b])
        for b, gen in self.generators.items():
            token = sample(scores[b], self.rows[b], gen)
            scores[b] = float("-inf")
            scores[b, token] = 0.0
        return scores


class RowStops(StoppingCriteria):
    """Per-row stop: the row's token budget, one of its stop strings, or cancellation."""

    def __init__(
        self,
        rows: Sequence[RowDecoding],
        prompt_length: int,
        decode: Callable[[list[int]], str],
        cancelled: Callable[[int], bool] | None = None,
    ) -> None:
        self.rows = rows
        self.prompt_length = prompt_length
        self.decode = decode
        self.cancelled = cancelled or (lambda b: False)
        self.done = [False] * len(rows)
        self.reason: list[str | None] = [None] * len(rows)
        self.length: list[int | None] = [None] * len(rows)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        produced = input_ids.shape[1] - self.prompt_length
        for b, row in enumerate(self.rows):
            if self.done[b]:
                continue
            if self.cancelled(b):
                self.done[b], self.reason[b] = True, "cancelled"
            elif row.stop and any(s in self.decode(input_ids[b, self.prompt_length :].tolist()) for s in row.stop):
                self.done[b], self.reason[b] = True, "stop"
            elif produced >= row.max_new_tokens:
                self.done[b], self.reason[b] = True, "length"
            if self.done[b]:
                self.length[b] = produced
        return torch.tensor(self.done, device=input_ids.device)


class RowStreamer(BaseStreamer):
    """Calls ``on_token(row, token_id)`` for each new token of each still-running row.

    ``generate`` may hand tokens over after the stopping criteria of the same step ran (or one step
    late on GPU), so a token is attributed by its step number: the k-th call after the prompt carries
    the k-th new token of every row, and a row stopped after n tokens gets no token past n.
    """

    def __init__(self, on_token: Callable[[int, int], None], stops: RowStops, eos: set[int]) -> None:
        self.on_token = on_token
        self.stops = stops
        self.eos = eos
        self.step = -1  # the first call carries the prompt
        self.ended = [False] * len(stops.rows)

    def put(self, value: torch.Tensor) -> None:
        self.step += 1
        if self.step == 0:
            return
        for b, token in enumerate(value.reshape(-1).tolist()):
            limit = self.stops.length[b]
            if self.ended[b] or (limit is not None and self.step > limit):
                continue
            self.on_token(b, token)
            self.ended[b] = token in self.eos

    def end(self) -> None:
        pass
