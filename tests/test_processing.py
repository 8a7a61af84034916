"""processing.py: the processor's <image> expansion follows one count function, and removing it restores stock."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from PIL import Image

import visionzip_tune as vzt
from visionzip_tune.models import tokens_per_image
from visionzip_tune.processing import patch_processor, unpatch_processor

PROMPT = "USER: <image>\nHow many shapes are there? ASSISTANT:"


def _count(processor) -> int:
    image = Image.fromarray(np.full((200, 260, 3), 128, dtype=np.uint8))
    batch = processor(images=[image], text=[PROMPT], return_tensors="pt")
    return int((batch["input_ids"] == processor.image_token_id).sum())


def test_patch_replace_and_unpatch(tiny_clip):
    _, processor = tiny_clip
    assert _count(processor) == 256
    patch_processor(processor, lambda size: 7)
    assert _count(processor) == 7
    patch_processor(processor, lambda size: 11)  # patching again replaces the count
    assert _count(processor) == 11
    unpatch_processor(processor)
    assert _count(processor) == 256
    unpatch_processor(processor)  # idempotent
    assert _count(processor) == 256


def test_count_receives_original_size_when_reported(tiny_clip):
    _, processor = tiny_clip
    seen = []
    patch_processor(processor, lambda size: seen.append(size) or 3)
    assert processor.replace_image_token({"image_sizes": [[300, 400], [20, 10]]}, 1) == "<image>" * 3
    assert processor.replace_image_token({"pixel_values": [None]}, 0) == "<image>" * 3
    assert seen == [(20, 10), None]


def test_processor_follows_the_model_config(tiny_siglip):
    model, processor = tiny_siglip
    patch_processor(processor, functools.partial(tokens_per_image, model.config))
    assert _count(processor) == 256  # no budget recorded yet: the stock count (SigLIP, 'full': no CLS to drop)
    vzt.apply_visionzip(model, 50, 14)
    assert _count(processor) == 64  # same live config: the processor cannot drift from the model
    vzt.remove_visionzip(model)
    assert _count(processor) == 256


def test_rejects_a_processor_without_image_expansion(tiny_tokenizer):
    with pytest.raises(ValueError, match="no <image> token expansion"):
        patch_processor(tiny_tokenizer, lambda size: 1)
