"""Parameter models of the methods: the wire format of ``interventions: {name: {params}}``.

Public parameters use each paper's convention. Where the released code uses another, the docstring of
the field gives the conversion. ``None`` means "the model's default" (``configs/models/*.yaml``, else
a value derived from the model's depth).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

VISION_LAYERS = {"x-layers-of": "vision"}  # marks fields that index the vision tower's layers, not the LLM's


class MethodParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VARParams(MethodParams):
    """Visual attention sink redistribution (Kang et al., ICLR 2025, "See What You Are Told")."""

    tau: float = Field(20.0, gt=0, description="Sink threshold on RMS-normalised activations of the sink dims.")
    rho: float = Field(
        0.5,
        ge=0,
        le=1,
        description=(
            "Paper convention: a head is image-centric when its visual NON-sink attention ratio is >= rho "
            "(0.5 for hallucination, 0.8 general, 0.9 vision-centric). Release: sink fraction <= 1 - rho."
        ),
    )
    p: float = Field(
        0.4,
        ge=0,
        le=1,
        description=(
            "Paper convention: fraction of sink attention REMOVED and moved to visual non-sink tokens. "
            "Release config p=0.6 is the fraction kept, i.e. paper p = 1 - 0.6 = 0.4 (author, issue #5)."
        ),
    )
    min_image_attention: float = Field(0.2, ge=0, le=1, description="Minimum image attention of a head/row.")
    sink_dims: list[int] | None = Field(None, description="Hidden dims probed for sinks; default per model.")
    layers: list[int] | None = Field(
        None, description="Layers edited; default 2..L-2 (paper: layers >= 2, last layer excluded)."
    )


class VHRParams(MethodParams):
    """Vision-aware head reinforcement (He et al., ACL 2025, "Cracking the Code of Hallucination")."""

    alpha: float = Field(2.0, gt=0, le=10, description="Scale of the selected heads' outputs (paper: 2).")
    layers: list[int] | None = Field(None, description="Reinforced layers; default {1} and the last 14.")
    outlier_filter: bool = Field(True, description="Eq. 6: drop heads with surging VHD and text-only norm.")
    prefill_positions: Literal["all", "last"] = Field(
        "all", description="Prefill positions scaled: all prompt positions (third-party port) or the last."
    )
    heads: dict[int, list[int]] | None = Field(
        None,
        description=(
            "Fixed heads per layer, {layer: [head, ...]} (e.g. chosen offline over a dataset): no text-only pass, "
            "no selection (Eq. 4-7) and no image needed; its layers replace `layers`. Default: selected per request."
        ),
    )


class GIFTParams(MethodParams):
    """Gaze-shift-guided cross-modal fusion (GIFT, arXiv 2510.22067)."""

    alpha: float = Field(5.0, ge=0, le=20, description="Saliency scale: map in [1, e^alpha].")
    saliency_layers: list[int] | None = Field(None, description="Layers whose gaze shifts form the map.")
    enhance_layers: list[int] | None = Field(None, description="Layers whose last attention row is boosted.")
    head_fraction: float = Field(0.5, gt=0, le=1, description="Fraction of heads selected (top by mass).")
    clip_sigma: float = Field(3.0, gt=0, description="Saliency clipped to mean +- clip_sigma * std.")
    content_words: Literal["rule", "all"] = Field(
        "rule", description="Query rows used: content words (closed-class rule) or every query token."
    )
    max_pixels: int | None = Field(
        None,
        ge=64,
        description=(
            "Dynamic-resolution models (Qwen2-VL): fit images to at most this many pixels first, as the "
            "release's processor does (Qwen2-VL-7B: 1280*28*28). Fixed-size models (LLaVA) ignore it."
        ),
    )
    saliency_pass: Literal["auto", "separate"] = Field(
        "auto",
        description=(
            "auto: when every saliency layer precedes every enhanced layer and no other method edits the "
            "request's forward, read the gaze shifts inside the generation's own prefill (same values, no "
            "extra pass); separate: always run the extra prefill, as the release does."
        ),
    )


class PAIParams(MethodParams):
    """Paying more attention to image (Liu et al., ECCV 2024, "Paying More Attention to Image")."""

    alpha: float = Field(
        0.2, ge=0, le=2,
        description=(
            "Pre-softmax boost of image columns, z <- z + alpha*|z| (release scripts: 0.2). At most 2: beyond, the "
            "image columns take nearly all of the last row's attention and head rankings of other methods tie."
        ),
    )
    layers: list[int] | None = Field(
        None, description="Layers edited; default 2..L-1 (release: [2, 32) on LLaVA-1.5-7B's 32 layers)."
    )
    cfg: bool = Field(
        False,
        description=(
            "The release's CFG branch: a text-only prompt with its own KV cache; scores gamma (s - u) + u of the "
            "two log-softmaxes. Off in the release's argparse, on in every command of the release's README: off here by default."
        ),
    )
    gamma: float = Field(1.1, ge=0, le=10, description="CFG strength (the release's README commands: 1.1; argparse default 2).")
    cfg_cutoff: float = Field(0.1, gt=0, le=1, description="CFG plausibility: drop tokens with p < cfg_cutoff * max p.")


class PAINTParams(PAIParams):
    """Fixing imbalanced attention (PAINT, arXiv 2501.12206): PAI's boost split into "local" and "summary"
    image tokens chosen from the vision tower's [CLS] attention. PAI's ``layers`` and CFG fields apply."""

    alpha: float = Field(0.7, ge=0, le=2, description="Boost of local tokens, z + alpha*|z| (code: 0.7; POPE script 0.5).")
    beta: float = Field(0.3, ge=0, le=2, description="Boost of summary tokens, z + beta*|z| (code: 0.3; paper's best 0.4).")
    local_token_ratio: float = Field(
        0.25, gt=0, le=1, description="Local tokens: this top fraction of the first ViT layer's [CLS] attention."
    )
    summary_iqr: float = Field(
        1.5, ge=0, description="Summary tokens: [CLS] attention above Q3 + this * IQR in LLaVA's feature layer."
    )
    preset: Literal["release_chair"] | None = Field(
        None,
        description=(
            "Named settings of the release: 'release_chair' is its CHAIR script (modPAI/modpai_eval.sh: alpha 0.9, "
            "beta 0.3, CFG on with gamma 1.1); values given beside it still win. Without a preset the defaults are "
            "the release's argparse defaults (alpha 0.7, beta 0.3, CFG off), what its code runs unless a script says "
            "otherwise; its POPE script cannot be read as a setting (it calls the patch with one argument too few)."
        ),
    )


class VCDParams(MethodParams):
    """Visual contrastive decoding (Leng et al., CVPR 2024, "Mitigating Object Hallucinations in LVLMs
    through Visual Contrastive Decoding")."""

    alpha: float = Field(
        1.0, ge=0, le=10,
        description="Contrast: (1 + alpha) l(y|v,x) - alpha l(y|v',x). Eval scripts: 1 (the sampler's default is 0.5).",
    )
    beta: float = Field(
        0.1, gt=0, le=1,
        description="Adaptive plausibility: drop tokens with p < beta * max p (eval script 0.1; llava1.5_pope.bash 0.2).",
    )
    noise_step: int = Field(500, ge=0, le=999, description="Diffusion step t of the image noise (release: 500 of 1000).")
    seed: int = Field(0, ge=0, description="Seed of the noise, so that a request's answer repeats.")


class RITUALParams(MethodParams):
    """Random image transformations as a complement (Woo et al., arXiv 2405.17821, "RITUAL")."""

    alpha: float = Field(3.0, ge=0, le=10, description="alpha_pos: l(y|v,x) + alpha l(y|T(v),x) (release: 3).")
    beta: float = Field(0.1, gt=0, le=1, description="Adaptive plausibility cutoff on l(y|v,x) (release: 0.1).")
    transform: Literal[
        "random", "horizontal_flip", "vertical_flip", "rotation", "color_jitter", "gaussian_blur", "resized_crop"
    ] = Field("random", description="T: one of the release's six, drawn uniformly per request (random), or a fixed one.")
    seed: int = Field(0, ge=0, description="Seed of the draw of T and of its random parameters.")


class VEMaskParams(MethodParams):
    """Masking visual tokens of high epistemic uncertainty in the vision encoder (Seo et al., NeurIPS 2025,
    arXiv 2510.09008, "On Epistemic Uncertainty of Visual Tokens for Object Hallucinations in LVLMs").

    Defaults are the official release's (``joohoonlee/Epistemic``, read through the patches and run log of
    ``PayalThangamma/region-vlm-uncertainty``: ``patches/attack_rohe.patch`` for the CLIP attack's argparse,
    ``patches/eval_caption_rohe.patch`` for the uncertainty map and threshold, ``logs/run_14_eval_caption_smoke.out``
    for "k_sig: 1.1 10 Masked layers: 12~17"); each field says where a value could not be read. Layer indices count
    the vision tower's layers from 0; on a tower of another depth the layer defaults scale. ``"preset": "fast"``
    runs 20 PGD steps instead of 200 (docs/methods.md has its measured effect on the testbed)."""

    preset: Literal["fast"] | None = Field(
        None, description="'fast': the release's method with 20 PGD steps instead of 200; values given beside it still win."
    )
    pgd_steps: int = Field(200, ge=1, le=1000, description="PGD iterations of the attack (Eq. 1). Release: 200 for CLIP (attack.py --steps).")
    epsilon: float = Field(
        3 / 255, gt=0, le=1, description="L-inf bound of the perturbation, [0, 1] pixel units. Release: 3 of 255 (attack.py --epsilon)."
    )
    step_size: float = Field(1 / 255, gt=0, le=1, description="PGD step, [0, 1] pixel units. Release: 1 of 255 (attack.py --alpha).")
    random_start: bool = Field(
        True, description="Start PGD from uniform noise in [-epsilon, epsilon] (seeded). The release's loop is not readable: ours."
    )
    seed: int = Field(0, ge=0, description="Seed of the random start, so that a request's answer repeats.")
    attack_layer: int | None = Field(
        None, json_schema_extra=VISION_LAYERS,
        description="Tower layer whose output features the attack pushes apart (MSE, Eq. 1); default the layer the LLM reads.",
    )
    deviation_layers: list[int] | None = Field(
        None, json_schema_extra=VISION_LAYERS,
        description=(
            "Early layers i..j-1 whose deviations make the uncertainty map. Default the first 10 of 24 (the release's "
            "log prints 10 layers; that they are the first ones follows the paper's 'early layers')."
        ),
    )
    mask_layers: list[int] | None = Field(
        None, json_schema_extra=VISION_LAYERS,
        description="Middle layers where uncertain tokens are masked. Default 12..17 of 24 (the release's log: 'Masked layers: 12~17').",
    )
    threshold: float = Field(
        1.1, ge=0,
        description="k: a token is uncertain where its uncertainty >= mean + k * std over the image's tokens (population std). Release: k_sig 1.1.",
    )
    mask_ratio: float | None = Field(
        None, gt=0, lt=1, description="Instead of the threshold: mask this fraction of the tokens, most uncertain first (not the release's rule).",
    )
    include_cls: bool = Field(
        True, description="[CLS] takes part in the statistics and can be masked, as in the release (its map covers all 577 tokens).",
    )
    mask_target: Literal["outputs", "keys"] = Field(
        "outputs",
        description=(
            "'outputs': the uncertain tokens' attention outputs are zeroed, M * softmax(QK^T)V before the output "
            "projection (the paper's Fig. 5); 'keys': no token attends to them (pre-softmax -inf columns)."
        ),
    )


class LookbackParams(MethodParams):
    """Lookback Lens signals (Chuang et al., EMNLP 2024): how much each generated token looks back at the image."""

    layers: list[int] | None = Field(None, description="Layers whose heads give lookback ratios; default all.")
    features: bool = Field(
        False, description="Also return each token's full L x H ratio matrix (the detector's features), not only means."
    )
    detector_weights: list[float] | None = Field(
        None,
        description=(
            "A logistic-regression Lookback Lens over the L x H ratios (layer-major; all layers must be read): each "
            "token then gets sigmoid(w . x + b) as its hallucination probability. Default: the model's shipped "
            "detector, if its config has one (seeright/shapes-llava: testbed/lookback_lens.py)."
        ),
    )
    detector_bias: float = Field(0.0, description="The detector's intercept b.")
    detector_convention: Literal["hallucinated", "factual"] | None = Field(
        None,
        description=(
            "What the detector's positive class is: 'hallucinated' (seeright's testbed detectors, label 1 = "
            "hallucinated) or 'factual' (the release's classifiers, step03_lookback_lens.py: label 1 = not "
            "hallucinated, so the sigmoid is P(factual) and the probability returned is its complement). Required "
            "with detector_weights: weights read the wrong way round would invert every score."
        ),
    )
    window: int = Field(
        8, ge=1, le=256,
        description=(
            "Tokens whose ratios are averaged for each token's score: the release's sliding window of 8 "
            "(step03_lookback_lens.py, convert_to_token_level); 1 scores each token alone. As in the release, a "
            "token with fewer than window - 1 scored tokens before it gets no score (null)."
        ),
    )


class LookbackDecodingParams(MethodParams):
    """Lookback Lens Guided Decoding (Chuang et al., EMNLP 2024, §4; release ``step04_run_decoding.py`` and its
    patched ``generation/utils.py``): each chunk of the answer is sampled ``candidates`` times and the candidate
    the Lookback detector scores least hallucinated is kept."""

    chunk_tokens: int = Field(8, ge=1, le=64, description="Tokens per chunk. Release: --chunk_size 8 in the README's commands.")
    candidates: int = Field(8, ge=2, le=16, description="Candidates sampled per chunk. Release: --num_candidates 8.")
    temperature: float = Field(0.9, gt=0, le=2, description="Candidates' sampling temperature. Release: step04's --temperature 0.9.")
    top_p: float = Field(0.95, gt=0, le=1, description="Candidates' nucleus. Release: step04's --top_p 0.95 (its top_k 0 is off).")
    seed: int = Field(0, ge=0, description="Seed of the candidates' sampling: candidate i draws from seed * 65536 + i.")
    detector_weights: list[float] | None = Field(
        None, description="The Lookback Lens over the mean of a candidate's L x H ratio rows; default the model's shipped detector.",
    )
    detector_bias: float = Field(0.0, description="The detector's intercept b.")
    detector_convention: Literal["hallucinated", "factual"] | None = Field(
        None, description="The detector's positive class, as for lookback.detector_convention (required with detector_weights).",
    )


class AGSERParams(MethodParams):
    """Attention-guided self-reflection (Liu et al., arXiv 2501.09997): a zero-shot hallucination score from
    re-asking the attentive and the non-attentive part of the query."""

    layers: list[int] | None = Field(None, description="Layers whose attention (summed over heads) is averaged; default all.")
    attention_from: Literal["prompt_end", "answer"] = Field(
        "prompt_end",
        description=(
            "Whose attention ranks the query: the last prompt token's (the row that produces the first answer token; "
            "the paper's) or the mean over that row and every answer token's row."
        ),
    )
    attentive_fraction: float = Field(
        2 / 3, gt=0, lt=1, description="Share of the query's units in the attentive query (the paper's top 2/3); the rest are non-attentive."
    )
    unit: Literal["word", "token"] = Field(
        "word", description="What is ranked and kept: whitespace words (a word's tokens' attention summed) or tokens."
    )
    image: Literal["whole", "split"] = Field(
        "whole",
        description=(
            "The image in the sub-queries: 'whole' in both (the query's text is split, as in the paper), or 'split' "
            "like the text: the attentive query sees only its top image tokens, the non-attentive the others (the "
            "rest hidden as keys in every layer)."
        ),
    )
    lam: float = Field(1.0, ge=0, description="The score is lam * r_attentive - r_non_attentive (the paper's lambda, 1).")


class ViFParams(MethodParams):
    """Visual Flow (Yu et al., arXiv 2509.21789; release YU-deep/ViF): visual relay tokens, chosen once and passed
    from agent to agent, and attention reallocation towards them in the middle layers. Defaults: the release's
    ``configs/eval.yaml``."""

    relay_ratio: float = Field(
        0.02, gt=0, le=1, description="Share of the image tokens kept as relay tokens: max(1, int(N * ratio)). Release: 0.02."
    )
    tau: float = Field(0.8, ge=0.1, le=4, description="Softmax temperature of the reallocated layers' attention. Release: 0.8.")
    alpha_mid: float = Field(
        0.2, ge=0, le=1,
        description=(
            "Middle layers: the share of the attention on non-relay image tokens and on instruction tokens moved, "
            "in equal parts, to every other visible token (relay tokens among them). Release: 0.2."
        ),
    )
    alpha_deep: float = Field(
        0.1, ge=0, le=1,
        description="Deep layers: the share of the attention on image tokens moved, in equal parts, to the instruction tokens. Release: 0.1.",
    )
    mid_layers: list[int] | None = Field(
        None, description="Middle layers: where relay tokens are scored and attention is moved to them; default the middle third."
    )
    deep_layers: list[int] | None = Field(None, description="Deep layers: where image attention goes to the instruction; default the last third.")
    relay: list[int] | None = Field(
        None, max_length=4096,
        description=(
            "The visual flow: relay tokens an earlier agent's response returned (choices[i].signals.vif.relay), as "
            "indices into this request's image tokens (all images, in order). Given: no scoring pass, these tokens "
            "are the relay. Default: scored on this request (one extra prefill up to the last middle layer)."
        ),
    )


class AttentionMapParams(MethodParams):
    """Where the model looked: each generated token's attention over each image's patch grid (read-only)."""

    layers: list[int] | None = Field(None, description="Layers averaged (all heads of each); default all.")


class CARVEParams(MethodParams):
    """Contrastive attention refinement (Ge et al., arXiv 2509.06461, "Focusing by Contrastive Attention")."""

    layers: list[int] | None = Field(None, description="Layers fused; default [20, 25] scaled to the depth.")
    lam: float = Field(1e-8, ge=0, description="Regulariser in A_Q / (A_G + lam) (Eq. 4.4).")
    top_p: float = Field(0.2, gt=0, le=1, description="Fraction of pixels kept before region selection.")
    min_regions: int = Field(3, ge=1, le=64, description="Minimum connected regions kept.")
    region_fraction: float = Field(0.2, ge=0, le=1, description="Regions kept: max(min_regions, n * this).")
    steps: Literal["all", "first"] = Field(
        "all", description="Time steps fused: all, weighted t+1 (release v4), or the first only (t_start)."
    )
    collect_tokens: int = Field(32, ge=1, le=256, description="Greedy tokens generated per collection pass.")
    general_instruction: str = Field("Write a general description of the image.", max_length=500)
    collect_suffix: str = Field(
        " Answer the question using a single word or phrase.",
        max_length=500,
        description="Appended to both collection prompts (as the release does).",
    )
    max_pixels: int | None = Field(
        None,
        ge=64,
        description=(
            "Dynamic-resolution models (Qwen2-VL, Qwen2.5-VL): fit the image to at most this many pixels "
            "first, as the release's processor does (256*28*28). Fixed-size models (LLaVA) ignore it."
        ),
    )
    requery: Literal["original_and_refined", "refined"] = Field(
        "original_and_refined",
        description="Final answer from [original, refined] images (release) or the refined image (paper Alg. 1).",
    )
