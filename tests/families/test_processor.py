"""processing.py: the processor's <image> expansion follows one count function, and removing it restores stock."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import visionzip_tune as vzt
from visionzip_tune.families import processor_counts, tokens_per_image
from visionzip_tune.families.processor import patch_processor, unpatch_processor

PROMPT = "USER: <image>\nHow many shapes are there? ASSISTANT:"


def _count(processor) -> int:
    image = Image.fromarray(np.full((200, 260, 3), 128, dtype=np.uint8))
    batch = processor(images=[image], text=[PROMPT], return_tensors="pt")
    return int((batch["input_ids"] == processor.image_token_id).sum())


def test_patch_replace_and_unpatch(tiny_clip):
    _, processor = tiny_clip
    assert _count(processor) == 256
    patch_processor(processor, lambda inputs, index: 7)
    assert _count(processor) == 7
    patch_processor(processor, lambda inputs, index: 11)  # patching again replaces the count
    assert _count(processor) == 11
    unpatch_processor(processor)
    assert _count(processor) == 256
    unpatch_processor(processor)  # idempotent
    assert _count(processor) == 256


def test_count_receives_the_calls_inputs_and_the_image_index(tiny_clip):
    _, processor = tiny_clip
    seen = []
    patch_processor(processor, lambda inputs, index: seen.append((inputs, index)) or 3)
    sizes = {"image_sizes": [[300, 400], [20, 10]]}
    assert processor.replace_image_token(sizes, 1) == "<image>" * 3
    assert seen == [(sizes, 1)]


def test_family_counts_read_each_images_size_and_tiling():
    """families.processor_counts: an anyres image is counted from its reported size; OneVision counts the images
    of a sample holding several as one untiled crop each."""
    from visionzip_tune.demo.tiny import TinySpec, build_config, build_tokenizer

    tokenizer = build_tokenizer(media_tokens=("<image>", "<video>"))
    next_config = build_config(TinySpec(family="llava_next", image_size=28), tokenizer)
    image_count, video_count = processor_counts(next_config)
    assert video_count is None
    sizes = {"image_sizes": [[56, 28], [20, 10]]}
    assert image_count(sizes, 0) == tokens_per_image(next_config, (56, 28)) != tokens_per_image(next_config, None)
    assert image_count({"pixel_values": [None]}, 0) == tokens_per_image(next_config)
    ov_config = build_config(TinySpec(family="llava_onevision", image_size=28), tokenizer)
    image_count, video_count = processor_counts(ov_config)
    pair = {"image_sizes": [[56, 28], [56, 28], [56, 28]], "batch_num_images": [1, 2]}
    assert image_count(pair, 0) == tokens_per_image(ov_config, (56, 28))  # alone in its sample: tiled
    assert image_count(pair, 1) == image_count(pair, 2) == tokens_per_image(ov_config, None)  # two: untiled
    assert video_count({"pixel_values_videos": [np.zeros((5, 3, 28, 28))]}, 0) == 5 * 1 + 1  # stock: pooled + newline


def test_processor_follows_the_model_config(tiny_siglip):
    model, processor = tiny_siglip
    patch_processor(processor, *processor_counts(model.config))
    assert _count(processor) == 256  # no budget recorded yet: the stock count (SigLIP, 'full': no CLS to drop)
    vzt.apply_visionzip(model, 50, 14)
    assert _count(processor) == 64  # same live config: the processor cannot drift from the model
    vzt.remove_visionzip(model)
    assert _count(processor) == 256


def test_rejects_a_processor_without_image_expansion(tiny_tokenizer):
    with pytest.raises(ValueError, match="no <image> token expansion"):
        patch_processor(tiny_tokenizer, lambda inputs, index: 1)
