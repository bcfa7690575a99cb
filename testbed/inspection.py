"""Does a trained model develop visual attention sinks and vision-aware heads? Measure it.

``python -m seeright.testbed.inspection --model seeright/shapes-llava --out DIR``

On shapes-POPE questions (one per scene, the serving prompt format), for every decoder layer:
* massive activations (VAR §3): ``x̂ = x / rms(x)`` of the residual stream entering the layer; for each
  hidden dim, the largest ``|x̂_d|`` over image tokens and the share of image tokens above ``--tau``, and
  the largest on BOS. A sink dim is one whose large values sit on a few tokens only, the same few dims in
  every layer; ``|x̂_d| <= sqrt(hidden)``, and real LLaVA reaches a large part of that bound.
* attention to the image: per head, the share of the answer position's attention on image tokens, and
  the share of that image attention taken by its single largest image token (a sink concentrates it).
* VHD (VHR Eq. 4): per head, ``||A(y | x_V, x_T) - A(y | x_T)||`` of the head output before ``o_proj`` at
  the answer position, with and without the image.
Writes ``inspect.json`` and ``inspect.png`` (heat maps per layer and head) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from seeright.interventions.adapters.base import ChatTurn
from seeright.interventions.layout import TokenLayout
from seeright.service.engine import Engine
from seeright.testbed import world as shapes


def _encode(engine: Engine, question: str, image) -> tuple[dict[str, torch.Tensor], TokenLayout]:
    turns = [ChatTurn("user", question, 1 if image is not None else 0)]
    enc = engine.adapter.encode(turns, [image] if image is not None else [])
    return {"input_ids": enc.input_ids[None], **enc.images}, enc.layout


class _HeadCapture:
    """Input of each layer's ``o_proj`` at the last position, as ``[heads, head_dim]``."""

    def __init__(self, layers, num_heads: int) -> None:
        self.out: dict[int, torch.Tensor] = {}
        self.handles = [
            layer.self_attn.o_proj.register_forward_pre_hook(self._hook(i, num_heads)) for i, layer in enumerate(layers)
        ]

    def _hook(self, index: int, num_heads: int):
        def hook(module, args):
            self.out[index] = args[0][0, -1].reshape(num_heads, -1).float()

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def inspect(engine: Engine, n: int, seed: int, tau: float) -> dict:
    model = engine.model
    text_cfg = model.config.get_text_config()
    attention = text_cfg._attn_implementation
    text_cfg._attn_implementation = "eager"  # attention probabilities; the engine's function is put back below
    layers = model.model.language_model.layers
    heads = text_cfg.num_attention_heads
    rng = random.Random(seed)
    scenes = shapes.generate_scenes(n, seed)
    max_xhat = torch.zeros(len(layers), text_cfg.hidden_size)
    above = torch.zeros(len(layers), text_cfg.hidden_size)
    bos_max = torch.zeros(len(layers), text_cfg.hidden_size)
    image_share = torch.zeros(len(layers), heads)
    top_share = torch.zeros(len(layers), heads)
    vhd = torch.zeros(len(layers), heads)
    tokens = 0
    capture = _HeadCapture(layers, heads)
    try:
        for scene in scenes:
            name = rng.choice(list(shapes.OBJECTS))
            question = f"Is there {shapes.article(name)} {name} in the image?"
            inputs, layout = _encode(engine, question, shapes.render(scene, seed))
            out = model(**inputs, output_hidden_states=True, output_attentions=True)
            with_image = dict(capture.out)
            model(**_encode(engine, question, None)[0])
            start, end = layout.image_spans[0]
            for i in range(len(layers)):
                x = out.hidden_states[i][0].float()
                normed = (x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()).abs()
                bos_max[i] = torch.maximum(bos_max[i], normed[0])
                xhat = normed[start:end]
                max_xhat[i] = torch.maximum(max_xhat[i], xhat.amax(0))
                above[i] += (xhat > tau).float().sum(0)
                attn = out.attentions[i][0, :, -1].float()  # [heads, keys]
                on_image = attn[:, start:end]
                image_share[i] += on_image.sum(-1)
                top_share[i] += on_image.amax(-1) / on_image.sum(-1).clamp_min(1e-9)
                vhd[i] += (with_image[i] - capture.out[i]).norm(dim=-1)
            tokens += end - start
    finally:
        capture.remove()
        text_cfg._attn_implementation = attention
    count = len(scenes)
    layers_out = []
    for i in range(len(layers)):
        top = torch.argsort(max_xhat[i], descending=True)[:4].tolist()
        layers_out.append({
            "layer": i,
            "top_dims": [{"dim": d, "max_xhat": round(float(max_xhat[i, d]), 2),
                          "share_above_tau": round(float(above[i, d] / tokens), 4)} for d in top],
            "bos_top_dim": {"dim": int(bos_max[i].argmax()), "max_xhat": round(float(bos_max[i].max()), 2)},
            "image_attention": [round(float(v), 4) for v in image_share[i] / count],
            "top_token_share": [round(float(v), 4) for v in top_share[i] / count],
            "vhd": [round(float(v), 4) for v in vhd[i] / count],
        })
    return {"samples": count, "tau": tau, "max_possible_xhat": text_cfg.hidden_size ** 0.5, "layers": layers_out}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("image_attention", "attention on image"), ("top_token_share", "top image token's share"), ("vhd", "VHD")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, (key, title) in zip(axes, keys):
        data = [layer[key] for layer in result["layers"]]
        im = ax.imshow(data, aspect="auto", cmap="viridis")
        ax.set_title(title)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="seeright/shapes-llava")
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=shapes.DEFAULT_SEED)
    parser.add_argument("--tau", type=float, default=4.0, help="|x̂_d| threshold counted per image token")
    args = parser.parse_args()
    engine = Engine.from_pretrained(args.model)
    result = inspect(engine, args.samples, args.seed, args.tau)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "inspect.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "inspect.png")
    for layer in result["layers"]:
        dims = ", ".join(f"{d['dim']}: {d['max_xhat']} ({100 * d['share_above_tau']:.1f}%)" for d in layer["top_dims"])
        bos = layer["bos_top_dim"]
        print(f"layer {layer['layer']}: image tokens' top |x̂| dims {dims}; BOS dim {bos['dim']}: {bos['max_xhat']}; image attention {sum(layer['image_attention']) / len(layer['image_attention']):.2f}")


if __name__ == "__main__":
    main()
