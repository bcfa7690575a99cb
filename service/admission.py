"""Admission: what happens to a request before it decodes, on one loaded model.

Bind (each method's parameters validated and completed with the model's defaults), check images and decoding
settings, fit images, let input-rewriting methods run, encode, run the methods' analysis passes (batched per
method), build contrast prompts. :class:`Admission` is the part of the engine that does this; the engine
(:mod:`seeright.service.engine`) adds loading and generation on top, and the running batch
(:mod:`seeright.service.batching`) places admitted rows with :func:`place_rows`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from seeright.interventions.adapters import ChatTurn, EncodedPrompt, ModelAdapter, ModelInfo
from seeright.interventions.lora import Lora
from seeright.interventions.methods.base import Passes, RequestInputs, RowState
from seeright.interventions.registry import MethodRegistry
from seeright.interventions.runtime import Runtime
from seeright.service.model_configs import ModelConfig
from seeright.service.requests import GenerationRequest, RequestError


class Admission:
    """Checks, binding and preparation of requests for one model: its methods, config, adapter and passes."""

    methods: MethodRegistry
    model_config: ModelConfig
    info: ModelInfo
    adapter: ModelAdapter
    passes: Passes
    loras: dict[str, Lora]  # LoRA adapters by name (a request's ``adapter``)
    runtime: Runtime  # ``admit`` reports its stages to its progress hooks (where a sliced admission may pause)
    max_prompt_tokens: int | None = None  # a longer prompt (images included) is a 400 naming ``messages``

    def encode(self, turns: list[ChatTurn], images: list) -> EncodedPrompt:
        return self.adapter.encode(turns, images)

    def admit(self, requests: Sequence[GenerationRequest]) -> tuple[list[RequestInputs], list[list[RowState]]]:
        """Everything before decoding: check, bind, fit images, rewrite, encode, analysis passes (batched per
        method). Each request's inputs (with its encoded prompt) and its rows' method states. The runtime's progress
        hooks are called before each method's rewrite and preparation and each contrast prompt (``"admission ...
        {method}"``; the passes' ``encode`` calls them before each prompt), so that a sliced admission may pause before
        each and predicts each from the last one of its kind."""
        for r in requests:
            self._check_images(r)
        inputs = [RequestInputs(turns=r.chat(), images=list(r.images), lora=self.lora_of(r)) for r in requests]
        states = [self.bind(r.interventions, inp) for r, inp in zip(requests, inputs)]
        self._decoding_checks(requests)
        for inp, row in zip(inputs, states):
            fit_images(self.adapter, inp, row)
        for method in self.methods.values():
            users = [s for row in states for s in row if s.hooks is method]
            if users:
                self.runtime.reached(f"admission rewrite {method.name}")
                method.rewrite(users, self.passes)
        for i, inp in enumerate(inputs):
            try:
                inp.prompt = self.passes.encode(inp.turns, inp.images)
            except ValueError as exc:
                raise RequestError(f"requests[{i}].messages", str(exc)) from exc
            if self.max_prompt_tokens is not None and len(inp.prompt.input_ids) > self.max_prompt_tokens:
                raise RequestError("messages", f"the prompt is {len(inp.prompt.input_ids)} tokens; this server takes at "
                                   f"most {self.max_prompt_tokens}")
            for state in states[i]:
                try:
                    state.hooks.check_prompt(state)
                except ValueError as exc:
                    raise RequestError(f"interventions.{state.hooks.name}", str(exc)) from exc
        for method in self.methods.values():
            users = [s for row in states for s in row if s.hooks is method]
            if users:
                self.runtime.reached(f"admission prepare {method.name}")
                method.prepare(users, self.passes)
        for row in states:
            for state in row:
                if state.hooks.contrasts(state.params):
                    self.runtime.reached(f"admission contrast {state.hooks.name}")
                    state.data["contrast_prompt"] = state.hooks.contrast_prompt(state, self.passes)
        return inputs, states

    def lora_of(self, request: GenerationRequest) -> Lora | None:
        """The request's LoRA adapter (read once, at admission: unloading it later leaves the request its copy)."""
        if request.adapter is None:
            return None
        lora = self.loras.get(request.adapter)
        if lora is None:
            raise RequestError("model", f"no adapter {request.adapter!r} is loaded; loaded: {sorted(self.loras)}")
        return lora

    def takes_rows(self, request: GenerationRequest) -> bool:
        """Whether ``request`` decodes with rows besides its own: a contrast branch or candidates (checked
        parameters; ``validate`` first)."""
        return any(self.methods[n].contrasts(p) or self.methods[n].candidates(p) > 1
                   for n, p in self.resolve_params(request.interventions).items())

    def validate(self, request: GenerationRequest) -> None:
        """Check a request's images, interventions and decoding settings without running the model."""
        self._check_images(request)
        self.lora_of(request)
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

    def method_defaults(self, name: str) -> dict[str, Any]:
        """A method's defaults on this model, lowest first: the method's rules derived from the model,
        then the model config's entry (see :class:`~seeright.interventions.methods.base.Method`)."""
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
            preset = method.presets.get(given.get("preset"), {})  # an unknown name fails the field's own validation
            try:
                values = {**self.method_defaults(name), **preset, **_given(given)}
                resolved[name] = method.check(method.params_model(**values), self.info)
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
        guiding = [n for n, params in resolved.items() if self.methods[n].candidates(params) > 1]
        if guiding and contrasting:
            raise RequestError("interventions", f"{guiding[0]} samples candidate rows and {contrasting[0]} contrasts the "
                               "logits with a branch row; they do not compose; choose one")
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


def fit_images(adapter: ModelAdapter, request: RequestInputs, states: list[RowState]) -> None:
    """Resize the request's images as its methods' releases do (``max_pixels``, the smallest asked for)."""
    limits = [s.params.max_pixels for s in states if getattr(s.params, "max_pixels", None)]
    if limits:
        request.images = [adapter.fit_image(image, min(limits)) for image in request.images]


def place_rows(prompts: Sequence[EncodedPrompt], rows: Sequence[Sequence[RowState]]) -> None:
    """Point each row's states at its prompt's layout inside the left-padded batch of ``prompts``."""
    length = max(len(p.input_ids) for p in prompts)
    for prompt, states in zip(prompts, rows):
        for state in states:
            state.layout = prompt.layout.shifted(length - len(prompt.input_ids))


def row_loras(rows: Sequence[Sequence[RowState]]) -> list[Lora | None]:
    """Each row's LoRA adapter: the one its states' request carries (analysis passes run on the adapted model)."""
    return [next((s.request.lora for s in states if s.request is not None), None) for states in rows]


def image_counts(prompts: Sequence[EncodedPrompt]) -> list[int]:
    """Images per prompt, in the order a batch of ``prompts`` hands them to the vision tower."""
    return [len(p.layout.image_spans) for p in prompts]


def _given(params: dict[str, Any] | None) -> dict[str, Any]:
    """Parameters that are set (``None`` means "the default")."""
    return {k: v for k, v in (params or {}).items() if v is not None}

