"""Training from the compressed-feature cache vs computing the frozen part every step, and against TRL.

    python bench/bench_cache.py [--geometry demo llava-1.5 onevision] [--rounds 2] [--steps 5] [--batch 2]
                                [--threads 1] [--no-trl]

Per geometry, in one process: a random tiny model of that geometry and a demo dataset of ``steps x batch`` samples
(synthetic 224 px images, ~5% text-only); the cache is built once (timed: ``build``), then projector-mode runs of
``steps`` optimizer steps alternate round-robin, each through the real training loop (``training.loop.train``,
DeepSpeed ZeRO-2, one process, no evaluation): computed (tower + compression every step, images decoded and
processed every step) and cached (``train.feature_cache``: rows read from the memory-mapped shards). A step's time is
the loop's own (``metrics.jsonl``: data loading included); the table shows medians over every step but each run's
first, the cached / computed ratio, bytes per sample on disk, and the build against one computed epoch.

Geometries (the token geometry of the real model; widths shrunk so a CPU runs them, the LLM kept small enough that
its share of the step is the one of a small-LLM model -- at LLaVA-1.5-7B's real proportions the tower is ~5% of the
compute, and the cache saves that and the image decoding):

- ``demo``: ``recipes/tiny/demo.yaml``'s model (112 px, 64 patches + CLS, 3 layers; LLM 2 x 64), 12 + 4 tokens.
- ``llava-1.5``: CLIP 336 px / 14 = 576 patches + CLS, 24 layers (hidden 128), LLM 8 x 512; 54 + 10 per image.
- ``onevision``: OneVision-0.5B-like: SigLIP 384 px / 14 = 729 patches, 27 layers (hidden 64), every image tiled
  into a 2 x 2 grid + the base crop (5 crops), a small LLM (8 x 128); 54 + 10 per crop (320 per image).

TRL (``--no-trl`` to skip; needs ``pip install trl``, a bench-only peer, not a dependency): the ``llava-1.5`` model
stock (576 tokens per image, the whole tower every step, as TRL's ``SFTTrainer`` trains a LLaVA: images processed in
its collator, projector alone trainable) against our cached epoch at 64 tokens, samples per second. TRL has no
cache, so each of its epochs is its epoch 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "tiny" / "demo.yaml"

from visionzip_tune.demo.dataset import make_demo_dataset  # noqa: E402
from visionzip_tune.demo.tiny import TinySpec, save_tiny  # noqa: E402
from visionzip_tune.distributed import init_distributed  # noqa: E402
from visionzip_tune.feature_cache import Shards  # noqa: E402
from visionzip_tune.loading import load_model_processing, load_vlm  # noqa: E402
from visionzip_tune.training import build  # noqa: E402
from visionzip_tune.training.cache import build_options, open_cache  # noqa: E402
from visionzip_tune.training.config import load_config  # noqa: E402
from visionzip_tune.training.loop import train  # noqa: E402
from visionzip_tune.training.metrics import read_metrics  # noqa: E402


@dataclass(frozen=True)
class Geometry:
    spec: TinySpec
    budget: tuple[int, int]  # dominant, contextual per image (crop)
    label: str


GEOMETRIES = {
    "demo": Geometry(
        TinySpec(image_size=112, vision_layers=3, text_init_std=0.125), (12, 4), "demo (64 patches, 3 layers)"
    ),
    "llava-1.5": Geometry(
        TinySpec(
            family="llava",
            image_size=336,
            vision_hidden=128,
            vision_layers=24,
            text_hidden=512,
            text_layers=8,
            text_heads=8,
        ),
        (54, 10),
        "LLaVA-1.5 (576 patches, CLIP 24 layers)",
    ),
    "onevision": Geometry(
        TinySpec(
            family="llava_onevision",
            image_size=384,
            vision_hidden=64,
            vision_layers=27,
            text_hidden=128,
            text_layers=8,
            crop_grids="2x2",
        ),
        (54, 10),
        "OneVision-0.5B-like (SigLIP 27 layers x 729, 5 crops)",
    ),
}


def overrides(model_dir: Path, demo, out: Path, geometry: Geometry, steps: int, batch: int, *more: str) -> list[str]:
    dominant, contextual = geometry.budget
    return [
        f"model.name_or_path={model_dir}",
        "model.build_tiny_if_missing=false",
        f"data.path={demo.train}",
        f"data.image_folder={demo.images}",
        "data.eval_path=null",
        "data.build_demo_if_missing=false",
        "data.num_workers=0",
        "data.max_length=1024",
        f"visionzip.dominant={dominant}",
        f"visionzip.contextual={contextual}",
        f"train.max_steps={steps}",
        f"train.micro_batch_size={batch}",
        "train.save_every=0",
        "train.keep_checkpoints=1",
        "logging.progress_bar=false",
        "output.export=false",
        f"output.dir={out}",
        *more,
    ]


def step_times(run_dir: Path, batch: int) -> list[float]:
    """Seconds of each optimizer step but the first (warm-up) of a run, from its metrics."""
    steps = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    return [batch / r["samples_per_s"] for r in steps[1:]]


def quietly(action):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return action()


def bench_geometry(name: str, args, work: Path) -> dict:
    geometry = GEOMETRIES[name]
    model_dir = save_tiny(work / name / "model", geometry.spec)
    demo = make_demo_dataset(work / name / "demo", n=args.steps * args.batch, seed=0, n_eval=8)
    cache = work / name / "cache"
    cfg = load_config(
        DEMO, overrides(model_dir, demo, work / "x", geometry, args.steps, args.batch, f"train.feature_cache={cache}")
    )

    def build_cache() -> float:
        model = load_vlm(str(model_dir))
        build.apply_recipe_visionzip(model, cfg.visionzip)
        processing = load_model_processing(str(model_dir))
        options = build_options(cfg)
        run_cache = open_cache(cfg, init_distributed(), model, processing, torch.float32, options)
        started = time.perf_counter()
        run_cache.build_missing(model, init_distributed(), torch.device("cpu"), torch.float32, options)
        return time.perf_counter() - started

    build_s = quietly(build_cache)
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    shards = Shards(folder)
    times: dict[str, list[float]] = {"computed": [], "cached": []}
    for round_ in range(args.rounds):
        for variant in times:
            out = work / name / f"{variant}-{round_}"
            extra = (f"train.feature_cache={cache}", "train.feature_cache_build=false") if variant == "cached" else ()
            run_cfg = load_config(DEMO, overrides(model_dir, demo, out, geometry, args.steps, args.batch, *extra))
            quietly(lambda: train(run_cfg, init_distributed()))
            times[variant] += step_times(out, args.batch)
    computed, cached = (statistics.median(times[v]) for v in ("computed", "cached"))
    return {
        "geometry": geometry.label,
        "computed_s": computed,
        "cached_s": cached,
        "ratio": cached / computed,
        "bytes_per_sample": shards.nbytes / max(1, len(shards.fields)),
        "build_s": build_s,
        "epoch_s": computed * args.steps,
    }


def trl_step_time(model_dir: Path, demo, batch: int, steps: int, work: Path) -> float | str:
    """Median seconds per TRL SFTTrainer step (the stock model: every tower token), or why it cannot run."""
    try:
        import datasets
        from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback
        from trl import SFTConfig, SFTTrainer
    except ImportError as err:
        return f"TRL cannot run here: {err} (pip install trl; a bench-only peer)"
    from PIL import Image

    rows = []
    for sample in json.loads(demo.train.read_text())[: steps * batch]:
        turns = sample["conversations"]
        messages = [
            {
                "role": "user" if t["from"] == "human" else "assistant",
                "content": t["value"].replace("<image>", "").strip(),
            }
            for t in turns
        ]
        images = [Image.open(demo.images / sample["image"]).convert("RGB")] if "image" in sample else []
        rows.append({"messages": messages, "images": images})
    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    processor = AutoProcessor.from_pretrained(model_dir)

    class StepTimer(TrainerCallback):
        """The time between two steps' ends: the step and the loading of its batch (TRL's collator processes the
        images), as the loop's own step time counts both."""

        def __init__(self):
            self.times, self.last = [], None

        def on_step_end(self, *_, **__):
            now = time.perf_counter()
            if self.last is not None:
                self.times.append(now - self.last)
            self.last = now

    timer = StepTimer()
    config = SFTConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=1e-2,
        lr_scheduler_type="cosine",
        logging_steps=10**6,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        max_length=None,
        gradient_checkpointing=False,
        bf16=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=processor,
        callbacks=[timer],
    )
    quietly(trainer.train)
    return statistics.median(timer.times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", nargs="+", choices=GEOMETRIES, default=list(GEOMETRIES))
    parser.add_argument("--rounds", type=int, default=2, help="computed / cached runs per geometry, alternated")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run (one epoch of the data)")
    parser.add_argument("--batch", type=int, default=2, help="samples per step")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: on a shared CPU, 2 threads spin on each other)"
    )
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # accelerate (under TRL) would set its own otherwise
    print(
        f"bench_cache: torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds of {args.steps} steps x {args.batch} samples"
    )
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        work = Path(tmp)
        trl = None
        if not args.no_trl:  # first: before our runs set up a process group, which accelerate would take for DDP
            peer = GEOMETRIES["llava-1.5"]
            model_dir = save_tiny(work / "trl" / "model", peer.spec)
            demo = make_demo_dataset(work / "trl" / "demo", n=args.steps * args.batch, seed=0, n_eval=8)
            trl = trl_step_time(model_dir, demo, args.batch, args.steps + 1, work / "trl")
        results = {}
        for name in dict.fromkeys([*args.geometry, *([] if args.no_trl else ["llava-1.5"])]):
            results[name] = bench_geometry(name, args, work)
            r = results[name]
            print(f"  {name}: computed {r['computed_s']:.3f} s/step, cached {r['cached_s']:.3f} s/step", flush=True)
    print()
    print("| geometry | computed step | cached step | cached / computed | bytes per sample | build vs one epoch |")
    print("|---|---|---|---|---|---|")
    for name in args.geometry:
        r = results[name]
        print(
            f"| {r['geometry']} | {r['computed_s'] * 1000:.0f} ms | {r['cached_s'] * 1000:.0f} ms | "
            f"**{r['ratio']:.2f}x** | {r['bytes_per_sample'] / 1024:.1f} KiB | "
            f"{r['build_s']:.1f} s vs {r['epoch_s']:.1f} s ({r['build_s'] / r['epoch_s']:.2f}x) |"
        )
    if trl is None:
        return 0
    print()
    if isinstance(trl, str):
        print(f"TRL: {trl}")
        return 0
    peer = results["llava-1.5"]
    rate = {
        "trl": args.batch / trl,
        "computed": args.batch / peer["computed_s"],
        "cached": args.batch / peer["cached_s"],
    }
    print(
        "| LLaVA-1.5 geometry, samples/s | TRL SFTTrainer, 576 tokens | ours computed, 64 | ours epoch 2 from the cache, 64 |"
    )
    print("|---|---|---|---|")
    print(
        f"| samples/s (x TRL) | {rate['trl']:.2f} (1.00x) | {rate['computed']:.2f} ({rate['computed'] / rate['trl']:.2f}x) "
        f"| {rate['cached']:.2f} (**{rate['cached'] / rate['trl']:.2f}x**) |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
