"""Engine: load a VLM, encode requests, run each method's prepare step, generate a batch with per-row
interventions.

One ``generate_batch`` call goes through five stages: bind (validate parameters against the model),
rewrite (methods that change the input), encode, prepare (extra analysis passes, batched per
method), and one batched ``generate`` in which each row carries its own methods and decoding settings.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pydantic import ValidationError
from transformers import (
    AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer, GenerationConfig,
)

from interventions.adapters import ChatTurn, EncodedPrompt, ModelAdapter, ModelInfo, TextAdapter, adapter_class_for
from interventions.adapters.base import StopForward
from interventions.methods.base import RequestInputs, RowState
from interventions.registry import MethodRegistry
from interventions.runtime import ForwardContext, Runtime
from model_zoo import builtin_model, resolve_model_path
from service.decoding import RowDecoding, RowSampler, RowStops, RowStreamer
from service.model_configs import ModelConfig, find_model_config

SEERIGHT_FILE = "seeright.json"
MIN_LOGPROB = -9999.0  # reported for tokens a contrast's plausibility cutoff ruled out (-inf is not JSON)


class RequestError(ValueError):
    """A request the engine cannot serve; ``field`` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class GenerationRequest:
    """One request: a prompt (or chat turns) with images, interventions and decoding settings."""

    prompt: str | None = None
    images: list[Image.Image] = field(default_factory=list)
    turns: list[ChatTurn] | None = None
    system: str | None = None
    interventions: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0  # with logprobs: the k most likely tokens at each step
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    image_fields: tuple[str, ...] = ()  # where each image came from (e.g. "messages[0].content[1]"), for errors

    def image_field(self, i: int) -> str:
        return self.image_fields[i] if i < len(self.image_fields) else f"images[{i}]"

    def chat(self) -> list[ChatTurn]:
        if self.turns is not None:
            return list(self.turns)
        if self.prompt is None:
            raise RequestError("prompt", "a prompt or chat turns are required")
        turns = [ChatTurn("system", self.system)] if self.system else []
        return [*turns, ChatTurn("user", self.prompt, len(self.images))]


@dataclass
class GenerationOutput:
    """What one request produced."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    timings: dict[str, float]
    diagnostics: dict[str, Any] = field(default_factory=dict)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass(frozen=True)
class StreamedToken:
    """One generated token as it is streamed: its id and, when the request asked for log-probs, the model's
    log-probability of it and the ``top_logprobs`` most likely tokens of its step."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def streamed_token(token: int, scores: torch.Tensor, request: GenerationRequest) -> StreamedToken:
    """``token`` with its log-probs from the step's raw ``scores`` (before sampling settings) if asked."""
    if not request.logprobs:
        return StreamedToken(token)
    return with_logprobs(token, scores, request.top_logprobs)


def with_logprobs(token: int, scores: torch.Tensor, top: int) -> StreamedToken:
    """The model's log-probability of ``token`` under ``scores`` and, with ``top``, the ``top`` most likely
    tokens of the step (floored at ``MIN_LOGPROB``)."""
    steps = scores.float().log_softmax(-1).clamp_min(MIN_LOGPROB)
    best = None
    if top:
        values, ids = steps.topk(top)
        best = list(zip(ids.tolist(), values.tolist()))
    return StreamedToken(token, float(steps[token]), best)


class Engine:
    """A loaded VLM with the intervention runtime installed."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        image_processor: Any,
        model_id: str,
        model_config: ModelConfig,
        methods: MethodRegistry | None = None,
    ) -> None:
        adapter_cls = adapter_class_for(model.config)
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.model_config = model_config
        self.adapter: ModelAdapter = adapter_cls(model, tokenizer, image_processor)
        self.info = self.adapter.info
        model_config.check_depth(self.info.num_layers)
        self.runtime = Runtime(model, self.adapter)
        self.methods = methods if methods is not None else MethodRegistry.builtin()
        self.passes = EnginePasses(self)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    # ---- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        model_config: str | None = None,
        methods: MethodRegistry | None = None,
    ) -> Engine:
        """Load a built-in model of ``model_zoo`` (tiny random models, ``seeright/shapes-llava``), a local
        folder or a hub id (llava-hf LLaVA, Qwen2-VL, Qwen2.5-VL). ``methods`` defaults to the built-in
        registry plus installed plug-ins."""
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
        source = resolve_model_path(model_id_or_path)
        built = builtin_model(model_id_or_path)
        if built is not None:
            model, tokenizer, processor = built
        else:
            config, auto, tokenizer, processor = _parts(source)
            model = auto.from_pretrained(source, dtype=torch_dtype, attn_implementation="sdpa").eval()
        if torch_dtype != "auto":
            model = model.to(dtype=torch_dtype)
        model = model.to(device)
        return cls(model, tokenizer, processor, model_id_or_path, _model_config(model_id_or_path, source, model.config, model_config), methods)

    @classmethod
    def weightless(cls, model_id_or_path: str, model_config: str | None = None) -> Engine:
        """The engine of a folder or hub id with its weights on the meta device: prompts, checks and parameter
        defaults without loading a byte of weights (the vLLM engine path, whose weights live in vLLM)."""
        source = resolve_model_path(model_id_or_path)
        config, auto, tokenizer, processor = _parts(source)
        with torch.device("meta"):
            model = auto.from_config(config)
        try:
            model.generation_config = GenerationConfig.from_pretrained(source)
        except OSError:  # none saved: the config's own
            pass
        return cls(model, tokenizer, processor, model_id_or_path, _model_config(model_id_or_path, source, config, model_config))

    def save_pretrained(self, path: str | Path) -> None:
        """Save model, tokenizer and image processor so that ``from_pretrained(path)`` reloads them."""
        path = Path(path)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        if self.adapter.image_processor is not None:
            self.adapter.image_processor.save_pretrained(path)
        (path / SEERIGHT_FILE).write_text(json.dumps({"model_config": self.model_config.name}))

    # ---- public generation API -------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        image: Image.Image | None = None,
        images: Sequence[Image.Image] | None = None,
        interventions: dict[str, dict[str, Any]] | None = None,
        **decoding: Any,
    ) -> GenerationOutput:
        """Generate for one request (see :class:`GenerationRequest` for the decoding keywords)."""
        imgs = list(images or ([] if image is None else [image]))
        request = GenerationRequest(prompt=prompt, images=imgs, interventions=interventions or {}, **decoding)
        return self.generate_batch([request])[0]

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        on_token: Callable[[int, int], None] | None = None,
        cancelled: Callable[[int], bool] | None = None,
    ) -> list[GenerationOutput]:
        """Generate for several requests in one batch; each row keeps its own methods and settings.

        Rows are run grouped by their methods (requests without interventions first), so that the rows
        a layer edits form one contiguous block of the batch; a batch in which some request has a contrast
        branch runs in a running batch (``_generate_running``); outputs and callbacks keep the caller's order.
        """
        order = sorted(range(len(requests)), key=lambda i: (bool(requests[i].interventions), sorted(requests[i].interventions)))
        run = self._generate_running if any(self.contrasts(r) for r in requests) else self._generate_rows
        outputs = run(
            [requests[i] for i in order],
            None if on_token is None else (lambda row, token: on_token(order[row], token)),
            None if cancelled is None else (lambda row: cancelled(order[row])),
        )
        result: list[GenerationOutput | None] = [None] * len(requests)
        for row, i in enumerate(order):
            result[i] = outputs[row]
        return result  # type: ignore[return-value]

    def _generate_rows(
        self,
        requests: Sequence[GenerationRequest],
        on_token: Callable[[int, int], None] | None,
        cancelled: Callable[[int], bool] | None,
    ) -> list[GenerationOutput]:
        start = time.perf_counter()
        with torch.inference_mode():
            inputs, states = self.admit(requests)
            prepared = time.perf_counter()
            rows = [decoding_of(r) for r in requests]
            want_logprobs = any(r.logprobs for r in requests)
            sequences, stops, prompt_len, logits = self._generate(
                [inp.prompt for inp in inputs], states, rows, on_token, cancelled, want_logprobs
            )
        done = time.perf_counter()
        timings = {"prepare_s": prepared - start, "generate_s": done - prepared, "total_s": done - start}
        outputs = []
        for b, request in enumerate(requests):
            tokens = sequences[b, prompt_len:].tolist()[: stops.length[b] or rows[b].max_new_tokens]
            out = self.finish(tokens, stops.reason[b], rows[b], inputs[b].prompt, states[b], timings)
            if request.logprobs:
                steps = [with_logprobs(tok, logits[t][b], request.top_logprobs) for t, tok in enumerate(out.token_ids)]
                add_logprobs(out, steps, request.top_logprobs)
            outputs.append(out)
        return outputs

    def _generate_running(
        self,
        requests: Sequence[GenerationRequest],
        on_token: Callable[[int, int], None] | None,
        cancelled: Callable[[int], bool] | None,
    ) -> list[GenerationOutput]:
        """A batch with contrast branches: ``model.generate`` has no room for a second row per request, so the
        batch runs in a :class:`~service.batching.RunningBatch` (all joining at once) until each row finishes."""
        from service.batching import RunningBatch  # it builds on this module

        batch = RunningBatch(self)
        rows = batch.admit(
            requests,
            on_token=None if on_token is None else [lambda t, i=i: on_token(i, t.id) for i in range(len(requests))],
            cancelled=None if cancelled is None else [lambda i=i: cancelled(i) for i in range(len(requests))],
        )
        outputs = {id(row): batch.output(row) for row in rows if row.reason is not None}
        while len(batch):
            outputs.update({id(row): batch.output(row) for row in batch.step()})
        return [outputs[id(row)] for row in rows]

    def admit(self, requests: Sequence[GenerationRequest]) -> tuple[list[RequestInputs], list[list[RowState]]]:
        """Everything before decoding: check, bind, fit images, rewrite, encode, analysis passes (batched per
        method). Each request's inputs (with its encoded prompt) and its rows' method states."""
        for r in requests:
            self._check_images(r)
        inputs = [RequestInputs(turns=r.chat(), images=list(r.images)) for r in requests]
        states = [self.bind(r.interventions, inp) for r, inp in zip(requests, inputs)]
        self._decoding_checks(requests)
        for inp, row in zip(inputs, states):
            fit_images(self.adapter, inp, row)
        for method in self.methods.values():
            users = [s for row in states for s in row if s.hooks is method]
            if users:
                method.rewrite(users, self.passes)
        for i, inp in enumerate(inputs):
            try:
                inp.prompt = self.encode(inp.turns, inp.images)
            except ValueError as exc:
                raise RequestError(f"requests[{i}].messages", str(exc)) from exc
        for method in self.methods.values():
            users = [s for row in states for s in row if s.hooks is method]
            if users:
                method.prepare(users, self.passes)
        for row in states:
            for state in row:
                if state.hooks.contrasts(state.params):
                    state.data["contrast_prompt"] = state.hooks.contrast_prompt(state, self.passes)
        return inputs, states

    def contrasts(self, request: GenerationRequest) -> bool:
        """Whether ``request`` runs a contrast branch (checked parameters; ``validate`` first)."""
        return any(self.methods[n].contrasts(p) for n, p in self.resolve_params(request.interventions).items())

    def validate(self, request: GenerationRequest) -> None:
        """Check a request's images, interventions and decoding settings without running the model."""
        self._check_images(request)
        self.bind(request.interventions, RequestInputs(turns=request.chat(), images=list(request.images)))
        self._decoding_checks([request])

    def runs_passes(self, request: GenerationRequest) -> bool:
        """Whether admitting ``request`` runs forward passes besides its prefill (a method's analysis)."""
        return any(self.methods[name].runs_passes for name in request.interventions if name in self.methods)

    def _check_images(self, request: GenerationRequest) -> None:
        for i, image in enumerate(request.images):
            try:
                self.adapter.check_image(image)
            except ValueError as exc:
                raise RequestError(request.image_field(i), f"this model cannot take this image: {exc}") from exc

    # ---- stages ----------------------------------------------------------------------------------
    def method_defaults(self, name: str) -> dict[str, Any]:
        """A method's defaults on this model, lowest first: the method's rules derived from the model,
        then the model config's entry (see :class:`~interventions.methods.base.Method`)."""
        method = self.methods[name]
        return {**method.defaults(self.info), **_given(self.model_config.methods.get(name))}

    def runnable(self, names: Sequence[str] | None = None) -> list[str]:
        """The methods (of ``names``, by default all) this model can run at their defaults, in method order."""
        return [n for n in (self.methods if names is None else names) if self.unavailable(n) is None]

    def unavailable(self, name: str) -> str | None:
        """Why method ``name`` cannot run on this model at its defaults (PAINT without a [CLS] token), or None."""
        try:
            self.resolve_params({name: {}})
        except RequestError as exc:
            return exc.message
        return None

    def derived_defaults(self, name: str) -> list[str]:
        """Parameters whose default on this model comes from the method's rule (the model config is silent)."""
        given = _given(self.model_config.methods.get(name))
        return sorted(k for k in self.methods[name].defaults(self.info) if k not in given)

    def resolve_params(self, interventions: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Each requested method's parameters, validated and completed with this model's defaults, in method
        order; a :class:`RequestError` names the offending field."""
        unknown = sorted(set(interventions) - set(self.methods))
        if unknown:
            raise RequestError("interventions", f"unknown method(s) {unknown}; available: {sorted(self.methods)}")
        resolved = {}
        for name in (n for n in self.methods if n in interventions):
            method, given = self.methods[name], interventions[name] or {}
            if not isinstance(given, dict):
                raise RequestError(f"interventions.{name}", "parameters must be an object")
            try:
                resolved[name] = method.check(method.params_model(**{**self.method_defaults(name), **_given(given)}), self.info)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(x) for x in err["loc"])
                raise RequestError(f"interventions.{name}.{where}", err["msg"]) from exc
            except ValueError as exc:
                raise RequestError(f"interventions.{name}", str(exc)) from exc
        return resolved

    def bind(self, interventions: dict[str, dict[str, Any]], request: RequestInputs) -> list[RowState]:
        """Validate a request's interventions against the model and its inputs; one state per method, in
        method order."""
        resolved = self.resolve_params(interventions)
        contrasting = [n for n, params in resolved.items() if self.methods[n].contrasts(params)]
        if len(contrasting) > 1:
            raise RequestError("interventions", f"{' and '.join(contrasting)} each contrast the output logits with a "
                               "branch of their own and do not compose; choose one")
        editing = frozenset(n for n in resolved if self.methods[n].edits_generation)
        states = []
        for name, params in resolved.items():
            try:
                states.append(self.methods[name].new_state(params, self.info, request, editing - {name}))
            except ValueError as exc:
                raise RequestError(f"interventions.{name}", str(exc)) from exc
        return states

    def _decoding_checks(self, requests: Sequence[GenerationRequest]) -> None:
        for r in requests:
            if r.max_new_tokens < 1:
                raise RequestError("max_new_tokens", "must be at least 1")
            if r.temperature < 0:
                raise RequestError("temperature", "must be >= 0")
            if not 0 < r.top_p <= 1:
                raise RequestError("top_p", "must be in (0, 1]")
            if not 0 <= r.top_logprobs <= 20:
                raise RequestError("top_logprobs", "must be in [0, 20]")
            if r.repetition_penalty <= 0:
                raise RequestError("repetition_penalty", "must be > 0")

    def encode(self, turns: list[ChatTurn], images: list[Image.Image]) -> EncodedPrompt:
        return self.adapter.encode(turns, images)

    def eos_token_ids(self) -> list[int]:
        return self.adapter.eos_token_ids

    def collate(self, prompts: Sequence[EncodedPrompt]) -> dict[str, torch.Tensor]:
        """Left-pad prompts into one batch (see :func:`place_rows` for the rows' layouts in it)."""
        length = max(len(p.input_ids) for p in prompts)
        pad_id = self.tokenizer.pad_token_id
        ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        extra = {k: torch.zeros((len(prompts), length), dtype=v.dtype) for k, v in prompts[0].extra.items()}
        for b, prompt in enumerate(prompts):
            pad = length - len(prompt.input_ids)
            ids[b, pad:] = prompt.input_ids
            mask[b, pad:] = 1
            for k, v in prompt.extra.items():
                extra[k][b, pad:] = v
        batch = {"input_ids": ids, "attention_mask": mask, **extra}
        images = ModelAdapter.concat_images([p.images for p in prompts if p.images])
        if "pixel_values" in images:
            images["pixel_values"] = images["pixel_values"].to(self.dtype)
        batch.update(images)
        return {k: v.to(self.device) for k, v in batch.items()}

    def prefill(
        self, prompts: Sequence[EncodedPrompt], rows: Sequence[Sequence[RowState]], stop_after_layer: int | None
    ) -> None:
        """One batched forward with ``rows``' hooks, stopped after ``stop_after_layer`` (analysis passes)."""
        batch = self.collate(prompts)
        place_rows(prompts, rows)
        with self.runtime.activate(ForwardContext(rows, stop_after_layer=stop_after_layer, image_counts=image_counts(prompts))):
            try:
                self.model(**batch, use_cache=False)
            except StopForward:
                pass

    def greedy(
        self, prompts: Sequence[EncodedPrompt], rows: Sequence[Sequence[RowState]], max_new_tokens: int
    ) -> list[list[int]]:
        """Batched greedy generation with ``rows``' hooks; the new token ids of each row."""
        decoding = [RowDecoding(max_new_tokens)] * len(prompts)
        sequences, _, prompt_len, _ = self._generate(prompts, rows, decoding, None, None)
        return [seq[prompt_len:].tolist() for seq in sequences]

    def _generate(
        self,
        prompts: Sequence[EncodedPrompt],
        rows: Sequence[Sequence[RowState]],
        decoding: Sequence[RowDecoding],
        on_token: Callable[[int, int], None] | None,
        cancelled: Callable[[int], bool] | None,
        output_logits: bool = False,
    ) -> tuple[torch.Tensor, RowStops, int, tuple[torch.Tensor, ...] | None]:
        batch = self.collate(prompts)
        place_rows(prompts, rows)
        prompt_len = batch["input_ids"].shape[1]
        stops = RowStops(decoding, prompt_len, self._decode_text, cancelled)
        streamer = RowStreamer(on_token, stops, set(self.eos_token_ids())) if on_token else None
        # rows without interventions need no context: every hook then returns at its first check
        active = self.runtime.activate(ForwardContext(rows, image_counts=image_counts(prompts))) if any(rows) else nullcontext()
        with active:
            out = self.model.generate(
                **batch,
                return_dict_in_generate=True,
                output_logits=output_logits,
                max_new_tokens=max(r.max_new_tokens for r in decoding),
                do_sample=False,
                logits_processor=[RowSampler(decoding, self.device, prompt_len)],
                stopping_criteria=[stops],
                streamer=streamer,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.eos_token_ids(),
            )
        return out.sequences.cpu(), stops, prompt_len, out.logits

    def _provenance(self, state: RowState) -> dict[str, Any]:
        """The parameters a row ran with, the model config they came from and which were derived."""
        name = state.hooks.name
        return {"params": state.params.model_dump(), "model_config": self.model_config.name, "derived": self.derived_defaults(name)}

    def _decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def finish(
        self, generated: list[int], reason: str | None, row: RowDecoding, prompt: EncodedPrompt, states: list[RowState],
        timings: dict[str, float],
    ) -> GenerationOutput:
        """A row's output from its generated tokens: cut after the first EOS and at the first stop string."""
        eos = set(self.eos_token_ids())
        tokens: list[int] = []
        for tok in generated:
            tokens.append(tok)
            if tok in eos:
                reason = "stop"
                break
        text = self._decode_text(tokens)
        for s in row.stop:
            if s in text:
                text, reason = text[: text.index(s)], "stop"
        if reason is None:
            reason = "length" if len(tokens) >= row.max_new_tokens else "stop"
        diagnostics = {s.hooks.name: {**to_python(s.diagnostics), **self._provenance(s)} for s in states}
        return GenerationOutput(text, tokens, len(prompt.input_ids), reason, dict(timings), diagnostics)


def _parts(source: str) -> tuple[Any, type, Any, Any]:
    """A folder's or hub id's config, the auto class that builds its model, its tokenizer and its image processor
    (None for a text-only model); an unsupported architecture fails here, before any weight is read."""
    config = AutoConfig.from_pretrained(source)
    text_only = adapter_class_for(config) is TextAdapter
    tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left")
    processor = None if text_only else AutoImageProcessor.from_pretrained(source, backend="pil")
    return config, AutoModelForCausalLM if text_only else AutoModelForImageTextToText, tokenizer, processor


def _model_config(model_id: str, source: str, config: Any, chosen: str | None) -> ModelConfig:
    """The model config named by ``chosen``, else the one a saved folder names, else the first that matches."""
    saved = Path(source) / SEERIGHT_FILE
    chosen = chosen or (json.loads(saved.read_text()).get("model_config") if saved.is_file() else None)
    return find_model_config(model_id, adapter_class_for(config).family, chosen)


def decoding_of(request: GenerationRequest) -> RowDecoding:
    return RowDecoding(
        request.max_new_tokens, request.temperature, request.top_p, request.seed, tuple(request.stop),
        request.presence_penalty, request.frequency_penalty, request.repetition_penalty,
    )


def add_logprobs(out: GenerationOutput, tokens: Sequence[StreamedToken], top: int) -> None:
    """Set ``out``'s log-probs from its tokens' (:func:`with_logprobs`), one per kept token."""
    kept = tokens[: len(out.token_ids)]
    out.logprobs = [t.logprob for t in kept]
    out.top_logprobs = [t.top for t in kept] if top else None


def fit_images(adapter: ModelAdapter, request: RequestInputs, states: list[RowState]) -> None:
    """Resize the request's images as its methods' releases do (``max_pixels``, the smallest asked for)."""
    limits = [s.params.max_pixels for s in states if getattr(s.params, "max_pixels", None)]
    if limits:
        request.images = [adapter.fit_image(image, min(limits)) for image in request.images]


class EngineGenerator:
    """The evaluation runner's generator (``eval.runner.Generator``) over an in-process engine (greedy)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def generate(
        self, prompts: Sequence[str], images: Sequence[Image.Image], interventions: dict, max_new_tokens: int
    ) -> list[str]:
        requests = [
            GenerationRequest(prompt=p, images=[im], interventions=interventions, max_new_tokens=max_new_tokens)
            for p, im in zip(prompts, images)
        ]
        return [out.text for out in self.engine.generate_batch(requests)]


class EnginePasses:
    """The extra passes methods may ask for (:class:`~interventions.methods.base.Passes`), on one engine.

    ``prefill`` and ``greedy`` place the given states in the pass's batch (their ``layout``)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.info: ModelInfo = engine.info
        self.model = engine.model  # for literal (test-only) versions that run a release's own uncached loop

    def encode(self, turns: list[ChatTurn], images: list[Image.Image]) -> EncodedPrompt:
        return self._engine.encode(turns, images)

    def eos_token_ids(self) -> list[int]:
        return self._engine.eos_token_ids()

    def batch(self, prompts: Sequence[EncodedPrompt]) -> dict[str, torch.Tensor]:
        return self._engine.collate(prompts)

    def cls_attention(self, images: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._engine.adapter.cls_attention(images)

    def vision_states(self, pixel_values: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        return self._engine.adapter.vision_states(pixel_values, layers)

    def pixel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._engine.adapter.pixel_stats()

    def prefill(
        self, prompts: Sequence[EncodedPrompt], rows: Sequence[Sequence[RowState]], stop_after_layer: int | None
    ) -> None:
        self._engine.prefill(prompts, rows, stop_after_layer)

    def greedy(
        self, prompts: Sequence[EncodedPrompt], rows: Sequence[Sequence[RowState]], max_new_tokens: int
    ) -> list[list[int]]:
        return self._engine.greedy(prompts, rows, max_new_tokens)


def place_rows(prompts: Sequence[EncodedPrompt], rows: Sequence[Sequence[RowState]]) -> None:
    """Point each row's states at its prompt's layout inside the left-padded batch of ``prompts``."""
    length = max(len(p.input_ids) for p in prompts)
    for prompt, states in zip(prompts, rows):
        for state in states:
            state.layout = prompt.layout.shifted(length - len(prompt.input_ids))


def image_counts(prompts: Sequence[EncodedPrompt]) -> list[int]:
    """Images per prompt, in the order a batch of ``prompts`` hands them to the vision tower."""
    return [len(p.layout.image_spans) for p in prompts]


def _given(params: dict[str, Any] | None) -> dict[str, Any]:
    """Parameters that are set (``None`` means "the default")."""
    return {k: v for k, v in (params or {}).items() if v is not None}


def to_python(value: Any) -> Any:
    """Diagnostics with tensors turned into numbers and lists (one device sync, at the end)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, dict):
        return {k: to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    return value
