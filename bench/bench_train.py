"""Projector-mode training step with and without VisionZip: time and peak memory vs a FLOP count.

    python bench/bench_train.py [--family llava|llava_next] [--rounds 7] [--batch 2] [--text 100] [--threads 2]
                                [--geometry small|clip-l|tiny] [--device cpu|cuda] [--dtype float32|bfloat16]

One step = forward with labels + backward + AdamW step on the projector, everything else frozen; the tower (and
VisionZip's selection) runs without autograd inside the forward, as in training.

- ``llava`` (default): LLaVA-1.5 geometry, one 336 px image: stock (576 tokens, every patch, CLS dropped) against
  the paper's budgets 192 = 162 + 30 and 64 = 54 + 10.
- ``llava_next``: LLaVA-NeXT geometry, one 672 x 672 image = a 2x2 grid of 336 px crops + the base crop: stock
  (2,928 tokens: unpadded grid, newlines, base crop) against the paper's Table 9 per-crop budgets 54 + 10 (320 in
  all) and 27 + 5 (160).

Model: a random model built from configs (no download) whose LLM dominates the cost, like a 7B one. ``small``
(default): CLIP tower 336 px / patch 14 (576 patches, small: hidden 128, 6 layers), Llama LLM hidden 512, 8 layers,
MLP 2048. ``clip-l`` (for a GPU): the real CLIP-L/336 tower (hidden 1024, 24 layers, 16 heads) and a Llama of
hidden 1024, 24 layers, MLP 4096 (400 M parameters; its vocabulary is the tiny tokenizer's). ``tiny``: the same
token counts through a 2-layer tower and LLM, to run the code paths quickly.

Time: the budgets run interleaved round-robin on one model in one process (after a warm-up round); the table shows
medians and their ratio to stock (CUDA: timed with CUDA events). FLOPs: counted analytically from the configs and
sequence lengths (see ``step_flops``) -- the ratio a pure-compute model predicts. Peak memory, CPU: each budget in a
fresh subprocess; the peak resident set size (VmHWM, reset through /proc/self/clear_refs after the model and batch
are built) minus the resident size at that point, i.e. what the step itself adds (activations, gradients,
optimizer state, temps). CUDA: in this process, ``torch.cuda.max_memory_allocated`` over two steps after a reset
of the peak, minus what was allocated before them (the same quantity; the total peak is reported too).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass

import torch

from timing import DTYPES, is_cuda, time_ms

from visionzip_tune.families import (
    apply_visionzip,
    family_of,
    projector_parameters,
    remove_visionzip,
    tokens_per_image,
)
from visionzip_tune.demo.tiny import TinySpec, build_tiny

GEOMETRIES = {
    "small": dict(
        image_size=336,
        patch_size=14,
        vision_hidden=128,
        vision_layers=6,
        vision_heads=4,
        text_hidden=512,
        text_layers=8,
        text_heads=8,
    ),
    # LLaVA-1.5's CLIP-L/336 tower and an LLM big enough to keep a GPU busy (TinySpec's MLP is 4 x hidden).
    "clip-l": dict(
        image_size=336,
        patch_size=14,
        vision_hidden=1024,
        vision_layers=24,
        vision_heads=16,
        text_hidden=1024,
        text_layers=24,
        text_heads=16,
    ),
    # The same token counts at a size where a step takes milliseconds: runs the code paths (gpu_check on a CPU).
    "tiny": dict(
        image_size=336,
        patch_size=14,
        vision_hidden=64,
        vision_layers=2,
        vision_heads=2,
        text_hidden=128,
        text_layers=2,
        text_heads=2,
    ),
}
Budget = tuple[int, int] | None  # (dominant, contextual) per image or crop; None = stock


@dataclass(frozen=True)
class Setup:
    spec: TinySpec
    budgets: tuple[Budget, ...]  # the first is the reference (stock)
    image_size: tuple[int, int]  # (height, width) of the benchmarked image


FAMILIES = ("llava", "llava_next")
SUPERVISED = 30  # answer tokens with labels at the end of each sample; the rest of the text is the prompt


def make_setup(family: str, geometry: str = "small") -> Setup:
    shape = GEOMETRIES[geometry]
    if family == "llava":
        return Setup(TinySpec(family="llava", **shape), (None, (162, 30), (54, 10)), (336, 336))
    if family == "llava_next":
        return Setup(
            TinySpec(family="llava_next", crop_grids="1x2 2x1 2x2", **shape), (None, (54, 10), (27, 5)), (672, 672)
        )
    raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")


def build(setup: Setup, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The model with only the projector trainable, and AdamW on the projector (as ``train.mode=projector``).

    Built on the CPU, then moved: all of it in ``dtype`` (bf16 AdamW state for the small projector, where DeepSpeed
    would keep an fp32 master copy: a few MiB, the step's cost is elsewhere)."""
    model, _, _ = build_tiny(setup.spec)
    model.to(device=device, dtype=dtype)
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
    30 supervised; pixel values as the family's image processor lays them out. Drawn on the CPU (the same batch on
    every device), returned on the model's device, pixels in its dtype."""
    config = model.config
    tokens = tokens_per_image(config, setup.image_size)
    generator = torch.Generator().manual_seed(0)
    vocab = min(config.image_token_id, config.text_config.pad_token_id)  # ordinary tokens sit below both
    words = torch.randint(3, vocab, (batch, text - 1), generator=generator)
    image = torch.full((batch, tokens), config.image_token_id)
    input_ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), image, words], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -SUPERVISED:] = input_ids[:, -SUPERVISED:]
    family = family_of(config)
    size = family.image_side(config)  # the tower's input; Mini-Gemini's high-resolution image
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    if not family.anyres:
        inputs["pixel_values"] = torch.randn(batch, 3, size, size, generator=generator)
    else:
        crops = crops_per_image(setup)
        inputs["pixel_values"] = torch.randn(batch, crops, 3, size, size, generator=generator)
        inputs["image_sizes"] = torch.tensor([setup.image_size] * batch)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return {name: tensor.to(model.device) for name, tensor in inputs.items()}


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
# Peak memory: on the CPU in a fresh process per budget; on CUDA in this process (the allocator's peak resets)


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_child(setup: Setup, index: int, batch: int, text: int, steps: int, dtype: torch.dtype) -> dict[str, float]:
    model, optimizer = build(setup, "cpu", dtype)
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
        "--geometry",
        args.geometry,
        "--dtype",
        args.dtype,
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


def cuda_peak_mib(model, optimizer, data: dict[str, torch.Tensor], steps: int = 2) -> tuple[float, float]:
    """(peak MiB allocated during ``steps`` steps, of which MiB above what was allocated before them). Run after the
    timed rounds, so AdamW's state already exists and counts in the base, as it does in the CPU figure."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for _ in range(steps):
        train_step(model, optimizer, data)
    peak = torch.cuda.max_memory_allocated()
    return peak / 2**20, (peak - base) / 2**20


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=FAMILIES, default="llava", help="model geometry (default llava)")
    parser.add_argument("--geometry", choices=tuple(GEOMETRIES), default="small", help="tower and LLM sizes")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (after one warm-up round; at least 2)")
    parser.add_argument("--batch", type=int, default=2, help="samples per step")
    parser.add_argument("--text", type=int, default=100, help="text tokens per sample (BOS included)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (CUDA events, peak CUDA memory)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of the whole model")
    parser.add_argument("--no-memory", action="store_true", help="skip peak memory (CPU: a fresh process per budget)")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    """One row per budget (stock first): tokens, step time (median, IQR, ratio), FLOP ratio, peak memory."""
    setup = make_setup(args.family, args.geometry)
    model, optimizer = build(setup, args.device, DTYPES[args.dtype])
    batches, tokens = [], []
    for budget in setup.budgets:
        set_budget(model, budget)
        batches.append(make_batch(model, setup, args.batch, args.text))
        tokens.append(tokens_per_image(model.config, setup.image_size))
    times: list[list[float]] = [[] for _ in setup.budgets]
    for round_index in range(args.rounds + 1):
        for k, (budget, data) in enumerate(zip(setup.budgets, batches)):
            set_budget(model, budget)
            elapsed = time_ms(functools.partial(train_step, model, optimizer, data), args.device)
            if round_index > 0:  # round 0 warms up allocator and kernels
                times[k].append(elapsed)
    memory: list[tuple[float | None, float | None]] = [(None, None)] * len(setup.budgets)
    if not args.no_memory and is_cuda(args.device):
        memory = []
        for budget, data in zip(setup.budgets, batches):
            set_budget(model, budget)
            memory.append(cuda_peak_mib(model, optimizer, data))
    elif not args.no_memory:
        memory = [(None, measure_memory(k, args)) for k in range(len(setup.budgets))]

    crops = crops_per_image(setup)
    flops = [
        step_flops(model.config, n, args.batch, args.text, crops, budget is not None)
        for n, budget in zip(tokens, setup.budgets)
    ]
    median = [statistics.median(values) for values in times]
    rows = []
    for k, budget in enumerate(setup.budgets):
        quartiles = statistics.quantiles(times[k], n=4)
        peak_total, peak = memory[k]
        rows.append(
            {
                "budget": "stock" if budget is None else f"{budget[0]}+{budget[1]}",
                "tokens_per_image": tokens[k],
                "llm_seq": tokens[k] + args.text,
                "step_ms": median[k],
                "iqr_ms": quartiles[2] - quartiles[0],
                "time_ratio": median[k] / median[0],
                "flop_ratio": flops[k].total / flops[0].total,
                "gflop": flops[k].total / 1e9,
                "llm_flop_share": flops[k].llm / flops[k].total,
                "peak_mib": peak,  # what the step adds above the resident model, batch and optimizer state
                "peak_total_mib": peak_total,  # CUDA only: everything allocated at the peak
                "mem_ratio": None if peak is None else peak / memory[0][1],
            }
        )
    return rows


def print_table(args: argparse.Namespace, rows: list[dict]) -> None:
    setup = make_setup(args.family, args.geometry)
    spec, crops = setup.spec, crops_per_image(setup)
    print(
        f"{args.family}: projector-mode step, one {setup.image_size[0]}x{setup.image_size[1]} image ({crops} tower "
        f"pass(es)) per sample, batch {args.batch}, {args.text} text tokens/sample, {args.device} {args.dtype}, "
        f"{args.threads} threads, {args.rounds} interleaved rounds (medians); LLM {spec.text_layers}x"
        f"{spec.text_hidden}, CLIP {spec.image_size}px/{spec.patch_size} {spec.vision_layers}x{spec.vision_hidden}"
    )
    header = (
        f"{'budget':>10} {'tokens/img':>10} {'LLM seq':>7} {'step ms':>8} {'IQR ms':>7} {'time ratio':>10} "
        f"{'FLOP ratio':>10} {'GFLOP':>7} {'LLM %':>6} {'peak MiB':>9} {'mem ratio':>9}"
    )
    print(header)
    for row in rows:
        memory = "-" if row["peak_mib"] is None else f"{row['peak_mib']:>9.0f} {row['mem_ratio']:>9.3f}"
        print(
            f"{row['budget']:>10} {row['tokens_per_image']:>10} {row['llm_seq']:>7} {row['step_ms']:>8.0f} "
            f"{row['iqr_ms']:>7.0f} {row['time_ratio']:>10.3f} {row['flop_ratio']:>10.3f} {row['gflop']:>7.1f} "
            f"{100 * row['llm_flop_share']:>6.1f} {memory:>19}"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        setup = make_setup(args.family, args.geometry)
        print(json.dumps(memory_child(setup, args.memory_child, args.batch, args.text, 2, DTYPES[args.dtype])))
        return
    print_table(args, run(args))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
