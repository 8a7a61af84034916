"""Mini-Gemini: image-feature time and projector-mode step time, stock (576 tokens) against VisionZip (192, 64),
next to a FLOP count.

    python bench/bench_mini_gemini.py [--rounds 5] [--batch 2] [--text 100] [--threads 2] [--device cpu|cuda]

Model: a random tiny-but-deep Mini-Gemini at MGM-7B's token geometry, built from configs (no download): CLIP 336 px /
patch 14 (576 patches, hidden 128, 6 layers), a ConvNeXt of 4 stages (widths 32-256, depths 2/2/6/2: C = 480
channels) on the 768 px HR image (a 192 x 192 map: 8 x 8 HR vectors per LR token, as MGM-7B), and the Llama LLM of
bench_train.py's ``small`` geometry (hidden 512, 8 layers), fp32. Budgets: stock, 162 + 30, 54 + 10 (paper Table 8).

Measured, interleaved round-robin on one model after a warm-up round (medians, ratios to stock from this one run;
features first, then steps):
``features`` = ``get_image_features`` under no_grad (both towers, mining, selection, projector); ``step`` = forward
with labels + backward + AdamW on MGM's projector set (MLP + mining projections), as ``train.mode=projector``.

"Mine, then zip" mines all 576 tokens and runs ConvNeXt in full whatever the budget, and CLIP stops after layer -2
in both paths (the stock model here also reads layer -2 with an early stop): the image features cost about what
stock ones do, and the saving is the LLM's (and the projector MLP's) shorter input. The FLOP count (forward only for
features; for a step, the LLM as bench_train.py counts it plus the towers, the mining forward and its weight
gradients, and the MLP) predicts the ratios; it is also printed for MGM-7B's real widths, where the mining's
key/value projections of 36,864 HR vectors per image stay as a floor under the step cost at 64 tokens.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
from bench_train import GEOMETRIES, Setup, make_batch, set_budget, step_flops, train_step
from timing import time_ms
from transformers import ConvNextConfig, LlamaConfig

from visionzip_tune.families import projector_parameters, tokens_per_image
from visionzip_tune.models.mini_gemini.configuration_mini_gemini import MiniGeminiConfig, patches_per_view
from visionzip_tune.models.mini_gemini.modeling_mini_gemini import MiniGeminiForConditionalGeneration
from visionzip_tune.demo.tiny import TinySpec, build_config, build_tokenizer

BUDGETS = (None, (162, 30), (54, 10))  # (dominant, contextual) per image; None = stock
CONVNEXT = {"hidden_sizes": [32, 64, 128, 256], "depths": [2, 2, 6, 2], "layer_scale_init_value": 1.0}
IMAGE_SIZE_AUX = 768  # MGM-7B's HR side: 4 x 24 x 8
GEOMETRY = GEOMETRIES["small"]


def build_model(device: str) -> MiniGeminiForConditionalGeneration:
    """The bench model (fp32, random, seed 0) on ``device``, with only MGM's projector set trainable."""
    spec = TinySpec(family="mini_gemini", **GEOMETRY)
    tiny = build_config(spec, build_tokenizer())
    config = MiniGeminiConfig(
        vision_config=tiny.vision_config,
        text_config=tiny.text_config,
        aux_vision_config=ConvNextConfig(**CONVNEXT),
        image_size_aux=IMAGE_SIZE_AUX,
        image_token_id=tiny.image_token_id,
        vision_feature_layer=-2,
        pad_token_id=tiny.pad_token_id,
    )
    torch.manual_seed(0)
    model = MiniGeminiForConditionalGeneration(config).to(device)
    model.requires_grad_(False)
    for param in projector_parameters(model).values():
        param.requires_grad_(True)
    return model


# ---------------------------------------------------------------------------------------------------------------
# FLOP count per image (multiply-adds x 2; norms, activations, softmax, interpolation and selection ignored)


def clip_flops(config) -> float:
    """CLIP forward up to and including ``vision_feature_layer`` (both paths stop there), N = patches + CLS."""
    vision = config.vision_config
    tokens, width, ffn = patches_per_view(config) + 1, vision.hidden_size, vision.intermediate_size
    per_layer = 2 * (4 * width * width + 2 * width * ffn) * tokens + 4 * tokens * tokens * width
    layers = config.vision_feature_layer % (vision.num_hidden_layers + 1)
    return layers * per_layer + 2 * 3 * vision.patch_size**2 * width * patches_per_view(config)


def convnext_flops(config) -> float:
    """ConvNeXt forward on the HR image: stem, per block a 7x7 depthwise conv and the 4x MLP, 2x2 downsamplings."""
    aux = config.aux_vision_config
    side = config.image_size_aux // aux.patch_size
    flops = 2 * 3 * aux.patch_size**2 * aux.hidden_sizes[0] * side * side
    previous = None
    for width, depth in zip(aux.hidden_sizes, aux.depths):
        if previous is not None:
            side //= 2
            flops += 2 * previous * 4 * width * side * side
        flops += depth * side * side * (2 * 49 * width + 2 * 2 * width * 4 * width)
        previous = width
    return flops


def mining_flops(config, trained: bool) -> float:
    """Patch info mining of every LR token over its P HR vectors (C channels -> D): the query, key and value
    projections and the one-query attention; ``trained`` adds the backward that the projections' weight gradients
    need (their own matmuls again, and the attention core twice; the towers' outputs need no gradient)."""
    tokens, width = patches_per_view(config), config.vision_config.hidden_size
    channels = sum(config.aux_vision_config.hidden_sizes)
    region = (config.image_size_aux // config.aux_vision_config.patch_size) ** 2 // tokens
    projections = 2 * tokens * width * width + 2 * 2 * tokens * region * channels * width
    attention = 2 * 2 * tokens * region * width
    return projections + attention + (projections + 2 * attention if trained else 0)


def mlp_flops(config, tokens: int) -> float:
    """The projector MLP forward on ``tokens`` rows."""
    width, text = config.vision_config.hidden_size, config.text_config.hidden_size
    return 2 * (width * text + text * text) * tokens


def feature_flops(config, tokens: int) -> float:
    return clip_flops(config) + convnext_flops(config) + mining_flops(config, False) + mlp_flops(config, tokens)


def step_total_flops(config, tokens: int, batch: int, text: int) -> float:
    """One projector-mode step: the LLM (and the MLP, forward and backward) as bench_train.step_flops counts them,
    plus the towers and the mining with its weight gradients, per image."""
    counted = step_flops(config, tokens, batch, text, crops=1, zipped=True)
    towers = clip_flops(config) + convnext_flops(config) + mining_flops(config, True)
    return counted.llm + counted.projector + batch * towers


def mgm_7b_config() -> MiniGeminiConfig:
    """MGM-7B's geometry (CLIP ViT-L/14-336, ConvNeXt-L at 768 px, Vicuna-7B), for the FLOP count only."""
    llm = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    )
    return MiniGeminiConfig(text_config=llm)


@torch.no_grad()
def image_features(model, batch: dict[str, torch.Tensor]) -> None:
    model.model.get_image_features(pixel_values=batch["pixel_values"])


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--batch", type=int, default=2, help="samples (one image each) per step")
    parser.add_argument("--text", type=int, default=100, help="text tokens per sample (BOS included)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (timed with CUDA events)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model(args.device)
    optimizer = torch.optim.AdamW(list(projector_parameters(model).values()), lr=1e-5)
    setup = Setup(TinySpec(family="mini_gemini", **GEOMETRY), BUDGETS, (IMAGE_SIZE_AUX, IMAGE_SIZE_AUX))
    batches, tokens = [], []
    for budget in BUDGETS:
        set_budget(model, budget)
        batches.append(make_batch(model, setup, args.batch, args.text))
        tokens.append(tokens_per_image(model.config))
    features: list[list[float]] = [[] for _ in BUDGETS]
    steps: list[list[float]] = [[] for _ in BUDGETS]
    # Features and steps in loops of their own: a feature pass timed right after a training step would pay for the
    # allocator state and caches the step left behind.
    for timed, run in ((features, image_features), (steps, functools.partial(train_step, optimizer=optimizer))):
        for round_index in range(args.rounds + 1):
            for k, (budget, data) in enumerate(zip(BUDGETS, batches)):
                set_budget(model, budget)
                elapsed = time_ms(functools.partial(run, model, batch=data), args.device)
                if round_index > 0:  # round 0 warms up allocator and kernels
                    timed[k].append(elapsed)

    config = model.config
    print(
        f"mini_gemini: one {IMAGE_SIZE_AUX} px image per sample (CLIP {GEOMETRY['image_size']} px, "
        f"{GEOMETRY['vision_layers']} x {GEOMETRY['vision_hidden']}; ConvNeXt widths {CONVNEXT['hidden_sizes']} depths "
        f"{CONVNEXT['depths']}; LLM {GEOMETRY['text_layers']} x {GEOMETRY['text_hidden']}), batch {args.batch}, "
        f"{args.text} text tokens/sample, {args.threads} threads, {args.rounds} interleaved rounds (medians)"
    )
    share = convnext_flops(config) / feature_flops(config, tokens[0])
    print(f"ConvNeXt runs in full in every row: {100 * share:.0f}% of the stock image-feature FLOPs")
    print(
        f"{'budget':>10} {'tokens':>6} {'features ms':>11} {'ratio':>6} {'FLOP ratio':>10} "
        f"{'step ms':>8} {'ratio':>6} {'FLOP ratio':>10}"
    )
    feature_base, step_base = statistics.median(features[0]), statistics.median(steps[0])
    flops_feature_base = feature_flops(config, tokens[0])
    flops_step_base = step_total_flops(config, tokens[0], args.batch, args.text)
    for k, budget in enumerate(BUDGETS):
        label = "stock" if budget is None else f"{budget[0]}+{budget[1]}"
        feature_ms, step_ms = statistics.median(features[k]), statistics.median(steps[k])
        print(
            f"{label:>10} {tokens[k]:>6} {feature_ms:>11.0f} {feature_ms / feature_base:>6.3f} "
            f"{feature_flops(config, tokens[k]) / flops_feature_base:>10.3f} {step_ms:>8.0f} "
            f"{step_ms / step_base:>6.3f} "
            f"{step_total_flops(config, tokens[k], args.batch, args.text) / flops_step_base:>10.3f}"
        )
    real = mgm_7b_config()
    stock = step_total_flops(real, 576, args.batch, args.text)
    zipped = step_total_flops(real, 64, args.batch, args.text)
    mining = args.batch * mining_flops(real, True)
    print(
        f"MGM-7B widths (FLOP count only): step 64 / 576 tokens = {zipped / stock:.3f}; mining with its weight "
        f"gradients is {100 * mining / stock:.1f}% of the stock step and {100 * mining / zipped:.1f}% of the zipped one"
    )


if __name__ == "__main__":
    main()
