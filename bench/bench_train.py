"""Projector-mode training step at 576, 192 and 64 vision tokens per image: time and peak memory vs a FLOP count.

    python bench/bench_train.py [--rounds 7] [--batch 2] [--text 100] [--threads 2]

One step = forward with labels + backward + AdamW step on the projector, everything else frozen; the tower (and
VisionZip's selection) runs without autograd inside the forward, as in training. 576 is stock LLaVA (every patch,
CLS dropped); 192 = 162 + 30 and 64 = 54 + 10 are the paper's VisionZip budgets.

Model: a random LLaVA built from configs (no download) whose LLM dominates the cost, like a 7B LLaVA: CLIP tower
336 px / patch 14 (576 patches, small: hidden 128, 6 layers), Llama LLM hidden 512, 8 layers, MLP 2048.

Time: the three budgets run interleaved round-robin on one model in one process (after a warm-up round); the
table shows medians and their ratio to 576. FLOPs: counted analytically from the configs and sequence lengths
(see ``step_flops``) -- the ratio a pure-compute model predicts. Peak memory: each budget in a fresh subprocess;
the peak resident set size (VmHWM, reset through /proc/self/clear_refs after the model and batch are built) minus
the resident size at that point, i.e. what the step itself adds (activations, gradients, optimizer state, temps).
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

from visionzip_tune.models import apply_visionzip, projector, remove_visionzip
from visionzip_tune.tiny import TinySpec, build_tiny_llava

SPEC = TinySpec(
    image_size=336, patch_size=14, vision_hidden=128, vision_layers=6, vision_heads=4,
    text_hidden=512, text_layers=8, text_heads=8,
)
BUDGETS: dict[int, tuple[int, int] | None] = {576: None, 192: (162, 30), 64: (54, 10)}
SUPERVISED = 30  # answer tokens with labels at the end of each sample; the rest of the text is the prompt


def build(spec: TinySpec = SPEC):
    """The model with only the projector trainable, and AdamW on the projector (as ``train.mode=projector``)."""
    model, _ = build_tiny_llava(spec)
    model.requires_grad_(False)
    projector(model).requires_grad_(True)
    optimizer = torch.optim.AdamW(projector(model).parameters(), lr=1e-5)
    return model, optimizer


def set_budget(model, tokens: int) -> None:
    budget = BUDGETS[tokens]
    if budget is None:
        remove_visionzip(model)
    else:
        apply_visionzip(model, *budget)


def make_batch(model, tokens: int, batch: int, text: int) -> dict[str, torch.Tensor]:
    """``batch`` samples: BOS, ``tokens`` image placeholders, ``text - 1`` text tokens, the last 30 supervised."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    vocab = min(config.image_token_index, config.text_config.pad_token_id)  # ordinary tokens sit below both
    words = torch.randint(3, vocab, (batch, text - 1), generator=generator)
    image = torch.full((batch, tokens), config.image_token_index)
    input_ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), image, words], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -SUPERVISED:] = input_ids[:, -SUPERVISED:]
    size = config.vision_config.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
            "pixel_values": pixel_values}


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


def step_flops(config, tokens: int, batch: int, text: int) -> Flops:
    """Multiply-adds x 2 of one projector-mode step; norms, activations, softmax and the optimizer ignored.

    LLM (T = tokens + text): per layer and token, q/k/v/o and the gated MLP ``2 * params`` forward; causal
    attention ``2 * T * d`` forward (half of QK^T and AV: the SDPA kernel skips masked blocks); ``lm_head`` on every
    position. Backward through the frozen LLM computes input gradients only: 1x forward for the linear layers,
    2x forward for the attention core (dQ, dK from dS; dS and dV from dO). Projector: forward, plus both weight
    gradients and the gradient between its two layers (its input needs none). Tower: forward only, all layers for
    stock LLaVA, layers up to ``vision_feature_layer`` for VisionZip (it stops there); full (non-causal) attention
    over N patches + CLS.
    """
    text_cfg, vision = config.text_config, config.vision_config
    seq = tokens + text
    d, ffn = text_cfg.hidden_size, text_cfg.intermediate_size
    kv = d * text_cfg.num_key_value_heads // text_cfg.num_attention_heads
    linear = 2 * (2 * d * d + 2 * d * kv + 3 * d * ffn) * seq
    attention = 2 * seq * seq * d
    per_layer = 2 * linear + 3 * attention  # forward + backward (1x linear, 2x attention core)
    lm_head = 2 * (2 * d * text_cfg.vocab_size * seq)
    llm = batch * (text_cfg.num_hidden_layers * per_layer + lm_head)

    proj = 2 * (2 * vision.hidden_size * d + 3 * d * d) * tokens  # fwd; bwd: both weight grads + linear_2's input
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    dv, vffn = vision.hidden_size, vision.intermediate_size
    vision_layer = 2 * (4 * dv * dv + 2 * dv * vffn) * patches + 4 * patches * patches * dv
    layers_run = vision.num_hidden_layers
    if BUDGETS[tokens] is not None:  # VisionZip stops after vision_feature_layer (-2 -> all but the last)
        layers_run = config.vision_feature_layer % (vision.num_hidden_layers + 1)
    return Flops(llm=llm, tower=batch * layers_run * vision_layer, projector=batch * proj)


# ---------------------------------------------------------------------------------------------------------------
# Peak memory (fresh process per budget)


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_child(tokens: int, batch: int, text: int, steps: int) -> dict[str, float]:
    model, optimizer = build()
    set_budget(model, tokens)
    data = make_batch(model, tokens, batch, text)
    base = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:  # "5" resets the peak RSS (VmHWM) to the current RSS
        refs.write("5")
    for _ in range(steps):
        train_step(model, optimizer, data)
    return {"tokens": tokens, "base_mib": base, "peak_delta_mib": _status_mib("VmHWM") - base}


def measure_memory(tokens: int, args) -> float:
    command = [sys.executable, __file__, "--memory-child", str(tokens), "--batch", str(args.batch),
               "--text", str(args.text), "--threads", str(args.threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_delta_mib"]


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (after one warm-up round)")
    parser.add_argument("--batch", type=int, default=2, help="samples per step")
    parser.add_argument("--text", type=int, default=100, help="text tokens per sample (BOS included)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        print(json.dumps(memory_child(args.memory_child, args.batch, args.text, steps=2)))
        return

    model, optimizer = build()
    batches = {tokens: make_batch(model, tokens, args.batch, args.text) for tokens in BUDGETS}
    times: dict[int, list[float]] = {tokens: [] for tokens in BUDGETS}
    for round_index in range(args.rounds + 1):
        for tokens, data in batches.items():
            set_budget(model, tokens)
            start = time.perf_counter()
            train_step(model, optimizer, data)
            if round_index > 0:  # round 0 warms up allocator and kernels
                times[tokens].append(time.perf_counter() - start)
    memory = {tokens: measure_memory(tokens, args) for tokens in BUDGETS}

    flops = {tokens: step_flops(model.config, tokens, args.batch, args.text) for tokens in BUDGETS}
    median = {tokens: statistics.median(values) for tokens, values in times.items()}
    print(f"projector-mode step, batch {args.batch}, {args.text} text tokens/sample, {args.threads} threads, "
          f"{args.rounds} interleaved rounds (medians); LLM {SPEC.text_layers}x{SPEC.text_hidden}, "
          f"CLIP {SPEC.image_size}px/{SPEC.patch_size} {SPEC.vision_layers}x{SPEC.vision_hidden}")
    header = (f"{'tokens/img':>10} {'LLM seq':>7} {'step ms':>8} {'IQR ms':>7} {'time ratio':>10} "
              f"{'FLOP ratio':>10} {'GFLOP':>7} {'LLM %':>6} {'peak MiB':>9} {'mem ratio':>9}")
    print(header)
    for tokens in BUDGETS:
        quartiles = statistics.quantiles(times[tokens], n=4)
        print(f"{tokens:>10} {tokens + args.text:>7} {median[tokens] * 1e3:>8.0f} "
              f"{(quartiles[2] - quartiles[0]) * 1e3:>7.0f} {median[tokens] / median[576]:>10.3f} "
              f"{flops[tokens].total / flops[576].total:>10.3f} {flops[tokens].total / 1e9:>7.1f} "
              f"{100 * flops[tokens].llm / flops[tokens].total:>6.1f} {memory[tokens]:>9.0f} "
              f"{memory[tokens] / memory[576]:>9.3f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
