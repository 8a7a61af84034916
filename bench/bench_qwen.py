"""VisionZip on Qwen2.5-VL: the vision side is not faster (the merger needs the tower's last block); the saving is
in the LLM, which sees fewer tokens.

    python bench/bench_qwen.py [--part tower|train|both] [--rounds 7] [--threads 2] [--device cpu|cuda]

``tower``: ``model.model.get_image_features`` stock against zipped, on a Qwen2.5-VL tower of moderate size (16
blocks of hidden 256, 4 heads, windows of 112 px with full attention at blocks 3, 7, 11 and 15 -- the 7B layout on
half the depth) for one 448 x 448 image (1,024 patches, 256 merged tokens) and one 896 x 896 image (4,096 patches,
1,024 merged tokens): stock, 50 % (0.45 + 0.05) merged after the merger (``post``) and on its inputs (``pre``), and
25 % (0.20 + 0.05, post). Zipped runs the whole tower and its merger, plus the last block's attention map
(scores) and the selection.

``train``: one projector-mode step (forward with labels through the HF forward, backward, AdamW on the merger;
tower and LLM frozen) on a random Qwen2.5-VL whose LLM dominates the cost like a 7B one's (hidden 512, 8 layers,
MLP 2048; tower 8 blocks of 128): two samples of one 448 x 448 image (256 merged tokens) and 100 text tokens, at
stock, 50 % and 25 %, next to a FLOP count (``step_flops``). Peak memory: on CUDA the peak allocated above the
step's start; on CPU each budget in a fresh process, peak resident size above the start (as bench_train.py).

Variants run interleaved round-robin after a warm-up round, in reverse order every other round (so a periodic
load on a shared machine does not favour one); tables show medians and ratios to stock from this one run, and the
same for the fastest round of each (the least disturbed on a shared machine). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoModelForImageTextToText

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import _status_mib, llm_flops  # noqa: E402

from visionzip_tune.families import apply_visionzip, id_inputs, projector_parameters, remove_visionzip  # noqa: E402
from visionzip_tune.families import tokens_per_image  # noqa: E402
from visionzip_tune.demo.tiny import TinySpec, build_qwen_config, qwen_tokenizer  # noqa: E402

TOWER = dict(vision_hidden=256, vision_layers=16, vision_heads=4, text_hidden=64, text_layers=1, text_heads=4)
TRAIN = dict(vision_hidden=128, vision_layers=8, vision_heads=4, text_hidden=512, text_layers=8, text_heads=8)
FULL_ATTENTION = (3, 7, 11, 15)  # Qwen2.5-VL-7B: every 8th of 32 blocks; here every 4th of 16
BUDGETS = {
    "stock": None,
    "50% post": (0.45, 0.05, "post"),
    "50% pre": (0.45, 0.05, "pre"),
    "25% post": (0.2, 0.05, "post"),
}
SUPERVISED = 30


def qwen(spec: dict, device: str, full_attention=None):
    """A random Qwen2.5-VL with the released windows of 112 px (and full attention at ``full_attention``, default
    the last block) on ``device``."""
    tiny = TinySpec(family="qwen2_5_vl", image_size=896, **spec)
    config = build_qwen_config(tiny, qwen_tokenizer())
    config.vision_config.window_size = 112
    if full_attention is not None:
        config.vision_config.fullatt_block_indexes = list(full_attention)
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config).eval().to(device)


def set_budget(model, budget) -> None:
    if budget is None:
        remove_visionzip(model)
    else:
        apply_visionzip(model, dominant_ratio=budget[0], contextual_ratio=budget[1], merge_space=budget[2])


def image_inputs(model, side: int, count: int) -> dict[str, torch.Tensor]:
    """``count`` random images of ``side`` x ``side`` px as Qwen's image processor packs them."""
    patches = (side // 14) ** 2
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(count * patches, 3 * 2 * 14 * 14, generator=generator)
    grid = torch.tensor([[1, side // 14, side // 14]] * count, device=model.device)
    return {"pixel_values": pixels.to(model.device, model.dtype), "image_grid_thw": grid}


def interleaved(variants: dict, rounds: int, sync) -> dict[str, list[float]]:
    """Seconds of each variant's call, round-robin, after one warm-up round."""
    times = {name: [] for name in variants}
    for round_index in range(rounds + 1):
        order = list(variants.items())
        for name, call in order if round_index % 2 else order[::-1]:
            sync()
            start = time.perf_counter()
            call()
            sync()
            if round_index:
                times[name].append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------------------------------------------------------
# The tower


def bench_tower(args, sync) -> None:
    model = qwen(TOWER, args.device, FULL_ATTENTION)
    vision = model.config.vision_config
    print(
        f"tower: Qwen2.5-VL vision {vision.depth} blocks x {vision.hidden_size} ({vision.num_heads} heads, windows of "
        f"112 px, full attention at {list(vision.fullatt_block_indexes)}), {args.device} {model.dtype}, "
        f"{args.threads} threads, {args.rounds} interleaved rounds (medians)"
    )
    print(f"{'image':>9} {'variant':>9} {'tokens':>7} {'ms':>8} {'ratio':>6} {'min ms':>8} {'min ratio':>9}")
    for side in (448, 896):
        inputs = image_inputs(model, side, 1)

        def call(budget):
            def run():
                set_budget(model, budget)
                with torch.no_grad():
                    model.model.get_image_features(**inputs)

            return run

        times = interleaved({name: call(budget) for name, budget in BUDGETS.items()}, args.rounds, sync)
        stock, fastest = statistics.median(times["stock"]), min(times["stock"])
        for name, budget in BUDGETS.items():
            set_budget(model, budget)
            tokens = tokens_per_image(model.config, tuple(inputs["image_grid_thw"][0].tolist()))
            median, least = statistics.median(times[name]), min(times[name])
            print(
                f"{side:>5}^2 px {name:>9} {tokens:>7} {median * 1e3:>8.1f} {median / stock:>6.3f} "
                f"{least * 1e3:>8.1f} {least / fastest:>9.3f}"
            )


# ---------------------------------------------------------------------------------------------------------------
# A projector-mode step


def train_batch(model, batch: int, text: int) -> dict[str, torch.Tensor]:
    """``batch`` samples: vision start, the 448 px image's placeholders under the current budget, vision end, then
    ``text`` text tokens, the last 30 supervised."""
    config = model.config
    inputs = image_inputs(model, 448, batch)
    tokens = tokens_per_image(config, tuple(inputs["image_grid_thw"][0].tolist()))
    generator = torch.Generator().manual_seed(1)
    words = torch.randint(3, 500, (batch, text), generator=generator)
    image = torch.full((batch, tokens), config.image_token_id)
    start = torch.full((batch, 1), config.vision_start_token_id)
    end = torch.full((batch, 1), config.vision_end_token_id)
    input_ids = torch.cat([start, image, end, words], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -SUPERVISED:] = input_ids[:, -SUPERVISED:]
    batch_inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    batch_inputs.update(id_inputs(config, input_ids))
    return {**{k: v.to(model.device) for k, v in batch_inputs.items()}, **inputs}


def train_step(model, optimizer, batch) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def build_train(device: str):
    model = qwen(TRAIN, device)
    model.requires_grad_(False)
    params = list(projector_parameters(model).values())
    for param in params:
        param.requires_grad_(True)
    return model, torch.optim.AdamW(params, lr=1e-5)


def step_flops(config, tokens: int, batch: int, text: int, budget) -> float:
    """Multiply-adds x 2 of one step; norms, softmax and the optimizer ignored. LLM as bench_train.py. Tower
    (forward, no autograd; every block in both cases -- the merger needs the last one): q/k/v/o and the gated MLP
    per patch, attention over each full-attention block's whole image and each window block's 64-patch windows.
    Merger: forward, weight gradients and the gradient between its layers, on all merged tokens for stock and
    ``post`` (which re-runs it with autograd after the tower's own run), on the K kept ones for ``pre``. VisionZip
    adds the scoring block's attention map once more (q k^T) and the selection (ignored)."""
    vision = config.vision_config
    patches, merged = (448 // 14) ** 2, (448 // 28) ** 2
    dv, vffn, out = vision.hidden_size, vision.intermediate_size, vision.out_hidden_size
    linear = 2 * (4 * dv * dv + 3 * dv * vffn) * patches
    full = 4 * patches * patches * dv
    window = 4 * patches * 64 * dv
    blocks = len(vision.fullatt_block_indexes)
    tower = vision.depth * linear + blocks * full + (vision.depth - blocks) * window
    merger_forward = 2 * (16 * dv * dv + 4 * dv * out)
    merger = merger_forward * merged  # the tower's own run
    if budget is None or budget[2] == "post":
        merger += merger_forward * merged * (3 if budget is not None else 2)  # (re-run +) backward: 2x forward
    else:
        merger += 3 * merger_forward * tokens
    scoring = 2 * patches * patches * dv if budget is not None else 0
    return llm_flops(config.text_config, tokens + text + 2, batch) + batch * (tower + merger + scoring)


def memory_child(name: str, args) -> float:
    """Peak resident MiB one step adds (CPU), in this fresh process."""
    model, optimizer = build_train(args.device)
    set_budget(model, BUDGETS[name])
    data = train_batch(model, args.batch, args.text)
    base = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:  # "5" resets the peak RSS (VmHWM) to the current RSS
        refs.write("5")
    for _ in range(2):
        train_step(model, optimizer, data)
    return _status_mib("VmHWM") - base


def peak_memory(model, optimizer, data, name: str, args) -> float:
    """Peak MiB one step adds: CUDA's peak allocated, or (CPU) a fresh process's peak resident size."""
    if args.device == "cuda":
        train_step(model, optimizer, data)  # optimizer state exists before the measured step
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        train_step(model, optimizer, data)
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    command = [sys.executable, __file__, "--memory-child", name, "--batch", str(args.batch), "--text", str(args.text)]
    command += ["--threads", str(args.threads)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def bench_train(args, sync) -> None:
    model, optimizer = build_train(args.device)
    budgets = {name: BUDGETS[name] for name in ("stock", "50% post", "50% pre", "25% post")}
    batches, tokens = {}, {}
    for name, budget in budgets.items():
        set_budget(model, budget)
        batches[name] = train_batch(model, args.batch, args.text)
        tokens[name] = int((batches[name]["input_ids"][0] == model.config.image_token_id).sum())

    def call(name):
        def run():
            set_budget(model, budgets[name])
            train_step(model, optimizer, batches[name])

        return run

    times = interleaved({name: call(name) for name in budgets}, args.rounds, sync)
    memory = {}
    for name, budget in budgets.items():
        set_budget(model, budget)
        memory[name] = peak_memory(model, optimizer, batches[name], name, args)
    flops = {name: step_flops(model.config, tokens[name], args.batch, args.text, b) for name, b in budgets.items()}
    text, vision = model.config.text_config, model.config.vision_config
    print(
        f"train: projector-mode step, batch {args.batch} x (one 448^2 image + {args.text} text tokens), LLM "
        f"{text.num_hidden_layers}x{text.hidden_size}, tower {vision.depth}x{vision.hidden_size}, {args.device} "
        f"{model.dtype}, {args.threads} threads, {args.rounds} interleaved rounds (medians)"
    )
    print(
        f"{'budget':>9} {'tokens/img':>10} {'step ms':>8} {'time ratio':>10} {'min ratio':>9} {'FLOP ratio':>10} "
        f"{'GFLOP':>7} {'peak MiB':>9} {'mem ratio':>9}"
    )
    stock, fastest = statistics.median(times["stock"]), min(times["stock"])
    for name in budgets:
        median = statistics.median(times[name])
        print(
            f"{name:>9} {tokens[name]:>10} {median * 1e3:>8.0f} {median / stock:>10.3f} "
            f"{min(times[name]) / fastest:>9.3f} "
            f"{flops[name] / flops['stock']:>10.3f} {flops[name] / 1e9:>7.1f} {memory[name]:>9.0f} "
            f"{memory[name] / memory['stock']:>9.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("tower", "train", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (after one warm-up round)")
    parser.add_argument("--batch", type=int, default=2, help="samples per training step")
    parser.add_argument("--text", type=int, default=100, help="text tokens per sample")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        print(json.dumps(memory_child(args.memory_child, args)))
        return
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    if args.part in ("tower", "both"):
        bench_tower(args, sync)
    if args.part in ("train", "both"):
        bench_train(args, sync)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
