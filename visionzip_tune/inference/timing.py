"""Where inference time goes, per stage (what ``python -m visionzip_tune bench-infer`` measures), for the stock model,
VisionZip budgets and a tuned projector, on one image (and/or video) and one prompt.

Warm-up rounds, then timed rounds; a round runs every setting once (one base model switched between them in place,
the order rotating from round to round, so load on the machine hits them alike), each a greedy generation of
exactly ``new_tokens`` tokens; medians reported. Stages come from hooks in the model's own forward
(``stage_timer``): vision tower,
VisionZip step (the vision features' time minus tower and projector; for stock, the stock feature selection),
projector, LLM prefill, time to first token (from the ``generate`` call to the first token's logits: preprocessing
excluded, vision included, as the paper's "prefilling time"), decode tokens/s, plus CPU preprocessing (media
transform + templating). Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU (n/a on a CPU, where the
process's high-water mark cannot be reset between runs); the KV cache is computed from the config. The FLOPs are the
paper's Eq. 1 for the LLM prefill, T * (4nd^2 + 2n^2d + 2ndm) over T layers for n prompt tokens of width d and MLP
width m; their ratio to stock is printed next to the measured prefill and TTFT ratios. On a CPU only the ratios
mean something.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from visionzip_tune.inference.prompts import Prompter
from visionzip_tune.inference.stage_timer import Clock, instrumented
from visionzip_tune.inference.variants import Setting, Switcher

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


def timed_rounds(
    settings: list[Setting],
    switch: Switcher,
    prompter: Prompter,
    images,
    frames,
    question: str,
    *,
    new_tokens: int,
    warmup: int,
    repeats: int,
) -> dict[str, list[dict]]:
    """Each setting's measurements: ``warmup`` untimed rounds, then ``repeats`` rounds that run every setting once,
    in an order rotating from round to round, so that load on the machine hits them alike."""
    model = switch.model
    cuda = model.device.type == "cuda"

    def one(setting: Setting) -> dict:
        switch.to(setting)
        if cuda:
            torch.cuda.reset_peak_memory_stats(model.device)
        sample = measure(model, prompter, images, frames, question, new_tokens)
        sample["peak"] = torch.cuda.max_memory_allocated(model.device) if cuda else None
        return sample

    for _ in range(warmup):
        for setting in settings:
            one(setting)
    samples: dict[str, list[dict]] = {setting.label: [] for setting in settings}  # labels are unique
    started = time.perf_counter()
    for round_ in range(repeats):
        shift = round_ % len(settings)
        for setting in settings[shift:] + settings[:shift]:
            samples[setting.label].append(one(setting))
        left = repeats - round_ - 1
        eta = f"; ETA {(time.perf_counter() - started) / (round_ + 1) * left:.0f} s" if left else ""
        print(f"[bench-infer] round {round_ + 1}/{repeats}{eta}", file=sys.stderr, flush=True)
    return samples


def summary(
    setting: Setting,
    model,
    prompter: Prompter,
    images,
    frames,
    question: str,
    new_tokens: int,
    samples: list[dict],
    peak,
) -> dict:
    """A run's medians over its measured generations, token counts and memory (model set to the setting)."""
    media = prompter.media(images, frames)
    ids = prompter.prompt([], question, media)
    placeholders = {prompter.image_token_id, prompter.video_token_id} - {None}
    medians = {
        stage: statistics.median(s[stage] for s in samples) if samples[0][stage] is not None else None
        for stage in STAGES
    }
    return {
        "label": setting.label,
        "tuned": setting.tuned,
        "budget": dict(getattr(model.config, "visionzip", None) or {}) or None,
        "image_tokens": media.image_tokens,
        "video_tokens": media.video_tokens,
        "vision_tokens": sum(1 for t in ids if t in placeholders),
        "total_tokens": len(ids),
        "ms": {stage: value for stage, value in medians.items() if stage != "decode"},
        "decode_tokens_per_s": medians["decode"],
        "peak_memory_bytes": peak,
        "kv_cache_bytes": kv_cache_bytes(model.config, len(ids) + new_tokens, model.dtype),
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
