"""PEFT LoRA adapter folders for the tiny models, written by PEFT itself, and the independent reference: PEFT's own
``merge_and_unload`` of the same folder into a fresh copy of the base model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from seeright.model_zoo.tiny_random import TINY_MODELS
from seeright.service.engine import Engine

# every linear layer of the language model (not the vision tower's or the projector's, which are not served per row)
LANGUAGE_MODEL = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def peft_adapter(family: str, folder: Path, seed: int = 0, r: int = 4, lora_alpha: float = 8, **config: Any) -> Path:
    """A random adapter of ``family``'s tiny model, saved by PEFT into ``folder``. PEFT's non-default init draws ``B``
    too (not zeros), so the adapter changes every answer."""
    model = TINY_MODELS[family]()[0]
    torch.manual_seed(seed)
    options = {"target_modules": LANGUAGE_MODEL, "init_lora_weights": False, **config}
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=lora_alpha, **options))
    peft_model.save_pretrained(folder)
    return folder


def merged_engine(family: str, folder: Path, like: Engine) -> Engine:
    """The base model with the adapter merged into its weights by PEFT, as an engine of ``like``'s config."""
    model, tokenizer, processor = TINY_MODELS[family]()
    merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload().eval()
    return Engine(merged, tokenizer, processor, family, like.model_config)
