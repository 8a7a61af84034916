"""The ``data`` section of a recipe and the enumerations and defaults the data path owns.

Everything that names a template, an image aspect, a bad-sample policy or a frame count (the recipe loader, the
``data`` and ``generate`` command lines, the dataset) reads it from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from visionzip_tune.docfields import documented

TEMPLATES = ("vicuna_v1", "chat_template")
IMAGE_ASPECTS = ("pad", "processor")
BAD_SAMPLE_POLICIES = ("error", "skip")
DEFAULT_TEMPLATE = "vicuna_v1"
DEFAULT_IMAGE_ASPECT = "pad"
DEFAULT_VIDEO_FRAMES = 8  # Video-LLaVA's frames per video
DEFAULT_VIDEO_FPS = 24.0  # frame files carry no rate; transformers' video processors assume 24 fps without one

Template = Literal[TEMPLATES]
ImageAspect = Literal[IMAGE_ASPECTS]
BadSamplePolicy = Literal[BAD_SAMPLE_POLICIES]


@dataclass
class DataConfig:
    path: str = documented(
        "data/llava_v1_5_mix665k_10pct.json", "training data: LLaVA JSON array or JSONL", resume_safe=True
    )
    image_folder: str | None = documented(
        "data/images", "folder the samples' 'image' paths are relative to", resume_safe=True
    )
    eval_path: str | None = documented(
        None,
        "held-out LLaVA JSON whose samples carry 'choices'; accuracy before, during and after training",
        resume_safe=True,
    )
    eval_image_folder: str | None = documented(
        None, "image folder for eval_path; null = image_folder", resume_safe=True
    )
    video_folder: str | None = documented(
        None, "folder the samples' 'video' paths are relative to; null = image_folder", resume_safe=True
    )
    video_frames: int = documented(DEFAULT_VIDEO_FRAMES, "frames sampled uniformly from each video", ge=1)
    template: Template = documented(
        DEFAULT_TEMPLATE, "conversation template: LLaVA-1.5's v1 prompt, or the tokenizer's chat template"
    )
    image_aspect: ImageAspect = documented(
        DEFAULT_IMAGE_ASPECT,
        "'pad': LLaVA's expand-to-square with the mean colour; 'processor': the image processor alone",
    )
    max_length: int = documented(2048, "token limit per sample, image tokens included (longer text is cut)", gt=0)
    on_bad_sample: BadSamplePolicy = documented(
        "error", "a sample that cannot be used stops the run ('error') or is logged to skipped.jsonl ('skip')"
    )
    num_workers: int = documented(4, "DataLoader worker processes per rank", ge=0, resume_safe=True)
    group_by_modality: bool = documented(True, "LLaVA's group_by_modality_length batching (image / text-only)")
    build_demo_if_missing: bool = documented(
        False,
        "demo only: write the synthetic demo dataset into path's folder when path does not exist",
        resume_safe=True,
    )
    demo_samples: int = documented(400, "number of samples the demo builder writes", ge=1, resume_safe=True)
    demo_seed: int = documented(0, "seed of the demo builder", resume_safe=True)
    demo_videos: int = documented(
        0, "of demo_samples, how many are video samples (families with a video input)", ge=0, resume_safe=True
    )
