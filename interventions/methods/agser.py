"""AGSER: attention-guided self-reflection (Liu et al., arXiv 2501.09997, §3), a zero-shot hallucination score.

Reads attention, edits nothing in the request's own generation. Then, once its answer ``Y`` is final:

1. *Attention contributions.* Each query unit's contribution is the attention it receives, summed over heads and
   averaged over ``layers`` (the paper's best pooling: all layers), from the last prompt token's row (the row that
   produces the first answer token; ``attention_from: "answer"`` averages that row with every answer token's row).
   The query is the text of the request's last user turn; a word's contribution is the sum of its tokens'
   (``unit: "word"``; the paper's environment lists spaCy, i.e. words; ``"token"`` ranks sub-word tokens).
2. *Split.* The top ``attentive_fraction`` of the units (the paper's 2/3, at least one) form the attentive query
   ``X_att``, the rest the non-attentive query ``X_non``, each in the original order, joined by spaces.
3. *Self-reflection.* ``X_att`` and ``X_non`` replace the question in the same conversation (same images, same
   template) and are answered greedily, up to the request's ``max_new_tokens``, in one batched pass (with the other
   requests that end together) on the request's model (its LoRA adapter), without its other interventions.
4. *Score.* ``r = ROUGE-L F1(answer, Y)`` (``rouge_score``'s default: lower-cased alphanumeric tokens, no stemming)
   for both, and ``score = lam * r_att - r_non`` (the paper's estimator, ``lam = 1``): a factual answer is
   reproduced from what the model attended to and not from the rest, so *lower* means more likely hallucinated.

For a vision-language model the paper leaves the image open. ``image: "whole"`` (default) keeps the whole image in
both sub-queries and splits the text, as the paper splits its text-only queries. ``image: "split"`` ranks the image
tokens by the same contributions and splits them with the same fraction: the attentive query's forward hides
(as keys, in every layer, from every query row) the image tokens outside its part, the non-attentive query's the
others. Both are measured on the shapes testbed (``python -m seeright.testbed.agser_eval``).

Diagnostics (``signals.agser``): ``score``, ``attentive_query`` / ``non_attentive_query``, their answers and
``*_consistency`` (the two ROUGE-L values), and with ``image: "split"`` the image tokens each part kept. Cost: two
greedy generations after the answer, run when the answer is final (per request: ``seeright bench``'s record).
"""

from __future__ import annotations

import re

import torch

from seeright.interventions.adapters.base import ChatTurn, ModelInfo
from seeright.interventions.methods.base import (
    Answer, HookPoint, Method, Passes, RequestInputs, RowState, check_layers, last_query_row,
)
from seeright.interventions.spec import AGSERParams

NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


class AGSER(Method):
    name = "agser"
    params_model = AGSERParams
    hook_points = frozenset({HookPoint.PROBS, HookPoint.SCORES, HookPoint.REFLECT})
    order = 1000  # reads the probabilities every editing method has left
    signal = True
    mixed_traffic = False  # two generations after the answer: not part of the mixed loads
    literal = "seeright.interventions.literal.agser:LiteralAGSER"

    def defaults(self, info: ModelInfo) -> dict:
        return {"layers": list(range(info.num_layers))}

    def check(self, params: AGSERParams, info: ModelInfo) -> AGSERParams:
        return params.model_copy(update={"layers": check_layers("agser.layers", params.layers, info.num_layers)})

    def new_state(
        self, params: AGSERParams, info: ModelInfo, request: RequestInputs, companions: frozenset[str] = frozenset()
    ) -> RowState:
        if not request.turns or not request.turns[-1].text.strip():
            raise ValueError("needs a text question in the last user turn: that is what AGSER splits")
        if params.image == "split" and not request.images:
            raise ValueError("image: 'split' needs an image in the request")
        return RowState(hooks=self, params=params, request=request, companions=companions)

    # ---- the request's own generation: read the attention the query receives --------------------------------
    def probs_from(self, state: RowState, layer: int, step: int) -> int | None:
        if "hide" in state.data:  # a sub-query's pass: its hidden image tokens, from every row
            return 0 if state.data["hide"] is not None else None
        if layer not in state.params.layers or (step > 0 and state.params.attention_from == "prompt_end"):
            return None
        return last_query_row(state, step)

    def reads_only(self, state: RowState, layer: int, step: int) -> bool:
        return "hide" not in state.data

    def edit_probs(self, layer: int, probs: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        received = probs[:, :, -1].sum(1)  # [n, T]: what each key receives from the row, summed over heads
        for r, state in enumerate(states):
            if "hide" in state.data:
                continue
            start, end = state.layout.query_span
            image = state.layout.image_positions.to(received.device)
            self.record(state, layer, received[r, start:end], received[r, image])
        return probs

    @staticmethod
    def record(state: RowState, layer: int, query: torch.Tensor, image: torch.Tensor) -> None:
        """Add one layer's contributions; at the step's last read layer, keep the step's layer mean."""
        layers = state.params.layers
        if layer == layers[0]:
            state.data["sum"] = (torch.zeros_like(query), torch.zeros_like(image))
        q, i = state.data["sum"]
        state.data["sum"] = (q + query, i + image)
        if layer == layers[-1]:
            q, i = state.data.pop("sum")
            state.data.setdefault("rows", []).append((q / len(layers), i / len(layers)))

    def edit_scores(self, layer: int, scores: torch.Tensor, states: list[RowState], step: int, q0: int) -> torch.Tensor:
        hidden = [(r, s) for r, s in enumerate(states) if s.data.get("hide") is not None]
        if not hidden:
            return scores
        scores = scores.clone()
        for r, state in hidden:
            positions = state.layout.image_positions[state.data["hide"]].to(scores.device)
            scores[r, :, :, positions] = torch.finfo(scores.dtype).min
        return scores

    # ---- once the answer is final: re-ask both halves --------------------------------------------------------
    def reflect(self, states: list[RowState], passes: Passes, answers: list[Answer]) -> None:
        """Both sub-queries of every request, answered in one batched greedy pass."""
        prompts, pass_rows, asked = [], [], []
        for state, answer in zip(states, answers):
            sub = self._sub_queries(state, answer, passes)
            if sub is None:  # the request was cancelled before its prefill
                continue
            for text, hidden in sub:
                last = state.request.turns[-1]
                turns = [*state.request.turns[:-1], ChatTurn(last.role, text, last.num_images)]
                prompts.append(passes.encode(turns, state.request.images))
                pass_rows.append([RowState(hooks=self, params=state.params, request=state.request, data={"hide": hidden})])
            asked.append((state, answer, [text for text, _ in sub]))
        if not prompts:
            return
        generated = passes.greedy(prompts, pass_rows, max(answer.max_new_tokens for _, answer, _ in asked))
        eos = set(passes.eos_token_ids())
        for i, (state, answer, texts) in enumerate(asked):
            replies = [passes.decode_text(until_eos(tokens[: answer.max_new_tokens], eos)) for tokens in generated[2 * i : 2 * i + 2]]
            r_att, r_non = (rouge_l(reply, answer.text) for reply in replies)
            state.diagnostics.update(
                score=state.params.lam * r_att - r_non, attentive_query=texts[0], non_attentive_query=texts[1],
                attentive_answer=replies[0], non_attentive_answer=replies[1],
                attentive_consistency=r_att, non_attentive_consistency=r_non,
            )

    def _sub_queries(self, state: RowState, answer: Answer, passes: Passes) -> list[tuple[str, torch.Tensor | None]] | None:
        """The attentive and the non-attentive query: each one's text and the image tokens its forward hides."""
        p: AGSERParams = state.params
        rows = state.data.get("rows") or []
        if not rows:
            return None
        kept = rows[: max(len(answer.tokens), 1)] if p.attention_from == "answer" else rows[:1]
        query_c = torch.stack([q for q, _ in kept]).mean(0).double().cpu()
        image_c = torch.stack([i for _, i in kept]).mean(0).double().cpu()
        prompt = state.request.prompt
        start, end = prompt.layout.query_span
        ids = prompt.input_ids[start:end].tolist()
        units, weights = query_units(ids, query_c, p.unit, passes.decode_text)
        texts = [join(units, part, p.unit, passes.decode_text) for part in split(weights, p.attentive_fraction)]
        if p.image == "whole":
            return [(texts[0], None), (texts[1], None)]
        top, rest = split(image_c, p.attentive_fraction)
        state.diagnostics["attentive_image_tokens"], state.diagnostics["non_attentive_image_tokens"] = top, rest
        return [(texts[0], torch.tensor(rest, dtype=torch.long)), (texts[1], torch.tensor(top, dtype=torch.long))]


def query_units(
    ids: list[int], contributions: torch.Tensor, unit: str, decode
) -> tuple[list[str] | list[int], torch.Tensor]:
    """The query's units and their contributions: its tokens, or its whitespace words (token ``i`` belongs to word
    ``len(decode(ids[: i + 1]).split()) - 1``; a word's contribution is its tokens' sum)."""
    if unit == "token":
        return ids, contributions
    words = decode(ids).split()
    weights = torch.zeros(len(words), dtype=contributions.dtype)
    for i in range(len(ids)):
        word = len(decode(ids[: i + 1]).split()) - 1
        weights[min(max(word, 0), len(words) - 1)] += contributions[i]
    return words, weights


def split(weights: torch.Tensor, fraction: float) -> tuple[list[int], list[int]]:
    """Indices of the top ``round(fraction * n)`` weights (at least one; ties to the earlier unit) and of the rest,
    each in the original order."""
    n = len(weights)
    if n == 0:
        return [], []
    k = min(max(round(fraction * n), 1), n)
    order = sorted(range(n), key=lambda i: (-float(weights[i]), i))
    top = sorted(order[:k])
    return top, sorted(order[k:])


def join(units: list, chosen: list[int], unit: str, decode) -> str:
    """A sub-query's text: its words joined by spaces, or its tokens decoded together."""
    return " ".join(units[i] for i in chosen) if unit == "word" else decode([units[i] for i in chosen]).strip()


def until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    return next((tokens[: i + 1] for i, tok in enumerate(tokens) if tok in eos), tokens)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of two texts as ``rouge_score`` computes it by default (Lin, 2004): lower-cased alphanumeric
    tokens, longest common subsequence, ``2 P R / (P + R)``; 0 when either is empty."""
    a, b = tokens_of(candidate), tokens_of(reference)
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def tokens_of(text: str) -> list[str]:
    return [t for t in NON_ALPHANUMERIC.split(text.lower()) if t]
