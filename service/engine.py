"""Engine: the facade of one loaded VLM. Load it, admit requests (:mod:`seeright.service.admission`), generate.

The request path reads one way: request types (:mod:`~seeright.service.requests`), this facade, admission,
the running batch (:mod:`~seeright.service.batching`), decoding (:mod:`~seeright.service.decoding`); no module
of a lower step imports a higher one. One ``generate_batch`` call admits its requests (bind, rewrite, encode,
analysis passes) and runs one batched ``generate`` in which each row carries its own methods and decoding
settings; a batch with contrast branches runs in a running batch instead.
"""

from __future__ import annotations

import inspect
import json
import re
import time
from collections.abc import Callable, Hashable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer, GenerationConfig,
    PreTrainedModel,
)

from seeright.interventions.adapters import (
    ChatTurn, EncodedPrompt, ModelAdapter, ModelInfo, TextAdapter, adapter_class_for,
)
from seeright.interventions.adapters.base import StopForward
from seeright.interventions.lora import Lora, LoraError, read_peft_lora
from seeright.interventions.memo import Memo
from seeright.interventions.methods.base import Answer, HookPoint, RowState
from seeright.interventions.registry import MethodRegistry
from seeright.interventions.runtime import ForwardContext, Runtime
from seeright.model_zoo import builtin_model, resolve_model_path
from seeright.service.admission import Admission, image_counts, place_rows, row_loras
from seeright.service.batching import Row, RunningBatch
from seeright.service.decoding import RowDecoding, RowSampler, RowStops, RowStreamer
from seeright.service.growing_cache import GrowingCache
from seeright.service.model_configs import ModelConfig, find_model_config
from seeright.service.requests import (
    GenerationOutput, GenerationRequest, RequestError, StreamedToken, add_logprobs, decoding_of, with_logprobs,
)
from seeright.service.stops import StopMatcher

__all__ = ["Engine", "EngineGenerator", "GenerationOutput", "GenerationRequest", "RequestError", "StreamedToken"]

SEERIGHT_FILE = "seeright.json"
T = TypeVar("T")


class Engine(Admission):
    """A loaded VLM with the intervention runtime installed: admission (inherited), loading and generation."""

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
        self.max_prompt_tokens = context_length(model.config)
        self.dtype = next(model.parameters()).dtype
        self.loras: dict[str, Lora] = {}
        # the name the forward takes a KV cache by: ``cache`` since transformers 5.2x, ``past_key_values`` before
        self.cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    # ---- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        model_config: str | None = None,
        methods: MethodRegistry | None = None,
        loras: dict[str, str | Path] | None = None,
        max_lora_rank: int = 64,
    ) -> Engine:
        """Load a built-in model of ``model_zoo`` (tiny random models, ``seeright/shapes-llava``), a local
        folder or a hub id (llava-hf LLaVA, Qwen2-VL, Qwen2.5-VL), and the PEFT LoRA folders of ``loras`` (name ->
        path). ``methods`` defaults to the built-in registry plus installed plug-ins."""
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
        source = resolve_model_path(model_id_or_path)
        built = builtin_model(model_id_or_path, device=device)
        if built is not None:
            model, tokenizer, processor = built
        else:
            config, auto, tokenizer, processor = _parts(source)
            model = auto.from_pretrained(source, dtype=torch_dtype, attn_implementation="sdpa").eval()
        if torch_dtype != "auto":
            model = model.to(dtype=torch_dtype)
        model = model.to(device)
        engine = cls(model, tokenizer, processor, model_id_or_path, _model_config(model_id_or_path, source, model.config, model_config), methods)
        for name, path in (loras or {}).items():
            engine.load_lora(name, path, max_lora_rank)
        return engine

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

    def load_tower(self, device: str, dtype: str | torch.dtype) -> bool:
        """Give a :meth:`weightless` engine's vision tower and projector (the adapter's ``tower_modules``) their
        weights from the model's safetensors, on ``device`` in ``dtype``, reading no other tensor: the vLLM engine's
        client runs the methods' tower passes on it. False where the adapter names no tower modules."""
        modules = self.adapter.tower_modules
        if not modules:
            return False
        if dtype == "auto":  # as vLLM reads it: the checkpoint's own
            dtype = getattr(self.model.config, "dtype", None) or torch.float32
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        folder = Path(resolve_model_path(self.model_id))
        wanted = {name: module.state_dict().keys() for name, module in modules.items()}
        found: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}
        for shard in sorted(folder.glob("*.safetensors")):  # each shard's header read once, only tower tensors loaded
            with safe_open(str(shard), "pt") as tensors:
                for key in tensors.keys():
                    for name in modules:
                        local = _tower_key(key, name, wanted[name])
                        if local is not None:
                            found[name][local] = tensors.get_tensor(key)
        for name, module in modules.items():
            missing = sorted(set(wanted[name]) - set(found[name]))
            if missing:
                raise ValueError(f"{folder}: no weights for {name}.{missing[0]} (and {len(missing) - 1} more)")
            module.to_empty(device=device)
            if isinstance(module, PreTrainedModel):  # non-persistent buffers (CLIP's position ids) are set here
                module.apply(module._init_weights)
            module.load_state_dict(found[name], strict=True)
            module.to(torch_dtype).eval()
        return True

    def save_pretrained(self, path: str | Path) -> None:
        """Save model, tokenizer and image processor so that ``from_pretrained(path)`` reloads them. The vision tower
        is written in the hub's layout (``vision_tower.vision_model.*``, as ``llava-hf`` checkpoints are), which
        transformers 5 reads back and vLLM's LLaVA loader requires (:func:`hub_layout`)."""
        path = Path(path)
        self.model.save_pretrained(path)
        hub_layout(path)
        self.tokenizer.save_pretrained(path)
        if self.adapter.image_processor is not None:
            self.adapter.image_processor.save_pretrained(path)
        (path / SEERIGHT_FILE).write_text(json.dumps({"model_config": self.model_config.name}))

    # ---- LoRA adapters -----------------------------------------------------------------------------
    def load_lora(self, name: str, path: str | Path, max_rank: int = 64) -> Lora:
        """Read a PEFT LoRA folder for this model and serve it as ``name`` (a request's ``adapter``); a
        :class:`~seeright.interventions.lora.LoraError` names what is wrong. Safe beside a running scheduler: the
        name table is replaced, never edited, and each request holds the adapter it was admitted with."""
        if not name or "+" in name or name == self.model_id:
            raise LoraError("lora_name", f"{name!r}: an adapter needs a name of its own without '+' (it is a model id)")
        if name in self.loras:
            raise LoraError("lora_name", f"an adapter {name!r} is already loaded; unload it first")
        lora = read_peft_lora(path, name, self.runtime.lora_modules, max_rank, self.device, self.dtype,
                              [n for n, _ in self.model.named_modules()])
        self.loras = {**self.loras, name: lora}
        return lora

    def unload_lora(self, name: str) -> None:
        """Stop serving adapter ``name`` (a KeyError if none); requests already admitted keep it to their end."""
        if name not in self.loras:
            raise KeyError(name)
        self.runtime.lora_stacks.forget(self.loras[name])
        self.loras = {k: v for k, v in self.loras.items() if k != name}

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
        branch or candidates runs in a running batch (``_generate_running``); outputs and callbacks keep the
        caller's order.
        """
        order = sorted(range(len(requests)), key=lambda i: (bool(requests[i].interventions), sorted(requests[i].interventions)))
        run = self._generate_running if any(self.takes_rows(r) for r in requests) else self._generate_rows
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
                [inp.prompt for inp in inputs], states, rows, on_token, cancelled, want_logprobs, [inp.lora for inp in inputs]
            )
        done = time.perf_counter()
        timings = {"prepare_s": prepared - start, "generate_s": done - prepared, "total_s": done - start}
        ended = [(sequences[b, prompt_len:].tolist()[: stops.length[b] or rows[b].max_new_tokens], stops.reason[b], rows[b],
                  inputs[b].prompt, states[b]) for b in range(len(requests))]
        outputs = []
        for b, (request, out) in enumerate(zip(requests, self.finish_rows(ended, timings))):
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
        """A batch with contrast branches or candidates: ``model.generate`` has no room for more rows per request, so the
        batch runs in a :class:`~seeright.service.batching.RunningBatch` (all joining at once) until each row finishes."""
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

    # ---- stages ----------------------------------------------------------------------------------
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
        context = ForwardContext(rows, stop_after_layer=stop_after_layer, image_counts=image_counts(prompts), loras=row_loras(rows))
        with self.runtime.activate(context):
            try:
                self.model(**batch, use_cache=False)
            except StopForward:
                pass

    def greedy(
        self, prompts: Sequence[EncodedPrompt], rows: Sequence[Sequence[RowState]], max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy generation with ``rows``' hooks, in a running batch of its own: each row prefilled in a forward of
        its own (so that a sliced admission's segments hold one row's work, :mod:`seeright.service.slicing`), then
        all decoded together, its cache sized to them: room for the rows that join the first and for
        ``max_new_tokens``. The new token ids of each row, up to its EOS or ``max_new_tokens``."""
        batch = RunningBatch(self, spare_rows=max(len(prompts) - 1, 0), spare=max_new_tokens)
        request = GenerationRequest(max_new_tokens=max_new_tokens)
        members = [Row(request, prompt, list(states), decoding_of(request), lora=lora)
                   for prompt, states, lora in zip(prompts, rows, row_loras(rows))]
        batch.install(batch.joined(batch.prefill(members, apart=True)))
        while len(batch):
            batch.step()
        return [row.tokens for row in members]

    def _generate(
        self,
        prompts: Sequence[EncodedPrompt],
        rows: Sequence[Sequence[RowState]],
        decoding: Sequence[RowDecoding],
        on_token: Callable[[int, int], None] | None,
        cancelled: Callable[[int], bool] | None,
        output_logits: bool = False,
        loras: Sequence[Lora | None] | None = None,
    ) -> tuple[torch.Tensor, RowStops, int, tuple[torch.Tensor, ...] | None]:
        """Batched ``model.generate`` with each row's hooks and LoRA adapter (by default the one its states' request
        carries: an analysis pass runs on the adapted model of the request it serves)."""
        batch = self.collate(prompts)
        place_rows(prompts, rows)
        prompt_len = batch["input_ids"].shape[1]
        stops = RowStops(decoding, prompt_len, self.decode_text, cancelled)
        streamer = RowStreamer(on_token, stops, set(self.eos_token_ids())) if on_token else None
        # rows without interventions need no context: every hook then returns at its first check
        context = ForwardContext(rows, image_counts=image_counts(prompts), loras=loras if loras is not None else row_loras(rows))
        active = nullcontext() if context.idle else self.runtime.activate(context)
        with active:
            out = self.model.generate(
                **batch,
                **{self.cache_argument: GrowingCache()},  # decode steps write into its room, not a copy of the cache
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

    def provenance(self, state: RowState) -> dict[str, Any]:
        """The parameters a row ran with, the model config they came from and which were derived."""
        name = state.hooks.name
        return {"params": state.params.model_dump(), "model_config": self.model_config.name, "derived": self.derived_defaults(name)}

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def finish(
        self, generated: list[int], reason: str | None, row: RowDecoding, prompt: EncodedPrompt, states: list[RowState],
        timings: dict[str, float],
    ) -> GenerationOutput:
        """A row's output from its generated tokens: cut after the first EOS and at the first stop string."""
        return self.finish_rows([(generated, reason, row, prompt, states)], timings)[0]

    def finish_rows(
        self, rows: Sequence[tuple[list[int], str | None, RowDecoding, EncodedPrompt, list[RowState]]],
        timings: dict[str, float],
    ) -> list[GenerationOutput]:
        """Outputs of rows that ended together (:meth:`finish`); their methods' reflection passes run batched."""
        answers = [self._cut(generated, reason, row) for generated, reason, row, _, _ in rows]
        reflecting: dict[Any, tuple[list[RowState], list[Answer]]] = {}
        for (_, _, row, _, states), (tokens, text, _) in zip(rows, answers):
            for state in states:
                if HookPoint.REFLECT in getattr(state.hooks, "hook_points", ()):
                    group = reflecting.setdefault(state.hooks, ([], []))
                    group[0].append(state)
                    group[1].append(Answer(tokens, text, row.max_new_tokens))
        if reflecting:
            with torch.inference_mode():
                for method, (states, answered) in reflecting.items():
                    method.reflect(states, self.passes, answered)
        return [
            GenerationOutput(text, tokens, len(prompt.input_ids), reason, dict(timings),
                             {s.hooks.name: {**to_python(s.diagnostics), **self.provenance(s)} for s in states})
            for (tokens, text, reason), (_, _, _, prompt, states) in zip(answers, rows)
        ]

    def _cut(self, generated: list[int], reason: str | None, row: RowDecoding) -> tuple[list[int], str, str]:
        """Tokens up to the first EOS, the text up to the first stop string, and why the row ended."""
        eos = set(self.eos_token_ids())
        tokens: list[int] = []
        for tok in generated:
            tokens.append(tok)
            if tok in eos:
                reason = "stop"
                break
        text = self.decode_text(tokens)
        cut = StopMatcher(row.stop).feed(text)
        if cut is not None:
            text, reason = text[:cut], "stop"
        if reason is None:
            reason = "length" if len(tokens) >= row.max_new_tokens else "stop"
        return tokens, text, reason


def _tower_key(key: str, module: str, wanted: Any) -> str | None:
    """The name in ``module``'s state dict of checkpoint tensor ``key`` (``[model.]module.[vision_model.]name``, as
    transformers 5 saves it or in the hub layout), or None if it is not one of ``module``'s."""
    found = re.match(rf"^(?:model\.)?{re.escape(module)}\.(.+)$", key)
    if found is None:
        return None
    local = found[1]
    if local not in wanted and local.startswith("vision_model."):
        local = local.removeprefix("vision_model.")
    return local if local in wanted else None


FLAT_TOWER = re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)(embeddings|encoder|pre_layrnorm|post_layernorm)\.")


def hub_layout(folder: Path) -> None:
    """Rename a saved CLIP tower's weights from transformers 5's flat ``vision_tower.embeddings...`` to the hub's
    ``vision_tower.vision_model.embeddings...`` in every safetensors shard (and the shard index). transformers 5 maps
    the hub layout back when it loads (its ``CLIPVisionModel`` prefix rule); vLLM 0.32's LLaVA loader reads only it.
    Other towers (Qwen2-VL's ``visual``) are left as they are."""
    rename = lambda key: FLAT_TOWER.sub(lambda m: f"{m[1] or ''}vision_tower.vision_model.{m[2]}.", key)  # noqa: E731
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        if any(rename(k) != k for k in tensors):
            save_file({rename(k): v for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def context_length(config: Any) -> int | None:
    """The language model's context length (``max_position_embeddings``), if its config gives one."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


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


class EngineGenerator:
    """The evaluation runner's generator (``seeright.eval.runner.Generator``) over an in-process engine (greedy), on
    the base model or one LoRA adapter."""

    def __init__(self, engine: Engine, adapter: str | None = None) -> None:
        self.engine = engine
        self.adapter = adapter

    def on_adapter(self, adapter: str) -> EngineGenerator:
        """The same generator on a loaded LoRA adapter."""
        return EngineGenerator(self.engine, adapter)

    def generate(
        self, prompts: Sequence[str], images: Sequence[Image.Image], interventions: dict, max_new_tokens: int
    ) -> list[str]:
        requests = [
            GenerationRequest(prompt=p, images=[im], interventions=interventions, max_new_tokens=max_new_tokens,
                              adapter=self.adapter)
            for p, im in zip(prompts, images)
        ]
        return [out.text for out in self.engine.generate_batch(requests)]


class EnginePasses:
    """The extra passes methods may ask for (:class:`~seeright.interventions.methods.base.Passes`), on one engine.

    ``prefill`` and ``greedy`` place the given states in the pass's batch (their ``layout``)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.info: ModelInfo = engine.info
        self.model = engine.model  # for literal (test-only) versions that run a release's own uncached loop
        self.cache = Memo()

    def encode(self, turns: list[ChatTurn], images: list[Image.Image]) -> EncodedPrompt:
        """The prompt's tokens and images, after the runtime's progress hooks at ``"admission encode"`` (a sliced
        admission may pause before each prompt's image processing, a segment of its own)."""
        self._engine.runtime.reached("admission encode")
        return self._engine.encode(turns, images)

    def eos_token_ids(self) -> list[int]:
        return self._engine.eos_token_ids()

    def decode_text(self, ids: list[int]) -> str:
        return self._engine.decode_text(ids)

    def batch(self, prompts: Sequence[EncodedPrompt]) -> dict[str, torch.Tensor]:
        return self._engine.collate(prompts)

    def cls_attention(self, images: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._engine.adapter.cls_attention(images)

    def vision_states(self, pixel_values: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        return self._engine.adapter.vision_states(pixel_values, layers)

    def pixel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._engine.adapter.pixel_stats()

    def memo(self, key: Hashable, compute: Callable[[], T]) -> T:
        return self.cache.get(key, compute)

    def prefill(
        self, prompts: Sequence[EncodedPrompt], rows: Sequence[Sequence[RowState]], stop_after_layer: int | None
    ) -> None:
        self._engine.prefill(prompts, rows, stop_after_layer)

    def greedy(
        self, prompts: Sequence[EncodedPrompt], rows: Sequence[Sequence[RowState]], max_new_tokens: int
    ) -> list[list[int]]:
        return self._engine.greedy(prompts, rows, max_new_tokens)


def to_python(value: Any) -> Any:
    """Diagnostics with tensors turned into numbers and lists (one device sync, at the end)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, dict):
        return {k: to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    return value
