"""Projector-mode training step with and without VisionZip: time and peak memory vs a FLOP count.

    python bench/bench_train.py [--family llava|llava_next] [--rounds 7] [--batch 2] [--text 100] [--threads 2]

One step = forward with labels + backward + AdamW step on the projector, everything else frozen; the tower (and
VisionZip's selection) runs without autograd inside the forward, as in training.

- ``llava`` (default): LLaVA-1.5 geometry, one 336 px image: stock (576 tokens, every patch, CLS dropped) against
  the paper's budgets 192 = 162 + 30 and 64 = 54 + 10.
- ``llava_next``: LLaVA-NeXT geometry, one 672 x 672 image = a 2x2 grid of 336 px crops + the base crop: stock
  (2,928 tokens: unpadded grid, newlines, base crop) against the paper's Table 9 per-crop budgets 54 + 10 (320 in
  all) and 27 + 5 (160).

Model: a random model built from configs (no download) whose LLM dominates the cost, like a 7B one: CLIP tower
336 px / patch 14 (576 patches, small: hidden 128, 6 layers), Llama LLM hidden 512, 8 layers, MLP 2048.

Time: the budgets run interleaved round-robin on one model in one process (after a warm-up round); the table shows
medians and their ratio to stock. FLOPs: counted analytically from the configs and sequence lengths (see
``step_flops``) -- the ratio a pure-compute model predicts. Peak memory: each budget in a fresh subprocess; the
peak resident set size (VmHWM, reset through /proc/self/clear_refs after the model and batch are built) minus the
resident size at that point, i.e. what the step itself adds (activations, gradients, optimizer state, temps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from visionzip_tune.families import apply_visionzip, projector_parameters, remove_visionzip, tokens_per_image
from visionzip_tune.tiny import TinySpec, build_tiny

GEOMETRY = dict(
    image_size=336,
    patch_size=14,
    vision_hidden=128,
    vision_layers=6,
    vision_heads=4,
    text_hidden=512,
    text_layers=8,
    text_heads=8,
)
Budget = tuple[int, int] | None  # (dominant, contextual) per image or crop; None = stock


@dataclass(frozen=True)
class Setup:
    spec: TinySpec
    budgets: tuple[Budget, ...]  # the first is the reference (stock)
    image_size: tuple[int, int]  # (height, width) of the benchmarked image


SETUPS = {
    "llava": Setup(TinySpec(family="llava", **GEOMETRY), (None, (162, 30), (54, 10)), (336, 336)),
    "llava_next": Setup(
        TinySpec(family="llava_next", crop_grids="1x2 2x1 2x2", **GEOMETRY), (None, (54, 10), (27, 5)), (672, 672)
    ),
}
SUPERVISED = 30  # answer tokens with labels at the end of each sample; the rest of the text is the prompt


def build(setup: Setup):
    """The model with only the projector trainable, and AdamW on the projector (as ``train.mode=projector``)."""
    model, _, _ = build_tiny(setup.spec)
    model.requires_grad_(False)
    params = list(projector_parameters(model).values())
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    return model, optimizer


def set_budget(model, budget: Budget) -> None:
    if budget is None:
        remove_visionzip(model)
    else:
        apply_visionzip(model, *budget)


def crops_per_image(setup: Setup) -> int:
    """Tower passes per image: 1 for LLaVA, the base crop + the grid's crops for an anyres image."""
    if setup.spec.family == "llava":
        return 1
    rows, cols = (side // setup.spec.image_size for side in setup.image_size)
    return 1 + rows * cols


def make_batch(model, setup: Setup, batch: int, text: int) -> dict[str, torch.Tensor]:
    """``batch`` samples: BOS, the image's placeholders under the current budget, ``text - 1`` text tokens, the last
    30 supervised; pixel values as the family's image processor lays them out."""
    config = model.config
    tokens = tokens_per_image(config, setup.image_size)
    generator = torch.Generator().manual_seed(0)
    vocab = min(config.image_token_id, config.text_config.pad_token_id)  # ordinary tokens sit below both
    words = torch.randint(3, vocab, (batch, text - 1), generator=generator)
    image = torch.full((batch, tokens), config.image_token_id)
    input_ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), image, words], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -SUPERVISED:] = input_ids[:, -SUPERVISED:]
    size = config.vision_config.image_size
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    if setup.spec.family == "llava":
        inputs["pixel_values"] = torch.randn(batch, 3, size, size, generator=generator)
    else:
        crops = crops_per_image(setup)
        inputs["pixel_values"] = torch.randn(batch, crops, 3, size, size, generator=generator)
        inputs["image_sizes"] = torch.tensor([setup.image_size] * batch)
    return inputs


def train_step(model, optimizer, batch: dict[str, torch.Tensor]) -> float:
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


# ---------------------------------------------------------------------------------------------------------------
# FLOP count


@dataclass(frozen=True)
class Flops:
    llm: float
    tower: float
    projector: float

    @property
    def total(self) -> float:
        return self.llm + self.tower + self.projector


def llm_flops(text_cfg, seq: int, batch: int) -> float:
    """FLOPs of the frozen LLM in one projector-mode step on ``batch`` sequences of ``seq`` tokens (see
    :func:`step_flops`)."""
    d, ffn = text_cfg.hidden_size, text_cfg.intermediate_size
    kv = d * text_cfg.num_key_value_heads // text_cfg.num_attention_heads
    linear = 2 * (2 * d * d + 2 * d * kv + 3 * d * ffn) * seq
    attention = 2 * seq * seq * d
    per_layer = 2 * linear + 3 * attention  # forward + backward (1x linear, 2x attention core)
    lm_head = 2 * (2 * d * text_cfg.vocab_size * seq)
    return batch * (text_cfg.num_hidden_layers * per_layer + lm_head)


def step_flops(config, tokens: int, batch: int, text: int, crops: int, zipped: bool) -> Flops:
    """Multiply-adds x 2 of one projector-mode step; norms, activations, softmax and the optimizer ignored.

    LLM (T = tokens + text): per layer and token, q/k/v/o and the gated MLP ``2 * params`` forward; causal
    attention ``2 * T * d`` forward (half of QK^T and AV: the SDPA kernel skips masked blocks); ``lm_head`` on every
    position. Backward through the frozen LLM computes input gradients only: 1x forward for the linear layers,
    2x forward for the attention core (dQ, dK from dS; dS and dV from dO). Projector: forward, plus both weight
    gradients and the gradient between its two layers (its input needs none), on the ``tokens`` rows. Tower:
    forward only on each of the image's ``crops``, all layers for the stock model, layers up to
    ``vision_feature_layer`` with VisionZip (it stops there); full (non-causal) attention over N patches + CLS.
    """
    text_cfg, vision = config.text_config, config.vision_config
    d = text_cfg.hidden_size
    llm = llm_flops(text_cfg, tokens + text, batch)
    proj = 2 * (2 * vision.hidden_size * d + 3 * d * d) * tokens  # fwd; bwd: both weight grads + linear_2's input
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    dv, vffn = vision.hidden_size, vision.intermediate_size
    vision_layer = 2 * (4 * dv * dv + 2 * dv * vffn) * patches + 4 * patches * patches * dv
    layers_run = vision.num_hidden_layers
    if zipped:  # VisionZip stops after vision_feature_layer (-2 -> all but the last)
        layers_run = config.vision_feature_layer % (vision.num_hidden_layers + 1)
    return Flops(llm=llm, tower=batch * crops * layers_run * vision_layer, projector=batch * proj)


# ---------------------------------------------------------------------------------------------------------------
# Peak memory (fresh process per budget)


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_child(setup: Setup, index: int, batch: int, text: int, steps: int) -> dict[str, float]:
    model, optimizer = build(setup)
    set_budget(model, setup.budgets[index])
    data = make_batch(model, setup, batch, text)
    base = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:  # "5" resets the peak RSS (VmHWM) to the current RSS
        refs.write("5")
    for _ in range(steps):
        train_step(model, optimizer, data)
    return {"budget": index, "base_mib": base, "peak_delta_mib": _status_mib("VmHWM") - base}


def measure_memory(index: int, args) -> float:
    command = [
        sys.executable,
        __file__,
        "--family",
        args.family,
        "--memory-child",
        str(index),
        "--batch",
        str(args.batch),
        "--text",
        str(args.text),
        "--threads",
        str(args.threads),
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_delta_mib"]


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=tuple(SETUPS), default="llava", help="model geometry (default llava)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (after one warm-up round)")
    parser.add_argument("--batch", type=int, default=2, help="samples per step")
    parser.add_argument("--text", type=int, default=100, help="text tokens per sample (BOS included)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = SETUPS[args.family]
    if args.memory_child is not None:
        print(json.dumps(memory_child(setup, args.memory_child, args.batch, args.text, steps=2)))
        return

    model, optimizer = build(setup)
    batches, tokens = [], []
    for budget in setup.budgets:
        set_budget(model, budget)
        batches.append(make_batch(model, setup, args.batch, args.text))
        tokens.append(tokens_per_image(model.config, setup.image_size))
    times: list[list[float]] = [[] for _ in setup.budgets]
    for round_index in range(args.rounds + 1):
        for k, (budget, data) in enumerate(zip(setup.budgets, batches)):
            set_budget(model, budget)
            start = time.perf_counter()
            train_step(model, optimizer, data)
            if round_index > 0:  # round 0 warms up allocator and kernels
                times[k].append(time.perf_counter() - start)
    memory = [measure_memory(k, args) for k in range(len(setup.budgets))]

    crops = crops_per_image(setup)
    flops = [
        step_flops(model.config, n, args.batch, args.text, crops, budget is not None)
        for n, budget in zip(tokens, setup.budgets)
    ]
    median = [statistics.median(values) for values in times]
    spec = setup.spec
    print(
        f"{args.family}: projector-mode step, one {setup.image_size[0]}x{setup.image_size[1]} image ({crops} tower "
        f"pass(es)) per sample, batch {args.batch}, {args.text} text tokens/sample, {args.threads} threads, "
        f"{args.rounds} interleaved rounds (medians); LLM {spec.text_layers}x{spec.text_hidden}, "
        f"CLIP {spec.image_size}px/{spec.patch_size} {spec.vision_layers}x{spec.vision_hidden}"
    )
    header = (
        f"{'budget':>10} {'tokens/img':>10} {'LLM seq':>7} {'step ms':>8} {'IQR ms':>7} {'time ratio':>10} "
        f"{'FLOP ratio':>10} {'GFLOP':>7} {'LLM %':>6} {'peak MiB':>9} {'mem ratio':>9}"
    )
    print(header)
    for k, budget in enumerate(setup.budgets):
        quartiles = statistics.quantiles(times[k], n=4)
        label = "stock" if budget is None else f"{budget[0]}+{budget[1]}"
        print(
            f"{label:>10} {tokens[k]:>10} {tokens[k] + args.text:>7} {median[k] * 1e3:>8.0f} "
            f"{(quartiles[2] - quartiles[0]) * 1e3:>7.0f} {median[k] / median[0]:>10.3f} "
            f"{flops[k].total / flops[0].total:>10.3f} {flops[k].total / 1e9:>7.1f} "
            f"{100 * flops[k].llm / flops[k].total:>6.1f} {memory[k]:>9.0f} {memory[k] / memory[0]:>9.3f}"
        )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
