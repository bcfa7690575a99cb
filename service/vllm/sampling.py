"""A guided-decoding candidate's draws in vLLM's worker, as the transformers engine makes them.

vLLM samples with generators and kernels of its own; a candidate of Lookback Lens guided decoding must draw the
transformers engine's tokens (candidate ``i`` from ``seed * 65536 + i``, one draw per token, its generator carried
across chunks). :class:`CandidateSampler` travels (signed) with the candidate's vLLM request: the worker hands it
the request's raw logits at each step, it applies the request's penalties, temperature and top-p with the engine's
own :func:`~seeright.service.decoding.choose_token`, and the
worker gives vLLM the token it drew. Its generator's state and the tokens it drew (with their log-probs, from the
raw logits as the transformers engine reports them) go back to the client when the chunk ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from seeright.service.decoding import RowDecoding, choose_token
from seeright.service.requests import StreamedToken, with_logprobs


@dataclass
class CandidateSampler:
    """One candidate's sampling for one chunk: ``seed`` starts its generator (the first chunk), ``state`` resumes
    it (later chunks); ``logprobs`` / ``top_logprobs`` as the request asked."""

    decoding: RowDecoding
    seed: int | None = None
    state: torch.Tensor | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    drawn: list[StreamedToken] = field(default_factory=list)
    generator: torch.Generator | None = None

    def draw(self, scores: torch.Tensor, prompt: list[int], answered: int) -> int:
        """The next token from the step's raw logits ``scores`` ``[V]``; ``prompt`` is the vLLM prompt's ids, whose
        last ``answered`` are the answer's earlier chunks (they count as generated tokens for the penalties)."""
        split = len(prompt) - answered
        token = choose_token(scores, self.decoding, prompt[:split], [*prompt[split:], *(t.id for t in self.drawn)],
                             self._generator(scores.device) if self.decoding.sampled else None)
        self.drawn.append(with_logprobs(token, scores, self.top_logprobs) if self.logprobs else StreamedToken(token))
        return token

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device=device)
            if self.state is not None:
                self.generator.set_state(self.state)
            else:
                self.generator.manual_seed(self.seed if self.seed is not None else 0)
        return self.generator

    def returned(self) -> CandidateSampler:
        """What goes back to the client: the tokens drawn and the generator's state (none if it never drew)."""
        state = self.generator.get_state() if self.generator is not None else self.state
        return CandidateSampler(self.decoding, self.seed, state, self.logprobs, self.top_logprobs, list(self.drawn))
