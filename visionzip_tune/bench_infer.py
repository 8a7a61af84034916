"""``python -m visionzip_tune bench-infer``: where inference time goes, per stage, for the stock model, VisionZip
budgets and a tuned projector, on one image (and/or video) and one prompt.

    python -m visionzip_tune bench-infer --model llava-hf/llava-1.5-7b-hf --image cat.jpg --budgets 64,128,192
    python -m visionzip_tune bench-infer --projector runs/x/export --image cat.jpg --json bench.json

``--warmup`` untimed rounds, then ``--repeats`` timed rounds; a round runs every configuration once (one base model
switched between them in place, the order rotating from round to round, so load on the machine hits them alike),
each a greedy generation of exactly ``--new-tokens`` tokens; medians reported. Stages come from hooks in the model's own forward (``stage_timer``): vision tower,
VisionZip step (the vision features' time minus tower and projector; for stock, the stock feature selection),
projector, LLM prefill, time to first token (from the ``generate`` call to the first token's logits: preprocessing
excluded, vision included, as the paper's "prefilling time"), decode tokens/s, plus CPU preprocessing (media
transform + templating). Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU (n/a on a CPU, where the
process's high-water mark cannot be reset between runs); the KV cache is computed from the config. The FLOPs are the
paper's Eq. 1 for the LLM prefill, T * (4nd^2 + 2n^2d + 2ndm) over T layers for n prompt tokens of width d and MLP
width m; their ratio to stock is printed next to the measured prefill and TTFT ratios. On a CPU only the ratios
mean something. Prints a table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from visionzip_tune.data.images import open_image
from visionzip_tune.data.validate import BadSample
from visionzip_tune.errors import UserError
from visionzip_tune.generate import load_model
from visionzip_tune.prompts import Prompter, video_frames_of
from visionzip_tune.stage_timer import Clock, instrumented
from visionzip_tune.variants import (
    Switcher,
    Variant,
    add_model_arguments,
    check_model_arguments,
    parse_budgets,
    plan,
    prompter_for,
)

STAGES = ("preprocess", "vision_tower", "visionzip", "projector", "llm_prefill", "ttft", "decode", "generate")


def prefill_flops(config, tokens: int) -> float:
    """The paper's Eq. 1: T * (4nd^2 + 2n^2d + 2ndm) for ``tokens`` = n prompt tokens through the LLM."""
    text = config.get_text_config()
    d, m, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    return layers * (4 * tokens * d**2 + 2 * tokens**2 * d + 2 * tokens * d * m)


def kv_cache_bytes(config, tokens: int, dtype: torch.dtype) -> int:
    """Key and value cache of ``tokens`` positions over every LLM layer."""
    text = config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * heads * head_dim * tokens * torch.finfo(dtype).bits // 8


def measure(model, prompter: Prompter, images, frames, question: str, new_tokens: int) -> dict[str, float]:
    """One generation of exactly ``new_tokens`` tokens: each stage in ms, decode in tokens/s."""
    start = time.perf_counter()
    media = prompter.media(images, frames)
    ids = prompter.prompt([], question, media)
    preprocess = (time.perf_counter() - start) * 1e3
    input_ids = torch.tensor([ids], device=model.device)
    clock = Clock(model.device)
    with instrumented(model, clock) as marks, torch.no_grad():
        clock.sync()
        begin = clock.mark()
        model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            **prompter.model_inputs(media, input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=prompter.tokenizer.pad_token_id,
            suppress_tokens=prompter.placeholder_ids,
        )
        end = clock.mark()
        clock.sync()
    vision, tower, projector = (marks.total_ms(s) for s in ("vision", "tower", "projector"))
    decode_ms = clock.ms(marks.head[0], marks.head[-1])
    return {
        "preprocess": preprocess,
        "vision_tower": tower,
        "visionzip": vision - tower - projector,
        "projector": projector,
        "llm_prefill": clock.ms(*marks.spans["llm"][0]),
        "ttft": clock.ms(begin, marks.head[0]),
        "decode": (len(marks.head) - 1) / (decode_ms / 1e3) if len(marks.head) > 1 and decode_ms > 0 else None,
        "generate": clock.ms(begin, end),
    }


def timed_rounds(variants: list[Variant], switch: Switcher, prompter: Prompter, images, frames, args):
    """Each variant's measurements: ``args.warmup`` untimed rounds, then ``args.repeats`` rounds that run every
    variant once, in an order rotating from round to round, so that load on the machine hits them alike."""
    model = switch.model
    cuda = model.device.type == "cuda"

    def one(variant: Variant) -> dict:
        switch.to(variant)
        if cuda:
            torch.cuda.reset_peak_memory_stats(model.device)
        sample = measure(model, prompter, images, frames, args.prompt, args.new_tokens)
        sample["peak"] = torch.cuda.max_memory_allocated(model.device) if cuda else None
        return sample

    for _ in range(args.warmup):
        for variant in variants:
            one(variant)
    samples: dict[str, list[dict]] = {variant.label: [] for variant in variants}  # labels are unique
    started = time.perf_counter()
    for round_ in range(args.repeats):
        shift = round_ % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            samples[variant.label].append(one(variant))
        left = args.repeats - round_ - 1
        eta = f"; ETA {(time.perf_counter() - started) / (round_ + 1) * left:.0f} s" if left else ""
        print(f"[bench-infer] round {round_ + 1}/{args.repeats}{eta}", file=sys.stderr, flush=True)
    return samples


def summary(variant: Variant, model, prompter: Prompter, images, frames, samples: list[dict], peak, args) -> dict:
    """A run's medians over its measured generations, token counts and memory (model set to the variant)."""
    media = prompter.media(images, frames)
    ids = prompter.prompt([], args.prompt, media)
    placeholders = {prompter.image_token_id, prompter.video_token_id} - {None}
    medians = {
        stage: statistics.median(s[stage] for s in samples) if samples[0][stage] is not None else None
        for stage in STAGES
    }
    return {
        "label": variant.label,
        "tuned": variant.tuned,
        "budget": dict(getattr(model.config, "visionzip", None) or {}) or None,
        "image_tokens": media.image_tokens,
        "video_tokens": media.video_tokens,
        "vision_tokens": sum(1 for t in ids if t in placeholders),
        "total_tokens": len(ids),
        "ms": {stage: value for stage, value in medians.items() if stage != "decode"},
        "decode_tokens_per_s": medians["decode"],
        "peak_memory_bytes": peak,
        "kv_cache_bytes": kv_cache_bytes(model.config, len(ids) + args.new_tokens, model.dtype),
        "prefill_flops": prefill_flops(model.config, len(ids)),
    }


def add_ratios(rows: list[dict]) -> None:
    """Each run's predicted (Eq. 1) and measured ratios to the stock run (``rows[0]``)."""
    stock = rows[0]
    for row in rows:
        row["flops_ratio"] = row["prefill_flops"] / stock["prefill_flops"]
        row["prefill_ratio"] = row["ms"]["llm_prefill"] / stock["ms"]["llm_prefill"]
        row["ttft_ratio"] = row["ms"]["ttft"] / stock["ms"]["ttft"]


def _fmt(value, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    header = (
        "run | vision tok | total tok | tower ms | zip ms | proj ms | prefill ms | TTFT ms | decode tok/s | "
        "peak MiB | Eq.1 FLOPs ratio | prefill ratio | TTFT ratio"
    )
    lines = [header, "|".join("---" for _ in header.split("|"))]
    for r in rows:
        ms = r["ms"]
        peak = None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**20
        lines.append(
            " | ".join(
                [
                    r["label"],
                    str(r["vision_tokens"]),
                    str(r["total_tokens"]),
                    _fmt(ms["vision_tower"]),
                    _fmt(ms["visionzip"]),
                    _fmt(ms["projector"]),
                    _fmt(ms["llm_prefill"]),
                    _fmt(ms["ttft"]),
                    _fmt(r["decode_tokens_per_s"]),
                    _fmt(peak, ".0f"),
                    _fmt(r["flops_ratio"], ".3f"),
                    _fmt(r["prefill_ratio"], ".3f"),
                    _fmt(r["ttft_ratio"], ".3f"),
                ]
            )
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="python -m visionzip_tune bench-infer",
        description="Time inference per stage (vision tower, VisionZip, projector, LLM prefill, TTFT, decode) for "
        "the stock model and each budget; medians after warm-up; the paper's FLOP estimate next to the measured "
        "ratios.",
    )
    add_model_arguments(parser)
    parser.add_argument("--image", help="image file")
    parser.add_argument("--video", metavar="FILE_OR_DIR", help="video file or directory of frames (video families)")
    parser.add_argument(
        "--budgets",
        help="comma-separated budgets, DOMINANT+CONTEXTUAL or a token total split as the paper does, e.g. 64,128,192; "
        "Qwen: ratios of each image's tokens, e.g. 0.45+0.05 (default: the export's budget; none without --projector)",
    )
    parser.add_argument("--prompt", default="Describe the image in detail.", help="the question asked")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per measurement (default 16)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed generations before measuring (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed generations; medians reported (default 5)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    for flag, value, least in (("--new-tokens", args.new_tokens, 1), ("--warmup", args.warmup, 0)):
        if value < least:
            parser.error(f"{flag} must be >= {least}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.image is None and args.video is None:
        raise UserError("give an image (--image FILE) and/or a video (--video FILE_OR_DIR) to run inference on.")
    record = check_model_arguments(args)
    variants = plan(None if args.budgets is None else parse_budgets(args.budgets), record)
    try:
        images = [open_image(args.image)] if args.image else []
    except BadSample as err:
        raise UserError(f"--image: {err.reason}") from None
    model, processing, _ = load_model(args.model or record["base_model"], None, dtype=args.dtype, device=args.device)
    prompter = prompter_for(model, processing, record, args)
    switch = Switcher(model, args.projector, record)
    frames = video_frames_of(args.video, prompter.video_frames) if args.video else None
    samples = timed_rounds(variants, switch, prompter, images, frames, args)
    rows = []
    for variant in variants:
        switch.to(variant)
        peak = max(s["peak"] for s in samples[variant.label]) if model.device.type == "cuda" else None
        rows.append(summary(variant, model, prompter, images, frames, samples[variant.label], peak, args))
    add_ratios(rows)
    device = str(model.device)
    report = {
        "device": device,
        "dtype": str(model.dtype).removeprefix("torch."),
        "timer": "cuda events" if device.startswith("cuda") else "perf_counter",
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "runs": rows,
    }
    print(
        f"device {device}, {report['dtype']}, {report['timer']}; medians of {args.repeats} after {args.warmup} warm-up"
    )
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"[bench-infer] wrote {args.json}", file=sys.stderr)
    return 0
