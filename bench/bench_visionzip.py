"""Vision-tower cost of VisionZip versus the stock tower and the official-style eager route.

    python bench/bench_visionzip.py [--batch 4] [--rounds 7] [--threads 2] [--device cpu] [--dtype float32]

For a CLIP tower with 336 px / patch 14 (576 patches + CLS, LLaVA-1.5's geometry), a SigLIP tower of the same
size (576 patches, no CLS) and a SigLIP tower at OneVision's geometry (384 px / patch 14 = 729 patches), each with
random weights, it times under ``torch.no_grad()``:

  stock      the tower on SDPA, run to the end with hidden states (what LLaVA's stock get_image_features does)
  visionzip  visionzip_tune: SDPA, q/k hooks on layer L, stop after layer L, select + merge
  eager      the official route: eager attention with output_attentions=True in every layer, then select + merge
  selection  compress.visionzip alone on captured layer-L tensors (scores + select + merge)

A multi-crop LLaVA-NeXT image (a random ``LlavaNextForConditionalGeneration`` with the CLIP tower above, 336 px
crops, LLaVA-NeXT's grid pinpoints, a 672 x 672 image = base crop + 2x2 grid = 5 crops) is timed through the inner
model's ``get_image_features`` (tower + projector + layout): the stock path (all crops, ``pack_image_features`` with
unpadding and newlines) against VisionZip per crop in the ``flat`` and ``grid`` token orders.

Peak memory of SigLIP scoring (the attention each token receives needs layer L's whole N x N map) is measured at
SigLIP-so400m's OneVision geometry (729 tokens, 16 heads of 72, 10 crops = anyres_max_9's most): chunked as the
library does it versus the whole map at once, each in a fresh process (peak RSS above the inputs).

Variants run interleaved round-robin (one warm-up round discarded) so machine noise hits them alike; the table
shows medians and ratios to stock measured in this one run, and the same for the fastest round (the least
disturbed one on a shared machine). On a CUDA device (``--device cuda``) each call is timed with CUDA events
(``timing.time_ms``); ``--dtype bfloat16`` runs the towers in bf16, as a GPU serves them.
Goals (CLIP): visionzip <= 1.05x stock, selection < 2 % of the stock tower.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

from timing import DTYPES, time_ms

from visionzip_tune.algorithm import capture, compress
from visionzip_tune.families.base import zip_layer, zip_tower


def build_tower(
    kind: str, image_size: int, hidden: int, layers: int, heads: int, device: str, dtype: torch.dtype = torch.float32
):
    """A random tower (seed 0): built on the CPU in fp32 whatever the device, so every device gets the same weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    geometry = dict(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=14,
    )
    torch.manual_seed(0)
    if kind == "clip":
        tower = CLIPVisionModel(CLIPVisionConfig(**geometry))
    else:
        tower = SiglipVisionModel(SiglipVisionConfig(**geometry))
    return tower.eval().to(device=device, dtype=dtype)


def eager_route(eager_tower, hs_index: int, dominant: int, contextual: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The official approach on transformers 5: every layer eager, every attention map kept, then select."""
    attention = eager_tower.encoder.layers[hs_index - 1].self_attn
    has_cls = capture.tower_has_cls(eager_tower)

    def run(pixels: torch.Tensor) -> torch.Tensor:
        with capture.capture_qk(attention) as store:  # keys for the merge metric (the official code patched this)
            out = eager_tower(pixels, output_hidden_states=True, output_attentions=True)
        maps = out.attentions[hs_index - 1]  # (B, H, N, N)
        scores = maps[:, :, 0, 1:].sum(dim=1) if has_cls else maps.mean(dim=1).mean(dim=1)
        metric = compress.key_metric(store["k"], attention.num_heads)
        return compress.select_and_merge(
            out.hidden_states[hs_index], metric, scores, dominant=dominant, contextual=contextual, has_cls=has_cls
        ).tokens

    return run


def bench_tower(kind: str, image_size: int, layer: int, args) -> dict[str, list[float]]:
    """Milliseconds per round for each variant."""
    dtype = DTYPES[args.dtype]
    tower = build_tower(kind, image_size, args.hidden, args.layers, args.heads, args.device, dtype)
    eager = copy.deepcopy(tower)
    eager.set_attn_implementation("eager")
    hs_index = layer % (args.layers + 1)
    layer_index = capture.resolve_layer(args.layers, layer)
    pixels = torch.randn(args.batch, 3, image_size, image_size, device=args.device, dtype=dtype)
    with torch.no_grad():
        captured = capture.run_until(tower, pixels, layer_index)

    def selection():
        return zip_layer(captured, args.dominant, args.contextual).tokens

    run_eager = eager_route(eager, hs_index, args.dominant, args.contextual)
    variants: dict[str, Callable[[], object]] = {
        "stock": lambda: tower(pixels, output_hidden_states=True).hidden_states[hs_index],
        "visionzip": lambda: zip_tower(tower, pixels, layer_index, args.dominant, args.contextual),
        "eager": lambda: run_eager(pixels),
        "selection": selection,
    }
    return interleaved(variants, args)


def interleaved(variants: dict[str, Callable[[], object]], args) -> dict[str, list[float]]:
    """Milliseconds per round for each zero-argument variant, round-robin, warm-up round dropped."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.rounds + 1):
        for name, fn in variants.items():
            with torch.no_grad():
                elapsed = time_ms(fn, args.device)
            if round_index > 0:
                times[name].append(elapsed)
    return times


def bench_next(args) -> tuple[dict[str, list[float]], dict[str, int]]:
    """LLaVA-NeXT, one 672 x 672 image (5 crops): stock vs VisionZip per crop (flat, grid). Also the LLM tokens."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    import visionzip_tune as vzt
    from visionzip_tune.families import tokens_per_image

    vision = CLIPVisionConfig(
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        image_size=336,
        patch_size=14,
    )
    text = LlamaConfig(
        vocab_size=64,
        hidden_size=args.hidden,
        intermediate_size=args.hidden,
        num_hidden_layers=1,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=63,
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    )
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    stock_model = LlavaNextForConditionalGeneration(config).eval().to(device=args.device, dtype=dtype)
    flat, grid = copy.deepcopy(stock_model), copy.deepcopy(stock_model)
    vzt.apply_visionzip(flat, args.dominant, args.contextual, token_order="flat")
    vzt.apply_visionzip(grid, args.dominant, args.contextual, token_order="grid")
    pixels = torch.randn(1, 5, 3, 336, 336, device=args.device, dtype=dtype)
    sizes = torch.tensor([[672, 672]], device=args.device)
    tokens = {
        "stock": tokens_per_image(stock_model.config, (672, 672)),
        "zipped": tokens_per_image(flat.config, (672, 672)),
    }
    variants = {
        "stock": lambda: stock_model.model.get_image_features(pixels, sizes),
        "flat": lambda: flat.model.get_image_features(pixels, sizes),
        "grid": lambda: grid.model.get_image_features(pixels, sizes),
    }
    return interleaved(variants, args), tokens


def _scoring_peak_mib(crops: int, tokens: int, heads: int, head_dim: int, chunk_elements: int) -> tuple[float, float]:
    """(peak RSS growth in MiB, milliseconds) of ``compress.received_attention_scores``, run in this process."""

    def status_kib(field: str) -> int:
        # VmHWM is this process image's own peak (getrusage's ru_maxrss would carry the parent's over fork+exec).
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

    torch.set_num_threads(2)
    queries = torch.randn(crops, tokens, heads * head_dim)
    keys = torch.randn(crops, tokens, heads * head_dim)
    before_kib = status_kib("VmRSS")
    start = time.perf_counter()
    compress.received_attention_scores(queries, keys, heads, head_dim**-0.5, chunk_elements=chunk_elements)
    elapsed = (time.perf_counter() - start) * 1000
    return (status_kib("VmHWM") - before_kib) / 1024, elapsed


def bench_scoring_memory() -> dict[str, tuple[float, float]]:
    """Chunked vs whole-map SigLIP scoring at OneVision geometry, each in a fresh process (clean peak RSS)."""
    import multiprocessing

    geometry = dict(crops=10, tokens=729, heads=16, head_dim=72)
    whole = geometry["crops"] * geometry["heads"] * geometry["tokens"] ** 2
    context = multiprocessing.get_context("spawn")
    results = {}
    for name, chunk in (("chunked", compress._CHUNK_ELEMENTS), ("whole map", whole)):
        with context.Pool(1) as pool:
            results[name] = pool.apply(_scoring_peak_mib, kwds=dict(geometry, chunk_elements=chunk))
    return results


def print_rows(label: str, times: dict[str, list[float]], percent: tuple[str, ...] = ()) -> None:
    stock = {"median": statistics.median(times["stock"]), "best": min(times["stock"])}
    for name, values in times.items():
        cells = ""
        for stat, value in (("median", statistics.median(values)), ("best", min(values))):
            ratio = value / stock[stat]
            cells += f"{value:>10.1f}" + (f"{100 * ratio:>9.2f}%" if name in percent else f"{ratio:>9.2f}x")
        print(f"{label:<13}{name:<11}{cells}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dominant", type=int, default=54)
    parser.add_argument("--contextual", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (timed with CUDA events)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of towers and pixels")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    print(
        f"batch {args.batch}, patch 14, hidden {args.hidden}, {args.layers} layers, "
        f"{args.heads} heads, keep {args.dominant}+{args.contextual}, device {args.device}, {args.dtype}, "
        f"{args.threads} threads, {args.rounds} rounds"
    )
    header = f"{'tower':<13}{'variant':<11}{'median ms':>10}{'vs stock':>10}{'best ms':>10}{'vs stock':>10}"
    print(header)
    print("-" * len(header))
    for label, kind, image_size, layer in (
        ("clip 576", "clip", 336, -2),
        ("siglip 576", "siglip", 336, -1),
        ("siglip 729", "siglip", 384, -1),
    ):
        print_rows(label, bench_tower(kind, image_size, layer, args), percent=("selection",))
    times, tokens = bench_next(args)
    print_rows("next 5 crops", times)
    print(f"LLaVA-NeXT 672x672 image: {tokens['stock']} LLM tokens stock, {tokens['zipped']} with VisionZip")
    memory = bench_scoring_memory()
    print("SigLIP scoring, 10 crops x 729 tokens, 16 heads: peak RSS growth / time")
    for name, (mib, ms) in memory.items():
        print(f"  {name:<10}{mib:>8.0f} MiB{ms:>10.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
