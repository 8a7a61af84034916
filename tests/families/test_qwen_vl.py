"""VisionZip on Qwen2.5-VL and Qwen3-VL, with tiny random models (visionzip_tune.tiny) at the geometry set here.

The oracle for features is :func:`reference_zip`: every image (every temporal slice of a video) run through the
tower alone, its last block's attention map computed densely, and the algorithm written with plain loops. The
oracle for positions is the model's own ``get_rope_index`` on the stock-length sequence, gathered at the kept
tokens.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

import visionzip_tune as vzt
from reference_visionzip import zip_scored
from visionzip_tune import families
from visionzip_tune.training import build
from visionzip_tune.training.config import TrainConfig, VisionZipConfig
from visionzip_tune.errors import UserError
from visionzip_tune.families.forward import forward_with_vision
from visionzip_tune.families.qwen import common as qwen_common
from visionzip_tune.families.qwen import qwen3_vl
from visionzip_tune.families.qwen.positions import token_types
from visionzip_tune.inference.stage_timer import Clock, instrumented
from visionzip_tune.demo.tiny import TinySpec, build_tiny
from visionzip_tune.inference.variants import Switcher, Setting, parse_budgets, plan

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
GEOMETRY = dict(
    image_size=112,  # max_pixels = 112^2: an image becomes at most 8 x 8 patches of 14 px = 16 merged tokens
    patch_size=14,
    vision_hidden=32,
    vision_layers=3,
    vision_heads=2,
    text_hidden=32,
    text_layers=2,
    text_heads=2,
    text_init_std=0.2,
)
# (height, width) -> patch grid: 8x8 (N = 16), 4x8 (N = 8), 6x6 (N = 9)
SIZES = [(112, 112), (56, 112), (84, 84)]
FRAMES = 4  # a video of 4 frames of 56 x 84 px: 2 temporal slices of 4 x 6 patches (N = 6 each)
FRAME_TIMES = [0.0, 0.5, 1.0, 1.5]


def tiny(family: str, seed: int = 0):
    """``(model, tokenizer, image processor)`` of a tiny random ``family`` model (Qwen2.5-VL: windows of 2 x 2
    merged tokens in blocks 0-1, full attention in block 2; Qwen3-VL: DeepStack after blocks 0 and 1)."""
    return build_tiny(TinySpec(family=family, seed=seed, **GEOMETRY))


def noise(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def images(image_processor, sizes=SIZES):
    return image_processor(images=[noise(h, w, k) for k, (h, w) in enumerate(sizes)], return_tensors="pt")


def video(image_processor):
    """Video inputs as the data path makes them: ``(inputs, grid)``."""
    from visionzip_tune.data.images import MediaTransform

    frames = [noise(56, 84, 10 + k) for k in range(FRAMES)]
    return MediaTransform(image_processor, "processor", FRAMES).video_inputs(frames)


# ----------------------------------------------------------------------------------------------------------------
# The oracle


def _tower_run(visual, pixels, grid):
    """One stock tower run of one image / video: the last block's attention input and rotary embedding, every
    merger's input and output (tower order), and the stock raster-order outputs."""
    attention = visual.blocks[-1].attn
    seen = {}
    watched = {"attention": attention, **{f"m{i}": m for i, m in enumerate(qwen_common.mergers(visual))}}
    hooks = [
        module.register_forward_hook(
            lambda mod, args, kwargs, out, name=name: seen.__setitem__(name, (args, kwargs, out)), with_kwargs=True
        )
        for name, module in watched.items()
    ]
    try:
        with torch.no_grad():
            stock = visual(pixels, grid_thw=grid)
    finally:
        for hook in hooks:
            hook.remove()
    return seen, stock


class Unit(NamedTuple):
    tokens: torch.Tensor  # (K, F) in position order; F = the main merger's width x (1 + DeepStack mergers)
    kept: list[int]  # ascending merged-token indices (dominant and contextual targets)
    dominant: list[int]
    size: int  # N, the unit's merged tokens


def reference_zip(model, pixel_values, grid_thw, merge_space: str = "post") -> list[Unit]:
    """Per unit (an image, or a temporal slice of a video, each tower-run alone), straightforwardly.

    Scores: the dense attention map of the last block from its q/k (rotary applied by the model's own function),
    averaged over heads and queries, then over each merge group's 4 patches; keys likewise. Raster order: found by
    matching the tower's merger rows (its own order) with its stock output rows (raster)."""
    inner, budget = model.model, model.config.visionzip
    visual = inner.visual
    rotary = sys.modules[type(visual.blocks[-1].attn).__module__].apply_rotary_pos_emb_vision
    units, start = [], 0
    for grid in grid_thw.tolist():
        patches = grid[0] * grid[1] * grid[2]
        seen, stock = _tower_run(visual, pixel_values[start : start + patches], torch.tensor([grid]))
        start += patches
        (x,), kwargs, _ = seen["attention"]
        heads = visual.blocks[-1].attn.num_heads
        with torch.no_grad():
            qkv = visual.blocks[-1].attn.qkv(x).reshape(patches, 3, heads, -1)
            q, k = rotary(qkv[:, 0], qkv[:, 1], *kwargs["position_embeddings"])
        merger_in = [seen[f"m{i}"][0][0] for i in range(len(qwen_common.mergers(visual)))]
        merger_out = [seen[f"m{i}"][2] for i in range(len(merger_in))]
        slice_patches = grid[1] * grid[2]
        for t in range(grid[0]):
            rows = slice(t * slice_patches, (t + 1) * slice_patches)  # a slice is contiguous in tower order
            groups = slice(t * slice_patches // 4, (t + 1) * slice_patches // 4)
            qs, ks = q[rows].transpose(0, 1).float(), k[rows].transpose(0, 1).float()  # (H, n, d)
            attention = torch.softmax(qs @ ks.transpose(1, 2) / qs.shape[-1] ** 0.5, dim=-1)
            received = attention.mean(dim=0).mean(dim=0)  # (n,)
            scores = received.view(-1, 4).mean(dim=1)
            metric = k[rows].mean(dim=1).view(-1, 4, k.shape[-1]).mean(dim=1)
            # raster position of each tower-order group: where its merger row sits in the stock output
            tower_rows = merger_out[0][groups]
            raster_rows = stock.pooler_output[groups]
            to_raster = [int((raster_rows == row).all(dim=1).nonzero()) for row in tower_rows]
            order = torch.tensor(to_raster).argsort()  # tower index of raster position r
            if merge_space == "post":
                features = torch.cat([out[groups] for out in merger_out], dim=-1)[order]
            else:
                features = torch.cat([inp[rows].reshape(-1, 4 * inp.shape[-1]) for inp in merger_in], dim=-1)[order]
            n = len(order)
            dominant, contextual = (
                max(1, int(budget["dominant_ratio"] * n)),
                max(1, int(budget["contextual_ratio"] * n)),
            )
            tokens, kept, targets = zip_scored(
                features, scores[order].tolist(), metric[order], dominant, contextual, has_cls=False
            )
            slots = sorted(range(len(kept) + len(targets)), key=lambda j: (kept + targets)[j])
            tokens = tokens[slots]
            if merge_space == "pre":
                with torch.no_grad():
                    width = merger_in[0].shape[-1]
                    tokens = torch.cat(
                        [
                            merger(part.reshape(-1, width))
                            for merger, part in zip(qwen_common.mergers(visual), tokens.split(4 * width, dim=-1))
                        ],
                        dim=-1,
                    )
            units.append(Unit(tokens, sorted(kept + targets), kept, n))
    return units


# ----------------------------------------------------------------------------------------------------------------
# Features


@pytest.mark.parametrize("merge_space", ["post", "pre"])
@pytest.mark.parametrize("family", FAMILIES)
def test_features_equal_a_per_image_reference(family, merge_space):
    model, _, image_processor = tiny(family)
    vzt.apply_visionzip(model, dominant_ratio=0.3, contextual_ratio=0.15, merge_space=merge_space)
    packed = images(image_processor)
    with torch.no_grad():
        out = model.model.get_image_features(packed["pixel_values"], packed["image_grid_thw"])
    expected = reference_zip(model, packed["pixel_values"], packed["image_grid_thw"], merge_space)
    widths = 1 + len(getattr(model.model.visual, "deepstack_merger_list", []))
    assert [len(t) for t in out.pooler_output] == [len(unit.kept) for unit in expected] == [4 + 2, 2 + 1, 2 + 1]
    for index, unit in enumerate(expected):
        columns = unit.tokens.chunk(widths, dim=-1)
        torch.testing.assert_close(out.pooler_output[index], columns[0], rtol=0, atol=1e-5)
        for layer in range(1, widths):  # DeepStack: the same rows, order and merge as the main features
            torch.testing.assert_close(out.deepstack_features[layer - 1][index], columns[layer], rtol=0, atol=1e-5)
        assert model.model._visionzip_encoded["image"].kept[index].tolist() == unit.kept
    if family == "qwen3_vl":
        assert widths == 3 and len(out.deepstack_features) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_video_slices_are_zipped_like_images_and_dominant_rows_are_stock_rows(family):
    model, _, image_processor = tiny(family)
    inputs, grid = video(image_processor)
    with torch.no_grad():
        stock = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    vzt.apply_visionzip(model)  # 0.45 + 0.05: N = 6 -> 2 + 1 per slice
    with torch.no_grad():
        out = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    expected = reference_zip(model, inputs["pixel_values_videos"], inputs["video_grid_thw"])
    assert grid == (2, 4, 6) and len(out.pooler_output[0]) == 2 * 3 == families.tokens_per_video(model.config, grid)
    width = out.pooler_output[0].shape[-1]
    torch.testing.assert_close(out.pooler_output[0], torch.cat([unit.tokens[:, :width] for unit in expected]))
    for t, unit in enumerate(expected):  # each dominant token is the stock merger row, bit for bit
        for index in unit.dominant:
            slot = t * 3 + unit.kept.index(index)
            assert torch.equal(out.pooler_output[0][slot], stock.pooler_output[0][t * 6 + index])


def test_batch_of_two_sizes_equals_each_alone():
    for family in FAMILIES:
        model, _, image_processor = tiny(family)
        vzt.apply_visionzip(model)
        together = images(image_processor, SIZES[:2])
        with torch.no_grad():
            both = model.model.get_image_features(together["pixel_values"], together["image_grid_thw"])
            for index, size in enumerate(SIZES[:2]):
                alone = image_processor(images=[noise(*size, index)], return_tensors="pt")
                one = model.model.get_image_features(alone["pixel_values"], alone["image_grid_thw"])
                torch.testing.assert_close(both.pooler_output[index], one.pooler_output[0], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Positions


class Row(NamedTuple):
    zipped: list[int]  # token ids with K placeholders per unit
    stock: list[int]  # the same with N per unit
    columns: list[int]  # the stock column of every zipped token


def _row(parts) -> Row:
    """A row from parts: text (a list of ids) or a medium (a Row of its own, columns relative to its start)."""
    zipped, stock, columns = [], [], []
    for part in parts:
        medium = part if isinstance(part, Row) else Row(part, part, list(range(len(part))))
        columns += [len(stock) + column for column in medium.columns]
        zipped, stock = zipped + medium.zipped, stock + medium.stock
    return Row(zipped, stock, columns)


def _run(token: int, unit: Unit) -> Row:
    """One unit's placeholders: its kept tokens zipped, all N stock."""
    return Row([token] * len(unit.kept), [token] * unit.size, list(unit.kept))


def _rows(model, tokenizer, image_units: list[Unit], video_units: list[Unit]) -> list[Row]:
    """Row 0: text, image 0, text, image 1, text (two images in one sample); row 1: text, the video, text, image 2,
    text; row 2: text only. Media sit between vision start / end tokens; the video's slices form one run
    (Qwen2.5-VL) or, Qwen3-VL, a run per frame after its timestamp, as the model's processor writes them."""
    config = model.config
    start, end = [config.vision_start_token_id], [config.vision_end_token_id]
    text = lambda words: tokenizer.encode(words, add_special_tokens=False)  # noqa: E731
    image = [_row([start, _run(config.image_token_id, unit), end]) for unit in image_units]
    if model.config.model_type == "qwen3_vl":
        stamps = qwen3_vl.frame_pair_times(FRAME_TIMES, 2)
        frames = [
            [text(f"<{t:.1f} seconds>") + start, _run(config.video_token_id, u), end]
            for t, u in zip(stamps, video_units)
        ]
        clip = _row([start, *[piece for frame in frames for piece in frame], end])
    else:
        clip = _row([start, *[_run(config.video_token_id, unit) for unit in video_units], end])
    return [
        _row([text("look"), image[0], text("and"), image[1], text("what?")]),
        _row([text("watch"), clip, text("then"), image[2], text("ok")]),
        _row([text("no media at all here")]),
    ]


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = torch.tensor(row)
        mask[b, width - len(row) :] = 1
    return ids, mask


def _media(family):
    """A tiny zipped model, three images and a video, and the oracle's units of each."""
    model, tokenizer, image_processor = tiny(family)
    vzt.apply_visionzip(model, dominant_ratio=0.3, contextual_ratio=0.15)
    packed = images(image_processor)
    clip, _ = video(image_processor)
    timing = families.video_timing(model.config, tuple(clip["video_grid_thw"][0].tolist()), FRAME_TIMES)
    image_units = reference_zip(model, packed["pixel_values"], packed["image_grid_thw"])
    video_units = reference_zip(model, clip["pixel_values_videos"], clip["video_grid_thw"])
    return model, tokenizer, {**packed, **clip, **timing}, _rows(model, tokenizer, image_units, video_units)


@pytest.mark.parametrize("family", FAMILIES)
def test_positions_are_the_stock_positions_of_the_kept_tokens(family):
    model, tokenizer, media, rows = _media(family)
    inner, pad = model.model, tokenizer.pad_token_id
    zipped, zipped_mask = _left_pad([row.zipped for row in rows], pad)
    stock, stock_mask = _left_pad([row.stock for row in rows], pad)
    grids = {"image_grid_thw": media["image_grid_thw"], "video_grid_thw": media["video_grid_thw"]}
    timing = {k: media[k] for k in ("second_per_grid_ts",) if k in media}
    # The oracle: the model's own method on the stock-length rows, independently of anything zipped.
    expected, _ = type(inner).get_rope_index(
        inner, stock, token_types(model.config, stock), attention_mask=stock_mask, **grids, **timing
    )
    with torch.no_grad():
        inner.get_image_features(media["pixel_values"], media["image_grid_thw"])
        inner.get_video_features(media["pixel_values_videos"], media["video_grid_thw"])
    positions, deltas = inner.get_rope_index(
        zipped, token_types(model.config, zipped), attention_mask=zipped_mask, **grids, **timing
    )
    for b, row in enumerate(rows):
        stock_columns = stock.shape[1] - len(row.stock) + torch.tensor(row.columns)
        kept = positions[:, b, zipped.shape[1] - len(row.zipped) :]
        assert torch.equal(kept, expected[:, b, stock_columns]), f"row {b}"
        assert (positions[:, b, : zipped.shape[1] - len(row.zipped)] == 0).all()  # padding, as the stock method
        assert deltas[b, 0] == kept.max() + 1 - len(row.zipped)
    if family == "qwen2_5_vl":  # the video's temporal positions follow its timing (2 frames 0.5 s apart per patch)
        assert media["second_per_grid_ts"].tolist() == [1.0]


@pytest.mark.parametrize("family", FAMILIES)
def test_positions_need_the_encoding_of_the_same_grid(family):
    model, tokenizer, media, rows = _media(family)
    ids, mask = _left_pad([row.zipped for row in rows], tokenizer.pad_token_id)
    types = token_types(model.config, ids)
    with torch.no_grad():
        model.model.get_image_features(media["pixel_values"], media["image_grid_thw"])
    with pytest.raises(ValueError, match="did not encode"):  # an equal grid, but not the tensor encoded
        model.model.get_rope_index(ids, types, image_grid_thw=media["image_grid_thw"].clone(), attention_mask=mask)
    # Given the pixels (as generate() gives them), get_rope_index encodes them itself, and the next features call
    # on the same tensors takes that encoding instead of running the tower again.
    grids = {"image_grid_thw": media["image_grid_thw"].clone(), "video_grid_thw": media["video_grid_thw"].clone()}
    pixels = {k: media[k] for k in ("pixel_values", "pixel_values_videos")}
    positions, _ = model.model.get_rope_index(ids, types, attention_mask=mask, **grids, **pixels)
    runs = []
    handle = model.model.visual.register_forward_hook(lambda *args: runs.append(1))
    try:
        with torch.no_grad():
            model.model.get_image_features(pixels["pixel_values"], grids["image_grid_thw"])
            model.model.get_image_features(pixels["pixel_values"], grids["image_grid_thw"])
    finally:
        handle.remove()
    assert len(runs) == 1  # handed over once, then encoded afresh


# ----------------------------------------------------------------------------------------------------------------
# generate


def _greedy_reforward(model, ids, mask, media, steps: int, suppress: list[int]) -> torch.Tensor:
    """Greedy tokens by re-running the whole sequence each step (no cache; positions recomputed every time)."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(
                input_ids=ids, attention_mask=mask, mm_token_type_ids=token_types(model.config, ids), **media
            ).logits[:, -1]
        logits[:, suppress] = -float("inf")
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_equals_greedy_reforwarding_with_cache_and_beams(family):
    model, tokenizer, media, rows = _media(family)
    ids, mask = _left_pad([row.zipped for row in rows], tokenizer.pad_token_id)
    suppress = [model.config.image_token_id, model.config.video_token_id]  # a random LM may emit placeholders
    runs = []
    handle = model.model.visual.register_forward_hook(lambda *args: runs.append(1))
    try:
        with torch.no_grad():
            generated = model.generate(
                input_ids=ids,
                attention_mask=mask,
                mm_token_type_ids=token_types(model.config, ids),
                **media,
                max_new_tokens=4,
                do_sample=False,
                suppress_tokens=suppress,
                pad_token_id=tokenizer.pad_token_id,
            )
    finally:
        handle.remove()
    assert len(runs) == 2  # images and video encoded once each, although positions are computed first
    assert torch.equal(generated, _greedy_reforward(model, ids, mask, media, 4, suppress))
    with torch.no_grad():
        beams = model.generate(
            input_ids=ids,
            attention_mask=mask,
            mm_token_type_ids=token_types(model.config, ids),
            **media,
            max_new_tokens=3,
            num_beams=2,
            do_sample=False,
            suppress_tokens=suppress,
            pad_token_id=tokenizer.pad_token_id,
        )
    assert beams.shape == (3, ids.shape[1] + 3) and torch.equal(beams[:, : ids.shape[1]], ids)


def test_stage_timer_counts_the_encoding_at_positions_time_as_vision():
    """generate() computes positions, which encode the media, before the features calls: bench-infer's vision
    stage must hold every tower and merger span, or its VisionZip time (vision - tower - projector) is wrong."""
    model, tokenizer, media, rows = _media("qwen2_5_vl")
    ids, mask = _left_pad([row.zipped for row in rows], tokenizer.pad_token_id)
    with instrumented(model, Clock(torch.device("cpu"))) as marks, torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            mm_token_type_ids=token_types(model.config, ids),
            **media,
            max_new_tokens=2,
            do_sample=False,
            suppress_tokens=[model.config.image_token_id, model.config.video_token_id],
            pad_token_id=tokenizer.pad_token_id,
        )
    assert len(marks.spans["tower"]) == len(marks.spans["projector"]) == 2  # the images, then the video

    def inside_vision(span) -> bool:
        return any(start <= span[0] and span[1] <= end for start, end in marks.spans["vision"])

    assert all(inside_vision(span) for span in marks.spans["tower"] + marks.spans["projector"])
    assert "get_rope_index" in model.model.__dict__  # VisionZip's positions again, unwrapped
    assert not hasattr(model.model.__dict__["get_rope_index"], "__wrapped__")


# ----------------------------------------------------------------------------------------------------------------
# Training: what trains, the data path


@pytest.mark.parametrize(
    ("family", "merge_space", "subset"),
    [
        ("qwen2_5_vl", "post", "all"),
        ("qwen2_5_vl", "pre", "all"),
        ("qwen3_vl", "post", "all"),
        ("qwen3_vl", "pre", "all"),
        ("qwen3_vl", "post", "merger"),
    ],
)
def test_gradients_reach_only_the_trained_mergers(family, merge_space, subset):
    model, tokenizer, media, rows = _media(family)
    vzt.apply_visionzip(model, merge_space=merge_space)
    model, trainable = build.prepare_trainable(model, TrainConfig(mode="projector", projector_modules=subset))
    prefixes = {
        "all": ("model.visual.merger.", "model.visual.deepstack_merger_list."),
        "merger": ("model.visual.merger.",),
    }
    names = {name for name, _ in trainable}
    assert names and all(name.startswith(prefixes[subset]) for name in names)
    assert names == {f"model.{name}" for name in families.projector_parameters(model, subset)}
    ids, mask = _left_pad([row.zipped for row in rows], tokenizer.pad_token_id)
    labels = ids.masked_fill(mask == 0, -100)
    model.train()
    forward_with_vision(model, {"input_ids": ids, "attention_mask": mask, "labels": labels, **media}).loss.backward()
    reached = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == names


def _write_media(folder):
    for k, (h, w) in enumerate(SIZES):
        noise(h, w, k).save(folder / f"image{k}.png")
    for k in range(6):
        noise(56, 84, 20 + k).save(folder / f"frame{k}.png")


SAMPLES = [
    {
        "id": "one",
        "image": "image0.png",
        "conversations": [{"from": "human", "value": "<image>\\nWhat?"}, {"from": "gpt", "value": "noise"}],
    },
    {
        "id": "two",
        "image": ["image1.png", "image2.png"],
        "conversations": [{"from": "human", "value": "<image>\\n<image>\\nSame?"}, {"from": "gpt", "value": "no"}],
    },
    {
        "id": "clip",
        "video": [f"frame{k}.png" for k in range(6)],
        "conversations": [{"from": "human", "value": "<video>\\nWhat moves?"}, {"from": "gpt", "value": "dots"}],
    },
    {
        "id": "text",
        "conversations": [{"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris"}],
    },
]


@pytest.mark.parametrize("family", FAMILIES)
def test_data_path_batches_images_of_two_sizes_a_two_image_sample_a_video_and_text(family, tmp_path):
    import json

    from visionzip_tune.data import Collator, DataConfig, SupervisedDataset, load_samples
    from visionzip_tune.data.processing import Processing

    model, tokenizer, image_processor = tiny(family)
    vzt.apply_visionzip(model)
    _write_media(tmp_path)
    (tmp_path / "data.json").write_text(json.dumps(SAMPLES))
    dataset = SupervisedDataset(
        load_samples(tmp_path / "data.json", cache_dir=tmp_path / "cache"),
        DataConfig(image_folder=str(tmp_path), template="chat_template", image_aspect="processor", video_frames=FRAMES),
        Processing(tokenizer, image_processor, None),
        build.placeholders(model.config),
    )
    items = [dataset[k] for k in range(len(dataset))]
    config = model.config
    counts = [int((item["input_ids"] == config.image_token_id).sum()) for item in items]
    grids = [tuple(g) for item in items[:2] for g in item["vision"]["image_grid_thw"].tolist()]
    assert counts[:2] == [
        families.tokens_per_image(config, grids[0]),
        sum(families.tokens_per_image(config, g) for g in grids[1:]),
    ]
    video_grid = tuple(items[2]["vision"]["video_grid_thw"][0].tolist())
    assert int((items[2]["input_ids"] == config.video_token_id).sum()) == families.tokens_per_video(config, video_grid)
    if family == "qwen3_vl":  # a run per frame, after its timestamp (frame files: 24 fps)
        assert (
            "<0.0 seconds>" in tokenizer.decode(items[2]["input_ids"])
            and "second_per_grid_ts" not in items[2]["vision"]
        )
    else:
        assert items[2]["vision"]["second_per_grid_ts"].tolist() == [pytest.approx(2 * 5 / 3 / 24)]
    batch = Collator(tokenizer.pad_token_id)(items)
    batch.pop("ids")
    with torch.no_grad():
        loss = forward_with_vision(model, batch).loss
        # The model's own forward on the same batch (pixels in, features and positions computed inside) agrees.
        stock_path = model(**batch, mm_token_type_ids=token_types(config, batch["input_ids"])).loss
    assert torch.isfinite(loss) and torch.allclose(loss, stock_path, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip_records_the_budget_and_refuses_other_pixel_bounds(family, tmp_path):
    import json

    from safetensors.torch import load_file

    from visionzip_tune.export import export_projector, load_projector, weights_fingerprint
    from visionzip_tune.demo.tiny import save_tiny

    base = save_tiny(tmp_path / "base", TinySpec(family=family, **GEOMETRY))
    from transformers import AutoModelForImageTextToText

    from visionzip_tune.data.processing import load_processing

    processing = load_processing(base)
    image_processor = processing.image_processor
    model = AutoModelForImageTextToText.from_pretrained(base).eval()
    fingerprint = weights_fingerprint(model)
    vzt.apply_visionzip(model, dominant_ratio=0.3, contextual_ratio=0.1, merge_space="pre")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in families.projector_parameters(model).values():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    assert weights_fingerprint(model) == fingerprint  # the mergers sit in the tower, but are not base weights
    out = export_projector(model, tmp_path / "export", metadata={"base_model": str(base)}, processing=processing)
    record = json.loads((out / "visionzip.json").read_text())
    assert {k: record[k] for k in ("family", "dominant_ratio", "contextual_ratio", "merge_space", "score_layer")} == {
        "family": family,
        "dominant_ratio": 0.3,
        "contextual_ratio": 0.1,
        "merge_space": "pre",
        "score_layer": GEOMETRY["vision_layers"] - 1,
    }
    assert (record["min_pixels"], record["max_pixels"]) == (56 * 56, 112 * 112)
    assert not (out / "mm_projector.bin").exists()
    tensors = load_file(out / "projector.safetensors")
    prefixes = ("visual.merger.",) + (("visual.deepstack_merger_list.",) if family == "qwen3_vl" else ())
    assert {name.split(".")[1] for name in tensors} == {p.split(".")[1] for p in prefixes}
    assert tensors.keys() == families.projector_parameters(model).keys()

    fresh = AutoModelForImageTextToText.from_pretrained(base).eval()
    load_projector(fresh, out, image_processor=image_processor)
    assert fresh.config.visionzip == model.config.visionzip
    for name, param in families.projector_parameters(fresh).items():
        assert torch.equal(param, tensors[name])
    packed = images(image_processor)
    with torch.no_grad():
        ours = fresh.model.get_image_features(packed["pixel_values"], packed["image_grid_thw"]).pooler_output
        theirs = model.model.get_image_features(packed["pixel_values"], packed["image_grid_thw"]).pooler_output
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))

    other = type(image_processor)(**{**image_processor.to_dict(), "max_pixels": 84 * 84})
    with pytest.raises(UserError, match=r"max_pixels is 7056 in the image processor given but 12544 in the export"):
        load_projector(AutoModelForImageTextToText.from_pretrained(base), out, image_processor=other)

    # eval / bench-infer compare stock, the recorded ratios training-free, and the tuned export on one model
    variants = plan(None, record)
    assert [v.label for v in variants] == ["stock", "VisionZip 0.3+0.1", "VisionZip‡ 0.3+0.1 (tuned)"]
    shared = AutoModelForImageTextToText.from_pretrained(base).eval()
    switch = Switcher(shared, str(out), record)
    switch.to(variants[2])
    assert shared.config.visionzip == model.config.visionzip
    switch.to(Setting("0.45+0.05", parse_budgets("0.45+0.05")[0]))
    assert shared.config.visionzip == {
        "dominant_ratio": 0.45,
        "contextual_ratio": 0.05,
        "merge_space": "post",  # the default, not the tuned run's "pre"
        "score_layer": GEOMETRY["vision_layers"] - 1,
    }
    switch.to(variants[1])
    assert shared.config.visionzip == model.config.visionzip
    assert all(
        torch.equal(p, stock) for p, stock in zip(families.projector_parameters(shared).values(), switch.stock.values())
    )


# ----------------------------------------------------------------------------------------------------------------
# Budgets and errors


@pytest.mark.parametrize("family", FAMILIES)
def test_budget_counts_follow_the_grid_and_bad_budgets_are_refused(family):
    model, _, _ = tiny(family)
    config = model.config
    assert families.tokens_per_image(config, (1, 8, 8)) == 16  # stock: every merged token
    vzt.apply_visionzip(model)
    assert config.visionzip == {
        "dominant_ratio": 0.45,
        "contextual_ratio": 0.05,
        "merge_space": "post",
        "score_layer": GEOMETRY["vision_layers"] - 1,
    }
    assert families.tokens_per_image(config, (1, 8, 8)) == 7 + 1  # floor(0.45 * 16), max(1, floor(0.8))
    assert families.tokens_per_image(config, (1, 32, 32)) == 115 + 12  # N = 256
    assert families.tokens_per_video(config, (3, 4, 6)) == 3 * (2 + 1)
    assert families.tokens_per_unit(config) is None  # K follows each unit's size
    with pytest.raises(ValueError, match="takes a VisionZip budget as ratios .* not contextual, dominant"):
        vzt.apply_visionzip(model, 54, 10)
    with pytest.raises(ValueError, match="dominant_ratio=0.9, contextual_ratio=0.2: need .* <= 1"):
        vzt.apply_visionzip(model, dominant_ratio=0.9, contextual_ratio=0.2)
    with pytest.raises(ValueError, match="merge_space='mid' is not one of post, pre"):
        vzt.apply_visionzip(model, merge_space="mid")
    assert config.visionzip["dominant_ratio"] == 0.45  # a refused budget leaves the applied one
    # One merged token per image: D + C = 2 > N = 1.
    vision = config.vision_config
    lone = torch.zeros(4, 3 * 2 * vision.patch_size**2)
    with pytest.raises(ValueError, match="dominant=1 \\+ contextual=1 tokens for a unit of N=1 merged tokens"):
        model.model.get_image_features(lone, torch.tensor([[1, 2, 2]]))


def test_recipes_and_trainable_sets_are_checked_per_family():
    model, _, _ = tiny("qwen2_5_vl")
    with pytest.raises(UserError, match="visionzip.dominant_ratio is not set: Qwen2_5_VLForConditionalGeneration"):
        build.apply_recipe_visionzip(model, VisionZipConfig(dominant=108, contextual=20))
    build.apply_recipe_visionzip(model, VisionZipConfig(dominant_ratio=0.65, contextual_ratio=0.05))
    assert model.config.visionzip["dominant_ratio"] == 0.65 and model.config.visionzip["merge_space"] == "post"
    with pytest.raises(UserError, match=r"dominant_ratio=0.9, visionzip.contextual_ratio=0.3: invalid"):
        build.apply_recipe_visionzip(model, VisionZipConfig(dominant_ratio=0.9, contextual_ratio=0.3))
    with pytest.raises(UserError, match="train.projector_modules='merger': .* choose one of all$"):
        build.prepare_trainable(model, TrainConfig(projector_modules="merger"))
    qwen3, _, _ = tiny("qwen3_vl")
    with pytest.raises(UserError, match="'mlp_only': .* no projector subset 'mlp_only'; choose one of all, merger"):
        build.prepare_trainable(qwen3, TrainConfig(projector_modules="mlp_only"))


# ----------------------------------------------------------------------------------------------------------------
# Processor


def _processor(family, image_processor, tokenizer):
    """The model's multimodal processor. Its class insists on a video processor, which needs torchvision (not
    installed here), so the instance is made without its constructor; images need nothing else."""
    from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor

    processor = object.__new__(Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen3VLProcessor)
    processor.image_processor, processor.tokenizer, processor.chat_template = image_processor, tokenizer, None
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    processor.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    processor.video_token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    processor.vision_start_token, processor.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    processor.video_processor = SimpleNamespace(merge_size=2, temporal_patch_size=2)
    return processor


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_counts_follow_the_model_and_remove_restores_stock(family):
    model, tokenizer, image_processor = tiny(family)
    processor = _processor(family, image_processor, tokenizer)
    prompt = ["<|vision_start|><|image_pad|><|vision_end|>one <|vision_start|><|image_pad|><|vision_end|>two"]
    pictures = [noise(h, w, k) for k, (h, w) in enumerate(SIZES[:2])]
    stock_batch = processor(images=pictures, text=prompt, return_tensors="pt")
    with torch.no_grad():
        stock_logits = model(**stock_batch).logits
    vzt.apply_visionzip(model, processor=processor)
    batch = processor(images=pictures, text=prompt, return_tensors="pt")
    grids = [tuple(g) for g in batch["image_grid_thw"].tolist()]
    assert (
        int((batch["input_ids"] == model.config.image_token_id).sum())
        == 8 + 4
        == sum(families.tokens_per_image(model.config, g) for g in grids)
    )
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()  # the processor's own mm_token_type_ids: positions work
    vzt.remove_visionzip(model, processor)
    assert "_visionzip_encoded" not in model.model.__dict__ and not hasattr(model.config, "visionzip")
    again = processor(images=pictures, text=prompt, return_tensors="pt")
    assert torch.equal(again["input_ids"], stock_batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**again).logits, stock_logits)


def test_processor_video_text_matches_the_data_path():
    model, tokenizer, image_processor = tiny("qwen2_5_vl")
    processor = _processor("qwen2_5_vl", image_processor, tokenizer)
    vzt.apply_visionzip(model, processor=processor)
    text = processor.replace_video_token({"video_grid_thw": torch.tensor([[2, 4, 6]])}, 0)
    assert text == "<|video_pad|>" * 2 * 3 and families.video_layout(model.config, (2, 4, 6), FRAME_TIMES) == [6]
    model, tokenizer, image_processor = tiny("qwen3_vl")
    processor = _processor("qwen3_vl", image_processor, tokenizer)
    vzt.apply_visionzip(model, processor=processor)
    grid = (2, 4, 6)
    metadata = SimpleNamespace(fps=2.0, frames_indices=[0, 1, 2, 3])  # frames at 0, 0.5, 1, 1.5 s
    text = processor.replace_video_token({"video_grid_thw": torch.tensor([grid]), "video_metadata": [metadata]}, 0)
    layout = families.video_layout(model.config, grid, FRAME_TIMES)
    assert layout == [
        "<0.2 seconds><|vision_start|>",
        3,
        "<|vision_end|>",
        "<1.2 seconds><|vision_start|>",
        3,
        "<|vision_end|>",
    ]
    rendered = "".join(piece if isinstance(piece, str) else "<|video_pad|>" * piece for piece in layout)
    assert text == rendered


# ----------------------------------------------------------------------------------------------------------------
# The generate command


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_command_image_video_and_multi_turn(family, tmp_path, capsys, monkeypatch):
    """The CLI on an export builds the prompt and vision inputs the training data path builds (chat template,
    frames through the image processor, timestamps / timings) and answers as greedy decoding on those does."""
    import io
    import json

    from conftest import greedy_answer
    from transformers import AutoModelForImageTextToText

    from visionzip_tune.__main__ import main as cli
    from visionzip_tune.data import DataConfig, SupervisedDataset, load_samples
    from visionzip_tune.export import export_projector
    from visionzip_tune.data.processing import load_processing
    from visionzip_tune.demo.tiny import save_tiny

    base = save_tiny(tmp_path / "base", TinySpec(family=family, **GEOMETRY))
    processing = load_processing(base)
    model = AutoModelForImageTextToText.from_pretrained(base).eval()
    vzt.apply_visionzip(model, dominant_ratio=0.3, contextual_ratio=0.1)
    with torch.no_grad():
        for param in families.projector_parameters(model).values():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(5)))
    data = {"template": "chat_template", "image_aspect": "processor", "video_frames": FRAMES}
    export = export_projector(
        model,
        tmp_path / "export",
        metadata={"base_model": str(base), "recipe": {"config": {"data": data}}},
        processing=processing,
    )
    _write_media(tmp_path)
    frames = tmp_path / "frames"
    frames.mkdir()
    for k in range(6):
        (tmp_path / f"frame{k}.png").rename(frames / f"{k:03d}.png")

    def reference(turns):
        """Greedy answer to the last question of ``turns``, the prompt built by the training dataset."""
        conversations = [{"from": role, "value": text} for role, text in turns]
        sample = {"id": "q", "image": "image1.png", "video": [f"frames/{k:03d}.png" for k in range(6)]}
        (tmp_path / "sample.json").write_text(json.dumps([{**sample, "conversations": conversations}]))
        dataset = SupervisedDataset(
            load_samples(tmp_path / "sample.json", cache_dir=tmp_path / f"cache{len(turns)}"),
            DataConfig(image_folder=str(tmp_path), **data),
            processing,
            build.placeholders(model.config),
        )
        return greedy_answer(model, processing.tokenizer, dataset[0], 4)

    media = ["--image", str(tmp_path / "image1.png"), "--video", str(frames)]
    monkeypatch.setattr("sys.stdin", io.StringIO("What moves?\nAnd then?\n\n"))
    capsys.readouterr()
    assert (
        cli(["generate", "--projector", str(export), *media, "--interactive", "--max-new-tokens", "4", "--show-prompt"])
        == 0
    )
    captured = capsys.readouterr()
    first, second = captured.out.strip().splitlines()
    expected, prompt = reference([("human", "<video>\n<image>\nWhat moves?"), ("gpt", "x")])
    assert first == expected
    image_tokens = families.tokens_per_image(model.config, (1, 4, 8))
    video_tokens = families.tokens_per_video(model.config, (2, 4, 6))
    assert prompt.count(model.config.image_token_id) == image_tokens == 2 + 1  # N = 8: floor(2.4), max(1, 0)
    assert prompt.count(model.config.video_token_id) == video_tokens == 2 * (1 + 1)
    assert f"{image_tokens} tokens per image, {video_tokens} tokens per video of {FRAMES} frames" in captured.err
    assert f"<|image_pad|>x{image_tokens}" in captured.err
    runs = [f"<|video_pad|>x{video_tokens // 2}"] * 2 if family == "qwen3_vl" else [f"<|video_pad|>x{video_tokens}"]
    assert captured.err.count(runs[0]) == 2 * len(runs)  # both prompts; Qwen3-VL: a run per frame
    turns = [("human", "<video>\n<image>\nWhat moves?"), ("gpt", first), ("human", "And then?"), ("gpt", "x")]
    assert second == reference(turns)[0]
