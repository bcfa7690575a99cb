"""The layered prefill of the vLLM engine path without vLLM (``seeright.service.vllm.layered``): which prompts run
layer by layer and up to which layer, the attention it computes, and its layers per call under a step budget. That
it answers as the transformers engine does is tested on vLLM itself (``tests/test_vllm_engine.py``)."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from seeright.service.engine import GenerationRequest
from seeright.service.vllm import layered
from seeright.service.vllm.layered import LayeredPrefill, causal_attention, run_layers, whole_until
from seeright.service.vllm.worker import prefill_tail


def _states(llava, images, interventions):
    inputs, rows = llava.admit([GenerationRequest(prompt="What is in the image?", images=[images[0]],
                                                  interventions=interventions)])
    for state in rows[0]:
        state.layout = inputs[0].prompt.layout
    return rows[0], inputs[0].prompt.layout


def test_a_prompt_runs_layer_by_layer_up_to_the_last_layer_that_scales_every_row_by_the_last(llava, images):
    """VHR at its defaults: up to its last layer; once every layer's heads are chosen (what the layered prefill
    leaves), each row's edit is its own and the prompt may split anywhere. Fixed heads, or the last row scaled only,
    never run layer by layer; nor do methods that act on rows as they come or on the last row."""
    layers = range(llava.info.num_layers)
    states, layout = _states(llava, images, {"vhr": {}})
    assert whole_until(states, layers) == states[0].params.layers[-1]
    assert prefill_tail(states, layers) == 0
    vhr = states[0]
    vhr.data["heads"] = {layer: torch.zeros(llava.info.num_heads, dtype=torch.bool) for layer in vhr.params.layers[:-1]}
    assert whole_until(states, layers) == vhr.params.layers[-1]  # one layer left to choose: still every row at once
    vhr.data["heads"][vhr.params.layers[-1]] = torch.ones(llava.info.num_heads, dtype=torch.bool)
    assert whole_until(states, layers) is None and prefill_tail(states, layers) == layout.length
    for interventions in ({"vhr": {"heads": {"1": [0]}}}, {"vhr": {"prefill_positions": "last"}}, {"var": {}, "pai": {}}):
        assert whole_until(_states(llava, images, interventions)[0], layers) is None, interventions


def test_heads_chosen_by_an_earlier_forward_answer_as_those_chosen_in_the_prefill(llava, images):
    """What makes the layered prefill exact: VHR's heads, once chosen over the same prompt, scale each row as the
    selection in the prefill's own forward did (the same tokens and log-probs)."""
    ask = {"prompt": "What is in the image?", "images": [images[0]], "max_new_tokens": 6, "logprobs": True}
    selected = llava.generate_batch([GenerationRequest(**ask, interventions={"vhr": {"alpha": 3.0}})])[0]
    chosen = selected.diagnostics["vhr"]["heads"]
    heads = {str(layer): [h for h, on in enumerate(mask) if on] for layer, mask in chosen.items()}
    assert any(heads.values())
    given = llava.generate_batch([GenerationRequest(**ask, interventions={"vhr": {"alpha": 3.0, "heads": heads}})])[0]
    assert given.token_ids == selected.token_ids
    torch.testing.assert_close(torch.tensor(given.logprobs), torch.tensor(selected.logprobs), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2)])
def test_the_attention_is_softmax_of_the_scaled_scores_over_the_keys_up_to_each_row(heads, kv_heads):
    torch.manual_seed(0)
    t, d, scale = 7, 8, 0.3
    q, k, v = torch.randn(t, heads * d), torch.randn(t, kv_heads * d), torch.randn(t, kv_heads * d)
    got = causal_attention(heads, kv_heads, d, scale, q, k, v)
    want = torch.empty(t, heads, d)
    for row in range(t):
        for head in range(heads):
            kv = head // (heads // kv_heads)
            keys, values = k[: row + 1].view(-1, kv_heads, d)[:, kv], v[: row + 1].view(-1, kv_heads, d)[:, kv]
            weights = [math.exp(scale * float(q[row].view(heads, d)[head] @ key)) for key in keys]
            want[row, head] = sum(w * value for w, value in zip(weights, values)) / sum(weights)
    torch.testing.assert_close(got, want.reshape(t, heads * d), rtol=1e-5, atol=1e-5)


class _Attention(torch.nn.Module):
    """vLLM's attention layer as the layered prefill sees it: its shapes, its backend's scale; its own forward needs
    vLLM's forward context."""

    def __init__(self, heads: int = 2, head_size: int = 4) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_size = heads, heads, head_size
        self.impl = type("Impl", (), {"scale": head_size ** -0.5})()

    def forward(self, *args):
        raise AssertionError("vLLM's own attention runs outside a forward of vLLM's")


class Clock:
    """The layered prefill's clock, moved only by the layers' work (a shared machine's timing is no test's input)."""

    def __init__(self) -> None:
        self.now = 0.0

    def spend(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(layered, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    return clock


class _Layer(torch.nn.Module):
    """A decoder layer of vLLM's shape (``positions, hidden, residual``) whose wiring the prefill does not know: run
    whole. It takes ``seconds`` of ``clock`` and calls its attention."""

    def __init__(self, seconds: float, ran: list[int], index: int, clock: Clock | None = None) -> None:
        super().__init__()
        self.self_attn = torch.nn.Module()
        self.self_attn.attn = _Attention()
        self.seconds, self.ran, self.index, self.clock = seconds, ran, index, clock

    def forward(self, positions, hidden, residual):
        if self.clock is not None:
            self.clock.spend(self.seconds)
        out = self.self_attn.attn(hidden, hidden, hidden)
        self.ran.append(self.index)
        return out, hidden if residual is None else residual + hidden


def _prefill(hidden: torch.Tensor, last: int) -> LayeredPrefill:
    return LayeredPrefill(row=None, hidden=hidden, residual=None, positions=torch.arange(hidden.shape[0]), layer=0,
                          last=last)


def _no_hook(*args) -> None:
    pass


def test_each_call_runs_its_next_layers_within_the_budget_and_one_at_least(clock):
    ran: list[int] = []
    modules = {i: _Layer(0.02, ran, i, clock) for i in range(6)}
    prefill = _prefill(torch.randn(3, 8), last=4)
    run_layers(prefill, modules, 0.0, _no_hook)
    assert ran == [0] and prefill.layer == 1 and prefill.costs["layer"] == pytest.approx(0.02)  # one at least, its time
    run_layers(prefill, modules, 0.05, _no_hook)  # two layers' time and half a layer's
    assert ran == [0, 1, 2]
    run_layers(prefill, modules, None, _no_hook)  # no request runs: up to the last
    assert ran == [0, 1, 2, 3, 4] and prefill.layer == 5
    assert all("forward" not in vars(m.self_attn.attn) for m in modules.values())  # vLLM's attention again


class _Norm(torch.nn.Module):
    """vLLM's RMSNorm: with a residual, the sum's norm and the sum."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(width))

    def forward(self, x, residual=None):
        total = x if residual is None else x + residual
        normed = total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
        return normed if residual is None else (normed, total)


class _Linear(torch.nn.Linear):
    """vLLM's linear layers answer their output and their bias."""

    def forward(self, x):
        return super().forward(x), None


class _SelfAttention(torch.nn.Module):
    """An attention whose wiring the prefill does not know: called whole."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.qkv_proj, self.o_proj, self.attn = _Linear(width, 3 * width), _Linear(width, width), _Attention(2, width // 2)

    def forward(self, positions, hidden_states):
        q, k, v = self.qkv_proj(hidden_states)[0].chunk(3, dim=-1)
        return self.o_proj(self.attn(q, k, v))[0]


class LlamaAttention(_SelfAttention):
    """vLLM's Llama attention's wiring (``LlamaAttention.forward``): its attention runs over rows of queries."""

    def __init__(self, width: int) -> None:
        super().__init__(width)
        self.q_size = self.kv_size = width

    def rotary_emb(self, positions, q, k):
        angle = positions[:, None].float() / 10
        return q * torch.cos(angle) + torch.sin(angle), k * torch.cos(angle) - torch.sin(angle)

    def forward(self, positions, hidden_states):
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class Qwen2Attention(LlamaAttention):
    """vLLM's Qwen2 attention's wiring (``Qwen2Attention.forward``) with its optional q/k norm on: each head's query
    and key normed before the rotary embedding. Its attention runs over rows of queries too."""

    def __init__(self, width: int) -> None:
        super().__init__(width)
        self.num_heads, self.num_kv_heads, self.head_dim = self.attn.num_heads, self.attn.num_kv_heads, self.attn.head_size
        self.q_norm, self.k_norm = _Norm(self.head_dim), _Norm(self.head_dim)

    def forward(self, positions, hidden_states):
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        t = q.shape[0]
        q = self.q_norm(q.view(t, self.num_heads, self.head_dim)).view(t, self.q_size)
        k = self.k_norm(k.view(t, self.num_kv_heads, self.head_dim)).view(t, self.kv_size)
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class _Mlp(torch.nn.Module):
    def __init__(self, width: int, row_s: float, rows: list[int], clock: Clock) -> None:
        super().__init__()
        self.up, self.down, self.row_s, self.rows = _Linear(width, 2 * width), _Linear(2 * width, width), row_s, rows
        self.clock = clock

    def forward(self, x):
        self.clock.spend(self.row_s * x.shape[0])
        self.rows.append(x.shape[0])
        return self.down(torch.nn.functional.silu(self.up(x)[0]))[0]


class LlamaDecoderLayer(torch.nn.Module):
    """vLLM's Llama decoder layer's wiring (``LlamaDecoderLayer.forward``): the prefill runs it in pieces."""

    def __init__(self, width: int, row_s: float, rows: list[int], clock: Clock, attention: type = _SelfAttention) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = _Norm(width), _Norm(width)
        self.self_attn, self.mlp = attention(width), _Mlp(width, row_s, rows, clock)

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@pytest.mark.parametrize("attention", [_SelfAttention, LlamaAttention, Qwen2Attention])
def test_a_known_layer_runs_in_pieces_that_fit_the_budget_and_give_the_whole_layers_output(attention, clock):
    """Its stages, and its MLP's rows (and, with Llama's or Qwen2's attention, its attention's rows of queries) as
    the budget holds them (16 at least, or the stage's last): the same residual stream as the layers run whole, with the
    pre-hook's part called once per layer with the stream entering it."""
    torch.manual_seed(0)
    rows: list[int] = []
    modules = {i: LlamaDecoderLayer(8, 0.001, rows, clock, attention) for i in range(3)}
    hidden = torch.randn(100, 8)
    whole, seen = _prefill(hidden.clone(), last=2), []
    with torch.no_grad():
        run_layers(whole, modules, None, _no_hook)
        assert rows == [100, 100, 100]  # no request runs: each layer whole
        rows.clear()
        pieces, calls, stages = _prefill(hidden.clone(), last=2), 0, set()
        while pieces.layer <= 2:
            run_layers(pieces, modules, 0.03, lambda index, module, args, kwargs: seen.append((index, args[1].clone())))
            calls, stages = calls + 1, stages | {pieces.stage}
    ends = set(itertools.accumulate(rows)) & {100, 200, 300}
    assert sum(rows) == 300 and max(rows) <= 64 and calls > 3, rows
    assert all(n >= 16 or done in ends for n, done in zip(rows, itertools.accumulate(rows))), rows  # 16 or a layer's last
    assert ("attention" in stages) == (attention is not _SelfAttention)
    torch.testing.assert_close(pieces.hidden, whole.hidden)
    torch.testing.assert_close(pieces.residual, whole.residual)
    assert [index for index, _ in seen] == [0, 1, 2]
    torch.testing.assert_close(seen[0][1], hidden)
    assert all("forward" not in vars(m.self_attn.attn) for m in modules.values())


def test_the_attention_of_rows_from_the_middle_of_the_prompt_is_the_whole_prompts_there():
    torch.manual_seed(1)
    q, k, v = torch.randn(9, 8), torch.randn(9, 8), torch.randn(9, 8)
    whole = causal_attention(2, 2, 4, 0.5, q, k, v)
    torch.testing.assert_close(causal_attention(2, 2, 4, 0.5, q[5:], k, v, first=5), whole[5:])
    torch.testing.assert_close(causal_attention(2, 2, 4, 0.5, q[3:6], k[:6], v[:6], first=3), whole[3:6])


def test_vllms_attention_comes_back_when_a_layer_fails():
    class Failing(_Layer):
        def forward(self, positions, hidden, residual):
            self.self_attn.attn(hidden, hidden, hidden)
            raise RuntimeError("out of memory")

    modules = {0: Failing(0.0, [], 0)}
    with pytest.raises(RuntimeError, match="out of memory"):
        run_layers(_prefill(torch.randn(3, 8), last=0), modules, None, _no_hook)
    assert "forward" not in vars(modules[0].self_attn.attn)
