"""Data-path throughput on the demo set: samples/s of load + template + image transform + collate, per image mode.

    python bench/bench_data.py [--n 400] [--batch 8] [--load-rows 100000]

Prints, from one run: samples/s for ``image_aspect=pad`` and ``processor`` (one process, no DataLoader workers:
the per-worker rate, multiply by workers for a loader; best of interleaved repeats), the share of that time spent
on text alone (templating and tokenization of the same samples without images), and the rate of ``load_samples``
streaming a LLaVA-shaped JSON array into Arrow (rows/s; the full 665k-sample mix takes about 665k / that rate,
once, then it is cached).

Then the same per family, measured interleaved on one demo set whose fifth of samples are 8-frame videos (frame
lists): samples/s of LLaVA-1.5 (336 px; its video samples are skipped), LLaVA-NeXT (336 px crops, every image
tiled into a 2x2 grid + base crop), Video-LLaVA (224 px, images and videos), LLaVA-OneVision (384 px crops and
frames) and Qwen2.5-VL / Qwen3-VL (images and frames resized to at most 448 x 448 px and packed as patches; frames
paired into temporal patches), and each one's time per sample relative to LLaVA-1.5 on the image samples they
share.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from visionzip_tune.data import (  # noqa: E402
    Collator,
    DataConfig,
    Placeholders,
    SupervisedDataset,
    load_samples,
)
from visionzip_tune.demo.dataset import make_demo_dataset  # noqa: E402
from visionzip_tune.families import FAMILIES  # noqa: E402
from visionzip_tune.data.processing import Processing  # noqa: E402
from visionzip_tune.data.template import llava_turns  # noqa: E402
from visionzip_tune.demo.tiny import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    TinySpec,
    build_image_processor,
    build_processor,
    build_tokenizer,
)  # noqa: E402

TOKENS_PER_IMAGE = 64  # the paper's smallest LLaVA-1.5 budget, 54 + 10


def samples_per_second(dataset: SupervisedDataset, collate: Collator, batch: int) -> float:
    start = time.perf_counter()
    for first in range(0, len(dataset), batch):
        collate([dataset[i] for i in range(first, min(first + batch, len(dataset)))])
    return len(dataset) / (time.perf_counter() - start)


def text_only_per_second(dataset: SupervisedDataset) -> float:
    rows = [dataset.samples[r] for r in dataset.rows]
    start = time.perf_counter()
    for row in rows:
        n_images = len(row["images"])
        dataset.templater(llava_turns(row["conversations"], n_images), [TOKENS_PER_IMAGE] * n_images)
    return len(rows) / (time.perf_counter() - start)


def load_rows_per_second(rows: int, folder: Path) -> float:
    path = folder / "mix.json"
    with open(path, "w") as f:
        f.write("[\n")
        for k in range(rows):
            sample = {
                "id": k if k % 3 else f"{k:012d}",
                "image": f"coco/train2017/{k:012d}.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
                    {"from": "gpt", "value": "The bus in the image is white and red. " * 4},
                    {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                    {"from": "gpt", "value": "The back of the bus features an advertisement. " * 3},
                ],
            }
            f.write(("" if k == 0 else ",\n") + json.dumps(sample, indent=2))
        f.write("\n]\n")
    start = time.perf_counter()
    load_samples(path, cache_dir=folder / "cache")
    return rows / (time.perf_counter() - start)


# Tower input px (Qwen: the largest image side its image processor keeps, max_pixels = side^2: 1,024 patches)
FAMILY_GEOMETRY = {
    "llava": 336,
    "llava_next": 336,
    "video_llava": 224,
    "llava_onevision": 384,
    "qwen2_5_vl": 448,
    "qwen3_vl": 448,
}
VIDEO_FRAMES = 8


def family_datasets(paths, samples) -> tuple[dict[str, SupervisedDataset], Collator]:
    """One dataset per family over the same samples, with that family's image processor at its real input size;
    placeholder counts are fixed (they cost nothing to compute) and the model is never built."""
    tokenizer = build_tokenizer(media_tokens=(IMAGE_TOKEN, VIDEO_TOKEN))
    video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    datasets = {}
    for family, size in FAMILY_GEOMETRY.items():
        video = FAMILIES[family].has_video
        placeholders = Placeholders(
            image_tokens=lambda sizes: [TOKENS_PER_IMAGE] * len(sizes),
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            video_tokens=(lambda size, times: TOKENS_PER_IMAGE * VIDEO_FRAMES) if video else None,  # fixed, as images
            video_token_id=video_token_id if video else None,
        )
        datasets[family] = SupervisedDataset(
            samples,
            # LLaVA-1.5 and NeXT take no video: their video samples are left out
            DataConfig(image_folder=paths.images, video_frames=VIDEO_FRAMES, max_length=4096, on_bad_sample="skip"),
            Processing(tokenizer, build_image_processor(TinySpec(family=family, image_size=size)), None),
            placeholders,
        )
    return datasets, Collator(tokenizer.pad_token_id)


def per_sample_ms(dataset: SupervisedDataset, rows: list[int]) -> float:
    """Mean ms to build one example of the given dataset positions (no collation: batches would mix kinds)."""
    start = time.perf_counter()
    for i in rows:
        dataset[i]
    return 1e3 * (time.perf_counter() - start) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=400, help="demo training samples")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch size for the collator")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per image mode (best is kept)")
    parser.add_argument("--load-rows", type=int, default=100_000, help="rows of the synthetic JSON for load_samples")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_demo_dataset(tmp / "demo", n=args.n, seed=0)
        tokenizer = build_tokenizer()
        processor = build_processor(TinySpec(image_size=336), tokenizer)  # LLaVA-1.5's 336 px CLIP input
        samples = load_samples(paths.train, cache_dir=tmp / "cache")
        collate = Collator(tokenizer.pad_token_id)
        datasets = {
            aspect: SupervisedDataset(
                samples,
                DataConfig(image_folder=paths.images, image_aspect=aspect),
                Processing(tokenizer, processor.image_processor, None),
                Placeholders(lambda sizes: [TOKENS_PER_IMAGE] * len(sizes), tokenizer.convert_tokens_to_ids("<image>")),
            )
            for aspect in ("pad", "processor")
        }
        datasets["pad"][0]  # warm-up: first-call imports and allocations
        # Best of interleaved repeats: the machine may be shared, and the best run is the least disturbed one.
        rates = {aspect: 0.0 for aspect in datasets}
        for _ in range(args.repeats):
            for aspect, dataset in datasets.items():
                rates[aspect] = max(rates[aspect], samples_per_second(dataset, collate, args.batch))
        text_rate = text_only_per_second(datasets["pad"])
        load_rate = load_rows_per_second(args.load_rows, tmp)

        mixed = make_demo_dataset(tmp / "demo-video", n=args.n, seed=0, videos=args.n // 5)
        family_sets, family_collate = family_datasets(mixed, load_samples(mixed.train, cache_dir=tmp / "cache"))
        kinds = {"image": [], "video": []}
        for i, r in enumerate(family_sets["video_llava"].rows):
            row = family_sets["video_llava"].samples[r]
            if row["frame_files"]:
                kinds["video"].append(i)
            elif row["images"]:
                kinds["image"].append(i)
        # LLaVA-1.5 and NeXT skip the video samples: time them on the image samples only, by position of the same
        # rows in their own (shorter) row lists.
        image_rows = {
            family: [d.rows.index(family_sets["video_llava"].rows[i]) for i in kinds["image"]]
            for family, d in family_sets.items()
        }
        ms = {family: {"image": float("inf"), "video": float("inf")} for family in family_sets}
        for _ in range(args.repeats):
            for family, dataset in family_sets.items():
                ms[family]["image"] = min(ms[family]["image"], per_sample_ms(dataset, image_rows[family]))
                if dataset.placeholders.video_tokens is not None:
                    ms[family]["video"] = min(ms[family]["video"], per_sample_ms(dataset, kinds["video"]))

    print(
        f"demo set: {args.n} samples (~95% with a 224 px PNG), 336 px CLIP processor, "
        f"{TOKENS_PER_IMAGE} tokens/image, batch {args.batch}, 1 thread"
    )
    for aspect, rate in rates.items():
        print(f"  load+template+collate, image_aspect={aspect:<9} {rate:8.1f} samples/s")
    print(
        f"  pad / processor ratio:                         {rates['pad'] / rates['processor']:8.2f}"
        "  (demo images are square: padding adds no pixels here)"
    )
    print(
        f"  templating + tokenization alone:              {text_rate:8.1f} samples/s "
        f"({100 * rates['pad'] / text_rate:.0f}% of the pad time is text)"
    )
    print(
        f"load_samples, {args.load_rows} LLaVA-shaped rows:            {load_rate:8.0f} rows/s "
        f"(665,298 rows: ~{665_298 / load_rate:.0f} s, once)"
    )
    print(
        f"per family ({len(kinds['image'])} image and {len(kinds['video'])} {VIDEO_FRAMES}-frame video samples of "
        "the same demo set, pad, one example at a time, best of interleaved repeats):"
    )
    print(f"  {'family':<16} {'input px':>8} {'ms/image sample':>16} {'vs LLaVA-1.5':>13} {'ms/video sample':>16}")
    for family, size in FAMILY_GEOMETRY.items():
        video = f"{ms[family]['video']:16.1f}" if ms[family]["video"] != float("inf") else f"{'-':>16}"
        print(
            f"  {family:<16} {size:>8} {ms[family]['image']:16.1f} "
            f"{ms[family]['image'] / ms['llava']['image']:13.2f} {video}"
        )


if __name__ == "__main__":
    main()
