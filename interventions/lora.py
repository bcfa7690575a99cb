"""LoRA adapters applied per batch row: each row's low-rank delta on its own rows, never merged into shared weights.

A PEFT adapter folder (``adapter_config.json`` and ``adapter_model.safetensors``) is read by :func:`read_peft_lora`
into a :class:`Lora`: for each adapted ``nn.Linear`` of the language model, ``A`` ``[r, in]`` and ``B`` ``[out, r]``
with the scale folded into ``B`` (Hu et al., 2021, eq. 3: ``h = W0 x + (alpha / r) B A x``; rsLoRA's
``alpha / sqrt(r)`` with ``use_rslora``). :func:`lora_hooks` installs, for one forward, a forward hook on every
adapted module that adds ``x A^T B^T`` to the output rows of the batch rows that carry that adapter: the adapted
rows and their adapters' weights (stacked by :class:`LoraStacks`) are gathered and multiplied in two batched
products for all adapters at once; rows without an adapter are never touched, so they keep the base model's output
bit for bit.

Only the language model's linear layers and its output head are served (their batch dimension is the batch's
rows); an adapter of the vision tower or projector (whose batch is the images) is refused, as are DoRA, bias
training and ``modules_to_save``.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.hooks import RemovableHandle

from seeright.interventions.thread_hooks import this_thread_only

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
# older checkpoint layouts of the same modules -> transformers 5's (llava-hf before v5; LLaVA's own release)
LEGACY_PREFIXES = (("language_model.model.", "model.language_model."), ("language_model.lm_head", "lm_head"),
                   ("model.layers.", "model.language_model.layers."), ("model.norm", "model.language_model.norm"))


class LoraError(ValueError):
    """An adapter this model cannot serve; ``field`` names what is wrong (``lora_path``, a config key, ``r``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(eq=False)
class Lora:
    """One loaded adapter: per module name, ``(A [r, in], B [out, r] * scale)`` on the model's device and dtype."""

    name: str
    path: str
    rank: int
    base_model: str | None
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def row_modules(model: nn.Module, language_model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers whose batch dimension is the batch's rows: the language model's and the output head."""
    prefix = next(name for name, module in model.named_modules() if module is language_model)
    head = model.get_output_embeddings()
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and (name.startswith(prefix + ".") or module is head)}


def read_peft_lora(
    path: str | Path, name: str, modules: Mapping[str, nn.Linear], max_rank: int, device: torch.device,
    dtype: torch.dtype, all_modules: Sequence[str] = (),
) -> Lora:
    """Read and check a PEFT LoRA folder against ``modules`` (:func:`row_modules`); a :class:`LoraError` names the
    field at fault. ``all_modules`` (every module name of the model) tells a module we do not serve from one the
    model lacks."""
    folder = Path(path)
    if not folder.is_dir():
        raise LoraError("lora_path", f"{str(path)!r} is not a folder")
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise LoraError("lora_path", f"no {CONFIG_FILE} in {str(path)!r}: not a PEFT adapter folder")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoraError(CONFIG_FILE, f"not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise LoraError(CONFIG_FILE, "must be a JSON object")
    _check_config(config)
    tensors = _read_weights(folder)
    pairs = _pairs(tensors, modules, all_modules)
    default_r, default_alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    weights = {}
    for module, (a, b) in pairs.items():
        linear = modules[module]
        r = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != r:
            raise LoraError(f"weights.{module}", f"lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not a rank-r pair")
        if a.shape[1] != linear.in_features or b.shape[0] != linear.out_features:
            raise LoraError("base_model_name_or_path", f"{module} is {linear.in_features} -> {linear.out_features} here but "
                            f"{a.shape[1]} -> {b.shape[0]} in the adapter: it was trained on another base model")
        if r > max_rank:
            raise LoraError("r", f"rank {r} at {module} exceeds this server's max_lora_rank of {max_rank}")
        alpha = _pattern(config.get("alpha_pattern"), module, default_alpha)
        configured = _pattern(config.get("rank_pattern"), module, default_r)
        if configured != r:
            raise LoraError("r", f"{module} has rank {r} in its weights but {configured} in {CONFIG_FILE}")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        weights[module] = (a.to(device=device, dtype=dtype), (b.float() * scale).to(device=device, dtype=dtype))
    return Lora(name, str(path), max(a.shape[0] for a, _ in weights.values()), config.get("base_model_name_or_path"), weights)


def _check_config(config: dict[str, Any]) -> None:
    """Refuse what per-row serving cannot reproduce exactly (the field named)."""
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise LoraError("peft_type", f"{config.get('peft_type')!r} adapters are not served; only LORA")
    if config.get("use_dora"):
        raise LoraError("use_dora", "DoRA adapters are not served (their magnitude vector rescales the merged weight)")
    if config.get("bias", "none") != "none":
        raise LoraError("bias", f"{config.get('bias')!r}: adapters that train biases are not served; only 'none'")
    if config.get("modules_to_save"):
        raise LoraError("modules_to_save", f"{config['modules_to_save']}: fully trained modules are not served per row")
    if config.get("fan_in_fan_out"):
        raise LoraError("fan_in_fan_out", "Conv1D (GPT-2 style) layers are not served")
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise LoraError(key, f"must be a positive number, not {value!r}")


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    for file in WEIGHT_FILES:
        if (folder / file).is_file():
            try:
                if file.endswith(".safetensors"):
                    return load_file(folder / file)
                return torch.load(folder / file, map_location="cpu", weights_only=True)
            except Exception as exc:  # a corrupt file: any of safetensors' or torch's errors
                raise LoraError("lora_path", f"{file} cannot be read: {exc}") from exc
    raise LoraError("lora_path", f"no {' or '.join(WEIGHT_FILES)} in the folder")


def _pairs(
    tensors: dict[str, torch.Tensor], modules: Mapping[str, nn.Linear], all_modules: Sequence[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (A, B)}`` from PEFT's keys (``base_model.model.<module>.lora_A.weight``)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    known = set(all_modules)
    for key, tensor in tensors.items():
        stem, _, part = key.removesuffix(".weight").rpartition(".")
        if part not in ("lora_A", "lora_B"):
            raise LoraError("weights", f"{key!r} is not a LoRA weight (lora_A / lora_B): not a LoRA adapter")
        found.setdefault(_module_name(stem.removeprefix(PEFT_PREFIX), modules, known), {})[part] = tensor
    if not found:
        raise LoraError("weights", "the adapter has no weights")
    pairs = {}
    for module, parts in found.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise LoraError(f"weights.{module}", "has only one of lora_A and lora_B")
        pairs[module] = (parts["lora_A"], parts["lora_B"])
    return pairs


def _module_name(stem: str, modules: Mapping[str, nn.Linear], known: set[str]) -> str:
    candidates = [stem] + [new + stem[len(old):] for old, new in LEGACY_PREFIXES if stem.startswith(old)]
    for name in candidates:
        if name in modules:
            return name
    if any(name in known for name in candidates):
        raise LoraError("target_modules", f"{stem} is outside the language model (the vision tower or projector) or not "
                        "a linear layer: only the language model's linear layers are served per row")
    raise LoraError("base_model_name_or_path", f"this model has no module {stem}: the adapter was trained on another "
                    "base model or architecture")


def _pattern(pattern: Any, module: str, default: float) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern``: the value of the first key that ends ``module`` (PEFT matches
    a key as a suffix of the module's name), else ``default``."""
    for key, value in (pattern or {}).items():
        if module == key or module.endswith("." + key):
            return value
    return default


class LoraStacks:
    """Adapter weights stacked per module for gathered products, kept for the last few arrangements of adapters
    a batch had (a running batch keeps one for many steps): ``A^T`` ``[N, in, R]`` and ``B^T`` ``[N, R, out]``,
    zero-padded to the largest rank R there (a padded rank, or a module an adapter leaves alone, adds exact zeros).

    While the rows' copies fit ``max_row_bytes``, N is the adapted rows (each row's adapter copied once for every
    step); past that, N is the distinct adapters and each forward gathers the rows' weights per module."""

    def __init__(self, capacity: int = 4, max_row_bytes: int = 128 << 20) -> None:
        self.capacity = capacity
        self.max_row_bytes = max_row_bytes
        self._sets: OrderedDict[tuple[Lora, ...], dict[str, tuple[torch.Tensor, torch.Tensor] | None]] = OrderedDict()

    def per_row(self, rows: Sequence[Lora]) -> bool:
        """Whether the adapted rows ``rows`` get copies of their own (else their adapters are gathered per step)."""
        return sum(lora.nbytes for lora in rows) <= self.max_row_bytes

    def of(self, loras: tuple[Lora, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor] | None]:
        """The (lazily filled) per-module stacks of ``loras``; the least recently used arrangement is dropped."""
        stacks = self._sets.pop(loras, None)
        if stacks is None:
            stacks = {}
            while len(self._sets) >= self.capacity:
                self._sets.popitem(last=False)
        self._sets[loras] = stacks
        return stacks

    def forget(self, lora: Lora) -> None:
        """Drop every arrangement that holds ``lora`` (it was unloaded)."""
        for key in [key for key in self._sets if lora in key]:
            del self._sets[key]

    @staticmethod
    def stack(loras: tuple[Lora, ...], module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A^T, B^T)`` of ``module`` for each of ``loras``, or None when none of them adapts it."""
        pairs = {lora: lora.weights.get(module) for lora in loras}
        present = [pair for pair in pairs.values() if pair is not None]
        if not present:
            return None
        rank = max(a.shape[0] for a, _ in present)
        a0, b0 = present[0]
        a_t = a0.new_zeros(len(loras), a0.shape[1], rank)
        b_t = b0.new_zeros(len(loras), rank, b0.shape[0])
        for n, lora in enumerate(loras):
            pair = pairs[lora]
            if pair is not None:
                a, b = pair
                a_t[n, :, : a.shape[0]] = a.t()
                b_t[n, : b.shape[1]] = b.t()
        return a_t, b_t


def lora_hooks(
    modules: Mapping[str, nn.Linear], loras: Sequence[Lora | None], stacks: LoraStacks | None = None,
) -> list[RemovableHandle]:
    """Forward hooks adding each row's adapter delta to its rows of every adapted module's output, for one forward
    whose batch row b carries ``loras[b]``; none when no row has an adapter.

    Per module, the adapted rows ``x_n`` ``[T, in]`` are multiplied with their own adapter's stacked weights in two
    batched products, ``(x_n A_n^T) B_n^T`` for all n at once (the gathered BGMV of Punica / S-LoRA); rows without
    an adapter are left as they are."""
    rows = [b for b, lora in enumerate(loras) if lora is not None]
    if not rows:
        return []
    stacks = stacks or LoraStacks(1)
    arrangement = tuple(loras[b] for b in rows)
    distinct = tuple(dict.fromkeys(arrangement))
    gathered = not stacks.per_row(arrangement) and len(distinct) < len(arrangement)
    keyed = distinct if gathered else arrangement
    stacked = stacks.of(keyed)
    slots = [distinct.index(lora) for lora in arrangement]
    every_row = len(rows) == len(loras)
    indices: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
    adapted = set().union(*(lora.weights for lora in distinct))

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if name not in stacked:
                stacked[name] = LoraStacks.stack(keyed, name)
            pair = stacked[name]
            if pair is None:
                return output
            a_t, b_t = pair
            x = args[0]
            if x.device not in indices:
                indices[x.device] = (torch.tensor(rows, device=x.device), torch.tensor(slots, device=x.device))
            row_index, slot_index = indices[x.device]
            if gathered:
                a_t, b_t = a_t.index_select(0, slot_index), b_t.index_select(0, slot_index)
            if not every_row:
                x = x.index_select(0, row_index)
            flat = x.reshape(len(rows), -1, x.shape[-1])
            delta = torch.bmm(torch.bmm(flat, a_t), b_t).reshape(*x.shape[:-1], b_t.shape[-1]).to(output.dtype)
            return output + delta if every_row else output.index_add(0, row_index, delta)

        return hook

    return [modules[name].register_forward_hook(this_thread_only(hook_for(name))) for name in sorted(adapted)]
