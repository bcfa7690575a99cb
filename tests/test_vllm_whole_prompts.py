"""Which prompt rows of a method request vLLM must prefill in one chunk under its step budget (no vLLM needed): from
the first row its hooks act on (``prefill_tail``). Exactness under a split is tested on vLLM itself
(``tests/test_vllm_engine.py`` runs every method on a step budget below every prompt)."""

from __future__ import annotations

from seeright.interventions.layout import TokenLayout
from seeright.interventions.methods.base import Hooks, RowState
from seeright.interventions.methods.vhr import _TextHeadCapture
from seeright.interventions.registry import MethodRegistry
from seeright.interventions.spec import VHRParams
from seeright.service.engine import GenerationRequest
from seeright.service.vllm.worker import prefill_tail, probs_layers, recomputed_from, whole_prompt

# the first prompt row each method's hooks act on, from the prompt's layout
TAILS = {
    "vhr": lambda layout: 0,  # every row's heads, by a selection made at the last
    "gift": lambda layout: layout.length - 1,  # its enhancement (its saliency reads rows as they come)
    **dict.fromkeys(["pai", "paint", "attention_map", "agser"], lambda layout: layout.length - 1),  # the last row's
    # from the first decode step on, or rows taken as they come (VAR's and ViF's: each row's edit reads the keys up to
    # it; VAR's sinks, read from every row's residual stream, grow with the rows the worker has kept)
    **dict.fromkeys(["carve", "vemask", "ritual", "vcd", "lookback", "lookback_decoding", "var", "vif"],
                    lambda layout: layout.length),
}


def test_a_prompt_runs_in_one_chunk_from_the_first_row_its_hooks_act_on(llava, images):
    assert set(TAILS) == set(MethodRegistry.builtin())
    for name, expected in TAILS.items():
        inputs, rows = llava.admit([GenerationRequest(prompt="What is in the image?", images=[images[0]],
                                                      interventions={name: {}})])
        layout = inputs[0].prompt.layout
        for state in rows[0]:
            state.layout = layout
        assert 0 < layout.image_end < layout.query_span[0] < layout.length - 1
        assert prefill_tail(rows[0], range(llava.info.num_layers)) == expected(layout), name


def _tail(llava, images, interventions):
    inputs, rows = llava.admit([GenerationRequest(prompt="What is in the image?", images=[images[0]],
                                                  interventions=interventions)])
    layout = inputs[0].prompt.layout
    for state in rows[0]:
        state.layout = layout
    return prefill_tail(rows[0], range(llava.info.num_layers)), layout


def test_vhrs_prompt_splits_unless_a_selection_scales_every_row(llava, images):
    """The selection reads the last row: scaling only that row splits before it; fixed heads scale each row on its
    own (no row constrains the split); a selection applied to every row needs the whole prompt."""
    fixed = {"1": [0, 2], "3": [1]}
    cases = [({}, lambda layout: 0), ({"prefill_positions": "last"}, lambda layout: layout.length - 1),
             ({"heads": fixed}, lambda layout: layout.length),
             ({"heads": fixed, "prefill_positions": "last"}, lambda layout: layout.length - 1)]
    for params, expected in cases:
        tail, layout = _tail(llava, images, {"vhr": params})
        assert tail == expected(layout), params
    tail, layout = _tail(llava, images, {"vhr": {"prefill_positions": "last"}, "pai": {}, "var": {}})
    assert tail == layout.length - 1  # the earliest row any of a request's hooks acts on together


def test_vhrs_text_only_pass_splits_before_its_last_row():
    """The pass records the heads' outputs at the prompt's last row and edits nothing."""
    capture = _TextHeadCapture()
    state = RowState(hooks=capture, params=VHRParams(layers=[1, 2]))
    state.layout = TokenLayout(length=9, pad=0, image_spans=(), image_grids=(), query_span=(1, 8))
    assert prefill_tail([state], range(4)) == 8
    assert prefill_tail([state], [0, 3]) == 9  # no hooked layer in these: nothing constrains the split


def test_the_rows_whose_attention_is_computed_again_start_where_a_hook_first_reads(llava, images):
    """What the scheduler's pace costs apart (``recomputed_from``): from the first row any hook reads or edits the
    attention of, rows taken as they come included; None for methods that act on no prompt row's attention."""
    expected = {"var": lambda layout: layout.image_end, "gift": lambda layout: layout.query_span[0] - 1,
                "pai": lambda layout: layout.length - 1, "vemask": lambda layout: None}
    for name, first in expected.items():
        inputs, rows = llava.admit([GenerationRequest(prompt="What is in the image?", images=[images[0]],
                                                      interventions={name: {}})])
        for state in rows[0]:
            state.layout = inputs[0].prompt.layout
        assert recomputed_from(rows[0], range(llava.info.num_layers)) == first(inputs[0].prompt.layout), name


def test_guided_decodings_first_candidates_split_and_its_continuations_run_whole():
    """A chunk's first candidates prefill the prompt like any request (their samplers draw once its last chunk has
    run); a continuation's prompt forward stands for the decode step of its last token, and runs in one forward."""
    first = {"states": b"", "tail": 52, "sampler": b"", "answered": 0}
    assert not whole_prompt(first)
    assert whole_prompt({**first, "answered": 4, "kv_from": "kept"})
    assert whole_prompt({"states": b"", "tail": 0}) and not whole_prompt(None) and not whole_prompt({"branch": "b"})


def test_the_layers_whose_keys_are_kept_hold_every_layer_a_hook_asks_in(llava, images, monkeypatch):
    """vLLM's worker keeps a request's keys and values only in the layers its hooks ask probabilities in, as planned
    from a prefill and a decode step (``probs_layers``). Every state of every method's runs here (analysis passes'
    included) asks only there at every step, as the plans' contract says (the layer, and whether the step is the
    prefill), and the sets are what the defaults name (GIFT: its saliency and enhanced layers, not all of them)."""
    asked: dict[int, tuple[RowState, set[tuple[int, int]]]] = {}
    methods = MethodRegistry.builtin()
    for hooks in _subclasses(Hooks):
        if "probs_from" in vars(hooks):
            def recorded(self, state, layer, step, _own=vars(hooks)["probs_from"]):
                start = _own(self, state, layer, step)
                if start is not None:
                    asked.setdefault(id(state), (state, set()))[1].add((layer, step))
                return start
            monkeypatch.setattr(hooks, "probs_from", recorded)
    layers, reading = range(llava.info.num_layers), set()
    for name in methods:
        asked.clear()
        llava.generate_batch([GenerationRequest(prompt="What is in the image?", images=[images[0]], max_new_tokens=4,
                                                interventions={name: {}})])
        reading |= {name} if asked else set()
        for state, seen in asked.values():
            decode = probs_layers([state], layers, step=1)
            assert {layer for layer, step in seen if step > 0} <= decode, name
            assert {layer for layer, step in seen if step == 0} <= decode | probs_layers([state], layers, step=0), name
    assert reading == set(methods) - {"vhr", "ritual", "vcd", "vemask"}  # (the four edit heads, logits or the tower)
    gift = llava.method_defaults("gift")
    inputs, rows = llava.admit([GenerationRequest(prompt="What is in the image?", images=[images[0]],
                                                  interventions={"gift": {}})])
    for state in rows[0]:
        state.layout = inputs[0].prompt.layout
    assert probs_layers(rows[0], layers, step=1) == set(gift["enhance_layers"]) != set(layers)


def _subclasses(cls: type) -> set[type]:
    return {c for sub in cls.__subclasses__() for c in {sub, *_subclasses(sub)}}
