"""Built-in tiny random models, tokenizers and image processors, made entirely in code (no download).

``tiny-random/llava`` and ``tiny-random/qwen2-vl`` are what tests, demos and benchmarks use offline;
``tiny-random/llama`` is a text-only model both engines (transformers and vLLM) run.
Random weights have no attention sinks of their own, so the builders plant them the way they arise in
real LVLMs: one hidden unit of the projector writes a massive value on the configured sink dims
(``configs/models/tiny-random-*.yaml``) for the image tokens where that unit is active, and the BOS
embedding carries one too (a text sink). Weights are drawn with a larger spread than HF's init so that
attention is far from uniform and greedy outputs depend on the image.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from torch import nn
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

SINK_DIMS = (7, 21)
SINK_SCALE = 40.0
BOS_SINK_SCALE = 150.0
HIDDEN = 64
LAYERS = 6
HEADS = 8
IMAGE_SIDE = 32

LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
]


def byte_level_tokenizer(specials: list[str], bos: str | None, eos: str, pad: str) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: special tokens first, then the 256 byte symbols."""
    vocab = {tok: i for i, tok in enumerate(specials)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=specials[0], padding_side="left"
    )


def _spread_weights(model: nn.Module, std: float, seed: int) -> None:
    """Redraw every linear and embedding weight from N(0, std^2) with the generator of the model's device (on a CPU
    the same weights on every machine; on a GPU that device's own stream of numbers)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator, device=device) * std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()


def _plant_sinks(projector_out: nn.Linear, embed: nn.Embedding, bos_id: int | None) -> None:
    """Unit 0 entering ``projector_out`` drives the sink dims; BOS gets a massive sink-dim value too."""
    with torch.no_grad():
        for dim in SINK_DIMS:
            projector_out.weight[dim].zero_()
            projector_out.weight[dim, 0] = SINK_SCALE
            if projector_out.bias is not None:
                projector_out.bias[dim] = 0.0
            if bos_id is not None:
                embed.weight[bos_id, dim] = BOS_SINK_SCALE


def random_llava(
    vision: dict, text: dict, image_side: int, std: float, seed: int, device: str = "cpu"
) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerFast, CLIPImageProcessorPil]:
    """A random llava-hf model with planted sinks, its byte-level tokenizer and a PIL CLIP processor, its weights
    made on ``device`` (a 7B-sized model is drawn on the GPU in well under a second, on a CPU in minutes)."""
    tokenizer = byte_level_tokenizer(LLAVA_SPECIALS, bos="<s>", eos="</s>", pad="<pad>")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=image_side, **vision),
        text_config=LlamaConfig(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=3, **text),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    config.pad_token_id = 3
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    _spread_weights(model, std=std, seed=seed)
    _plant_sinks(model.model.multi_modal_projector.linear_2, model.model.language_model.embed_tokens, 1)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 3, 2
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_side}, crop_size={"height": image_side, "width": image_side}
    )
    return model.eval(), tokenizer, processor


def tiny_llava(seed: int = 0, device: str = "cpu") -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerFast, CLIPImageProcessorPil]:
    """``tiny-random/llava``: 16 image tokens (4x4), 6 layers, hidden 64."""
    return random_llava(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8, projection_dim=32),
        text=dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=HEADS, max_position_embeddings=2048),
        image_side=IMAGE_SIDE, std=0.25, seed=seed, device=device,
    )


def bench_llava(seed: int = 0, device: str = "cpu") -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerFast, CLIPImageProcessorPil]:
    """``bench-random/llava``: LLaVA-1.5's token layout (336 px, 14 px patches: 576 image tokens) with a
    small random decoder (8 layers, hidden 512, 8 heads), sized for timing runs on a laptop CPU."""
    return random_llava(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=14, projection_dim=64),
        text=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, max_position_embeddings=4096),
        image_side=336, std=0.05, seed=seed, device=device,
    )


def bench_llava_7b(seed: int = 0, device: str = "cpu") -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerFast, CLIPImageProcessorPil]:
    """``bench-random/llava-7b``: LLaVA-1.5-7B's shapes (CLIP ViT-L/14 at 336 px: 24 layers, width 1024; a Llama
    decoder of 32 layers, width 4096, 32 heads, MLP 11008) with random weights, for timing runs on a GPU. Its
    vocabulary is the byte-level one of 261 tokens (LLaVA's has 32064: the output layer here is 2% of a real one's
    cost per token)."""
    return random_llava(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
                    projection_dim=768),
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=4096),
        image_side=336, std=0.02, seed=seed, device=device,
    )


def tiny_qwen2_vl(seed: int = 0, device: str = "cpu") -> tuple[Qwen2VLForConditionalGeneration, PreTrainedTokenizerFast, Qwen2VLImageProcessorPil]:
    tokenizer = byte_level_tokenizer(QWEN_SPECIALS, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(
            hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            num_key_value_heads=HEADS // 2, vocab_size=len(tokenizer), max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
            bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=2, embed_dim=32, hidden_size=HIDDEN, num_heads=4, mlp_ratio=2, patch_size=4,
            spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(config)
    _spread_weights(model, std=0.25, seed=seed)
    _plant_sinks(model.model.visual.merger.mlp[2], model.model.language_model.embed_tokens, None)
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    model.generation_config.eos_token_id = ids("<|im_end|>")
    pixels = IMAGE_SIDE * IMAGE_SIDE
    processor = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=pixels, max_pixels=pixels)
    return model.eval(), tokenizer, processor


def tiny_llama(seed: int = 0, device: str = "cpu") -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, None]:
    """``tiny-random/llama``: a text-only Llama (4 layers, hidden 128, 4 heads of 32 dims over 2 KV heads: head
    sizes vLLM's CPU attention takes), no image processor."""
    tokenizer = byte_level_tokenizer(LLAVA_SPECIALS[:4], bos="<s>", eos="</s>", pad="<pad>")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        architectures=["LlamaForCausalLM"], tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    _spread_weights(model, std=0.15, seed=seed)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 3, 2
    return model.eval(), tokenizer, None


TINY_MODELS = {"tiny-random/llava": tiny_llava, "tiny-random/qwen2-vl": tiny_qwen2_vl, "bench-random/llava": bench_llava,
               "bench-random/llava-7b": bench_llava_7b, "tiny-random/llama": tiny_llama}
