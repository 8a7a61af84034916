"""Mini-Gemini: the native model against a per-token computation written here from MGM's code, "mine, then zip"
against an eager-attention oracle, token counts, the family's parts (projector set, towers, blank inputs), save/load
and generate (tiny random weights, CPU). The converter: test_mini_gemini_convert.py; training, export, generate and
data preview: tests/training/test_mini_gemini_train.py."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForImageTextToText

import visionzip_tune as vzt
from conftest import fed_to_llm
from reference_visionzip import zip_one
from visionzip_tune.models.mini_gemini import MiniGeminiConfig, register
from visionzip_tune.models.mini_gemini import modeling_mini_gemini as mgm
from visionzip_tune.models.mini_gemini.configuration_mini_gemini import stock_tokens_per_image
from visionzip_tune.training import build
from visionzip_tune.training.config import TrainConfig
from visionzip_tune.errors import UserError
from visionzip_tune.export import weights_fingerprint
from visionzip_tune.families import blank_image_inputs, family_name, frozen_parts, projector_parameters
from visionzip_tune.families import mini_gemini
from visionzip_tune.families.mini_gemini import FAMILY as MINI_GEMINI
from visionzip_tune.families.mini_gemini import zip_mined_views
from visionzip_tune.demo.tiny import TinySpec, build_tiny, save_tiny

BUDGETS = [(6, 2), (12, 4), (18, 6)]  # 8 / 16 / 24 of 64 patches, as 54+10 / 108+20 / 162+30 are of 576
TEXT = "USER: {image}\nWhat colour is the shape? ASSISTANT:"
# CLIP at 112 px / patch 14: 8 x 8 = 64 patches per view (+ CLS), 64 wide, 4 layers of 4 heads; HR 128 px (HD 256).
SPEC = TinySpec(family="mini_gemini", image_size=112)


def jitter(model, seed: int = 1):
    """Perturb every parameter so that no two are alike (LayerNorms are ones/zeros at init): a swapped or misnamed
    weight then changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def tiny_mgm(hd: bool, spec: TinySpec = SPEC):
    """``(model, tokenizer)``: a jittered tiny MGM (``hd``: MGM-HD's layout)."""
    model, tokenizer, _ = build_tiny(dataclasses.replace(spec, hd=hd))
    return jitter(model), tokenizer


@pytest.fixture(scope="module")
def normal():
    return tiny_mgm(hd=False)


@pytest.fixture(scope="module")
def hd():
    return tiny_mgm(hd=True)


@pytest.fixture(scope="module")
def oracle_of(request):
    """layout -> (model, pixels, :func:`oracle` of them), computed once per module (the token loops are slow)."""
    cache = {}

    def get(layout: str):
        if layout not in cache:
            model = request.getfixturevalue(layout)[0]
            pixels = hr_pixels(model)
            cache[layout] = model, pixels, oracle(model, pixels)
        return cache[layout]

    return get


def hr_pixels(model, batch: int = 2, seed: int = 0):
    side = model.config.image_size_aux
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def input_ids(model, tokenizer, batch: int = 2, tokens: int | None = None):
    count = model.config.image_seq_length if tokens is None else tokens
    ids = tokenizer(TEXT.format(image="<image>" * count), return_tensors="pt").input_ids
    return ids.repeat(batch, 1)


def zipped_features(inner, pixels, dominant: int, contextual: int):
    """ "Mine, then zip" as the family's override computes it: (B, V * K, D) tokens and the ZipResult over views."""
    budget = {"dominant": dominant, "contextual": contextual, "eager": False}
    views = mgm.low_resolution_views(pixels, inner.config)
    zipped = zip_mined_views(mgm.mine_views(inner, pixels), budget, views, inner.config)
    return mgm.per_image(zipped.tokens, pixels.shape[0]), zipped


# ----------------------------------------------------------------------------------------------------------------
# A straightforward MGM, written from its code (mgm_arch.py encode_images / unified_resampler, openclip_encoder.py
# backbone, train.py's LR image): loops over views and tokens, no batching, the towers' own forward passes.


def stage_concat(aux_tower, pixels):
    """ConvNeXt stage outputs from the tower's own ``output_hidden_states``, upsampled to stage 0 and concatenated."""
    stages = aux_tower(pixels, output_hidden_states=True).hidden_states[1:]  # [0] is the stem's output
    size = stages[0].shape[-2:]
    return torch.cat(
        [stages[0]] + [F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in stages[1:]], dim=1
    )


def oracle_views(config, pixels, hr_map):
    """Per image: [(LR view (3, s, s), its HR map (C, h, h))], global first, then crops row-major."""
    side, grid = config.vision_config.image_size, config.image_grid
    lr = F.interpolate(pixels, size=(side * grid, side * grid), mode="bilinear", align_corners=False)
    views = []
    for image, features in zip(lr, hr_map):
        if grid == 1:
            views.append([(image, features)])
            continue
        quarter = features.shape[-1] // grid
        per_image = [
            (
                image[:, r * side : (r + 1) * side, c * side : (c + 1) * side],
                features[:, r * quarter : (r + 1) * quarter, c * quarter : (c + 1) * quarter],
            )
            for r in range(grid)
            for c in range(grid)
        ]
        if config.image_global:
            whole = F.interpolate(image[None], size=(side, side), mode="bilinear", align_corners=False)[0]
            scaled = F.interpolate(features[None], scale_factor=1 / grid, mode="bilinear", align_corners=False)[0]
            per_image.insert(0, (whole, scaled))
        views.append(per_image)
    return views


def oracle_mine(inner, patches, hr):
    """patches (L, D), hr (C, h, h): every token attends over its own p x p region of hr, one query, 1/sqrt(D)."""
    side = int(patches.shape[0] ** 0.5)
    p = hr.shape[-1] // side
    tokens = []
    for t, x in enumerate(patches):
        row, col = divmod(t, side)
        region = hr[:, row * p : (row + 1) * p, col * p : (col + 1) * p].permute(1, 2, 0).reshape(p * p, -1)
        q = inner.vlm_uni_query_projector(x)
        k = inner.vlm_uni_aux_projector(region)
        v = inner.vlm_uni_val_projector(region)
        weights = torch.softmax(k @ q / q.shape[0] ** 0.5, dim=0)
        tokens.append(x + weights @ v)
    return torch.stack(tokens)


@torch.no_grad()
def oracle(model, pixels):
    """Straightforward MGM: per image, the list of its views' (CLS, mined patch tokens (L, D), LR view)."""
    inner, config = model.model, model.config
    hr_map = stage_concat(inner.vision_tower_aux, pixels)
    out = []
    for views in oracle_views(config, pixels, hr_map):
        per_view = []
        for image, hr in views:
            hidden = inner.vision_tower(image[None], output_hidden_states=True).hidden_states[-2][0]
            per_view.append((hidden[0], oracle_mine(inner, hidden[1:], hr), image))
        out.append(per_view)
    return out


def oracle_tokens(views) -> torch.Tensor:
    """(B, V * L, D) from :func:`oracle`'s output."""
    return torch.stack([torch.cat([mined for _, mined, _ in per_view]) for per_view in views])


@torch.no_grad()
def oracle_logits(model, ids, pixels) -> torch.Tensor:
    """Straightforward MGM logits: the token embeddings, the image positions overwritten with the projected
    :func:`oracle` tokens, through the LLM and its head (MGM splices its image features in the same way)."""
    embeds = model.model.language_model.embed_tokens(ids).clone()
    features = model.model.multi_modal_projector(oracle_tokens(oracle(model, pixels)))
    embeds[ids == model.config.image_token_id] = features.flatten(0, 1)
    return model.lm_head(model.model.language_model(inputs_embeds=embeds).last_hidden_state)


# ----------------------------------------------------------------------------------------------------------------
# Stock MGM


@pytest.mark.parametrize("layout", ["normal", "hd"])
def test_stock_features_equal_per_token_mining(oracle_of, layout):
    model, pixels, views = oracle_of(layout)
    expected = oracle_tokens(views)
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=pixels)
    views = 5 if layout == "hd" else 1
    assert expected.shape == (2, views * 64, 64)
    torch.testing.assert_close(out.last_hidden_state, expected, rtol=0, atol=2e-5)
    assert len(out.pooler_output) == 2
    with torch.no_grad():
        torch.testing.assert_close(
            torch.stack(out.pooler_output), model.model.multi_modal_projector(expected), rtol=0, atol=2e-5
        )


def test_stage_upsample_and_concat(normal):
    model, _ = normal
    pixels = hr_pixels(model)
    with torch.no_grad():
        got = mgm.aux_feature_map(model.model.vision_tower_aux, pixels)
        expected = stage_concat(model.model.vision_tower_aux, pixels)
    assert got.shape == (2, sum(model.config.aux_vision_config.hidden_sizes), 32, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_views_and_regions_follow_mgm_order(hd):
    """Crop k of an image is its k-th tile row-major, the global view comes first, and a token's region is its own."""
    model, _ = hd
    config = model.config
    pixels = torch.arange(2 * 3 * 256 * 256, dtype=torch.float32).reshape(2, 3, 256, 256)
    views = mgm.low_resolution_views(pixels, config)
    lr = F.interpolate(pixels, size=(224, 224), mode="bilinear", align_corners=False)
    assert views.shape == (10, 3, 112, 112)
    # image 1's views are 5..9: the global view (the LR image downscaled), then crops 0..3; crop 2 is bottom left
    global_view = F.interpolate(lr[1:], size=(112, 112), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(views[5], global_view)
    torch.testing.assert_close(views[5 + 1 + 2], lr[1, :, 112:, :112])
    hr = torch.arange(4 * 64 * 64, dtype=torch.float32).reshape(1, 4, 64, 64)
    regions = mgm.region_vectors(mgm.aux_view_maps(hr, config), side=8)
    assert regions.shape == (5, 64, 16, 4)
    # crop 3 (bottom right quarter), token 9 = row 1, column 1 -> HR rows/cols 32 + 4..8
    torch.testing.assert_close(regions[4, 9], hr[0, :, 36:40, 36:40].permute(1, 2, 0).reshape(16, 4))


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError, match="vision_feature_select_strategy must be 'default'"):
        MiniGeminiConfig(vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="image_grid >= 2 for a global view"):
        MiniGeminiConfig(image_global=True)
    with pytest.raises(ValueError, match="image_size_aux=800"):
        MiniGeminiConfig(image_size_aux=800)
    with pytest.raises(ValueError, match="vision_feature_layer must be one int"):
        MiniGeminiConfig(vision_feature_layer=[-2, -1])


# ----------------------------------------------------------------------------------------------------------------
# VisionZip: mine, then zip


@pytest.mark.parametrize("layout", ["normal", "hd"])
@pytest.mark.parametrize("dominant, contextual", BUDGETS)
def test_mine_then_zip_equals_eager_oracle(oracle_of, layout, dominant, contextual):
    """Per view, the oracle zips MGM's own tokens [CLS, mined patches] (from the per-token loops) with the scores
    and keys of an eager run of CLIP (tests/reference_visionzip.py, written from the spec)."""
    model, pixels, per_image = oracle_of(layout)
    inner = model.model
    views = [view for image_views in per_image for view in image_views]
    eager = copy.deepcopy(inner.vision_tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        tokens, zipped = zipped_features(inner, pixels, dominant, contextual)
        ours = mgm.mine_views(inner, pixels)  # tokens (B * V, L, D)
        lr = torch.stack([image for _, _, image in views])
        run = eager(lr, output_hidden_states=True, output_attentions=True)
        layer = eager.encoder.layers[-2]  # hidden_states[-2] is the output of layer -2
        keys = layer.self_attn.k_proj(layer.layer_norm1(run.hidden_states[-3]))
        metric = keys.view(*keys.shape[:2], layer.self_attn.num_heads, -1).mean(dim=2)
    kept = dominant + contextual
    assert tokens.shape == (2, len(views) // 2 * kept, 64)
    per_view = tokens.reshape(len(views), kept, -1)
    for v, (cls, mined, _) in enumerate(views):
        hidden = torch.cat([run.hidden_states[-2][v, :1], mined])
        assert torch.allclose(cls, hidden[0], atol=1e-5)
        expected, dominant_positions, targets = zip_one(
            hidden, run.attentions[-2][v], metric[v], dominant, contextual, has_cls=True
        )
        assert zipped.dominant_indices[v].tolist() == dominant_positions
        assert zipped.contextual_indices[v].tolist() == targets
        torch.testing.assert_close(per_view[v], expected, rtol=0, atol=2e-5)
        # dominant patch tokens are MGM's own mined tokens, bit for bit; CLS is unmined
        patches = zipped.dominant_indices[v, 1:] - 1
        assert torch.equal(per_view[v, 1:dominant], ours.tokens[v, patches])
        assert torch.equal(per_view[v, 0], ours.capture.hidden[v, 0])


def test_applied_visionzip_feeds_the_zipped_tokens_and_remove_restores_stock(normal, oracle_of):
    """apply_visionzip binds the family's override to the instance: LLaVA's stock forward scatters exactly the
    projected zipped tokens into the LLM input; remove_visionzip gives the stock features back."""
    model, tokenizer = normal
    model = copy.deepcopy(model)
    _, pixels, views = oracle_of("normal")
    vzt.apply_visionzip(model, 6, 2)
    assert model.model.get_image_features.__func__ is mini_gemini.get_image_features  # on the instance only
    assert mgm.MiniGeminiModel.get_image_features is not mini_gemini.get_image_features
    assert vzt.tokens_per_image(model.config) == 8
    with torch.no_grad():
        _, rows = fed_to_llm(model, input_ids=input_ids(model, tokenizer, tokens=8), pixel_values=pixels)
        expected = model.model.multi_modal_projector(zipped_features(model.model, pixels, 6, 2)[0])
    torch.testing.assert_close(rows["image"], expected.flatten(0, 1), rtol=0, atol=1e-6)
    vzt.remove_visionzip(model)
    with torch.no_grad():
        stock = model.model.get_image_features(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(stock, oracle_tokens(views), rtol=0, atol=2e-5)
    assert vzt.tokens_per_image(model.config) == 64


def test_zipped_generate_equals_greedy_without_cache(normal):
    model, tokenizer = normal
    model = copy.deepcopy(model)
    vzt.apply_visionzip(model, 6, 2)
    ids, pixels = input_ids(model, tokenizer, batch=1, tokens=8), hr_pixels(model, batch=1)
    with torch.no_grad():
        generated = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
        sequence = ids
        for _ in range(4):
            logits = model(input_ids=sequence, pixel_values=pixels, use_cache=False).logits
            sequence = torch.cat([sequence, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, sequence)


def test_bf16_stock_and_zipped(normal):
    """In bf16 the stock features stay close to fp32's (MGM's op order and fp32 interpolations), and the zipped
    model runs forward and generate in bf16."""
    model, tokenizer = normal
    half = copy.deepcopy(model).to(torch.bfloat16)
    pixels = hr_pixels(model)
    with torch.no_grad():
        features = half.model.get_image_features(pixel_values=pixels).last_hidden_state
        reference = model.model.get_image_features(pixel_values=pixels).last_hidden_state
        vzt.apply_visionzip(half, 6, 2)
        ids = input_ids(model, tokenizer, tokens=8)
        logits = half(input_ids=ids, pixel_values=pixels).logits
        generated = half.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=2, do_sample=False)
    assert features.dtype == logits.dtype == torch.bfloat16
    torch.testing.assert_close(features.float(), reference, rtol=0.05, atol=0.05)
    assert torch.isfinite(logits).all()
    assert torch.equal(generated[:, ids.shape[1]], logits[:, -1].argmax(-1))


# ----------------------------------------------------------------------------------------------------------------
# Token counts


def test_token_counts_at_mgm_geometry():
    """MGM-7B/13B (CLIP ViT-L/14 at 336, ConvNeXt-L at 768) and HD (1536, 2 x 2 crops + global), paper budgets."""
    normal_config = MiniGeminiConfig()
    hd_config = MiniGeminiConfig(image_size_aux=1536, image_grid=2, image_global=True)
    assert stock_tokens_per_image(normal_config) == normal_config.image_seq_length == 576
    assert stock_tokens_per_image(hd_config) == hd_config.image_seq_length == 2880
    for (dominant, contextual), expected in zip([(54, 10), (108, 20), (162, 30)], [64, 128, 192]):
        for config, views in ((normal_config, 1), (hd_config, 5)):
            config.visionzip = vzt.families.resolve_budget(config, dominant, contextual)
            assert vzt.tokens_per_image(config) == MINI_GEMINI.zipped_tokens(config, config.visionzip)
            assert vzt.tokens_per_image(config) == views * expected
            del config.visionzip
    assert vzt.tokens_per_image(hd_config) == 2880


@pytest.mark.parametrize("layout, views", [("normal", 1), ("hd", 5)])
def test_tiny_counts_match_features(request, layout, views):
    model, _ = request.getfixturevalue(layout)
    model = copy.deepcopy(model)
    assert vzt.tokens_per_image(model.config) == views * 64
    pixels = hr_pixels(model, batch=1)
    for dominant, contextual in BUDGETS:
        vzt.apply_visionzip(model, dominant, contextual)
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=pixels).pooler_output
        assert vzt.tokens_per_image(model.config) == features[0].shape[0] == views * (dominant + contextual)


def test_budget_beyond_a_view_is_refused_before_the_towers_run(normal):
    model, _ = normal
    with pytest.raises(ValueError, match=r"dominant=60, contextual=10 for N=65 tokens"):
        vzt.apply_visionzip(copy.deepcopy(model), 60, 10)


# ----------------------------------------------------------------------------------------------------------------
# The family's parts


@pytest.mark.parametrize(
    "subset, trained",
    [
        ("all", {"multi_modal_projector", *mgm.MINING_MODULES}),
        ("mlp_only", {"multi_modal_projector"}),
    ],
)
def test_projector_mode_gradients_reach_only_the_projector_set(normal, subset, trained):
    """Through build.prepare_trainable, as training does: MGM's stage-1 set by default, the MLP alone with
    mlp_only. Zipped, so the mining modules get their gradient through the merged tokens."""
    model, tokenizer = normal
    model = copy.deepcopy(model).train()
    vzt.apply_visionzip(model, 6, 2)
    model, trainable = build.prepare_trainable(model, TrainConfig(mode="projector", projector_modules=subset))
    ids = input_ids(model, tokenizer, batch=1, tokens=8)
    model(input_ids=ids, pixel_values=hr_pixels(model, batch=1), labels=ids).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {name for name, _ in trainable}
    assert {name.split(".")[1] for name in with_grad} == trained
    assert with_grad == {f"model.{name}" for name in projector_parameters(model, subset)}


def test_unknown_projector_subset_names_the_choices(normal):
    model, _ = normal
    with pytest.raises(UserError, match=r"projector_modules='merger'.*choose one of all, mlp_only"):
        build.prepare_trainable(copy.deepcopy(model), TrainConfig(projector_modules="merger"))


def test_fingerprint_covers_both_towers_and_not_the_projector_set(normal):
    model, _ = normal
    model = copy.deepcopy(model)
    assert list(frozen_parts(model)) == ["vision_tower", "language_model", "vision_tower_aux", "lm_head"]
    before = weights_fingerprint(model)
    with torch.no_grad():
        model.model.vlm_uni_val_projector[1].weight.add_(1.0)  # trained in projector mode: not fingerprinted
        assert weights_fingerprint(model) == before
        model.model.vision_tower_aux.encoder.stages[3].layers[0].pwconv1.weight.add_(1e-2)  # ConvNeXt's last stage
    assert weights_fingerprint(model) != before


def test_blank_image_is_the_high_resolution_image(hd):
    """A text-only batch runs the image path on a blank image of the HR size the model derives its views from."""
    model, _ = hd
    blank = blank_image_inputs(model.config)
    assert blank.keys() == {"pixel_values"} and blank["pixel_values"].shape == (1, 3, 256, 256)
    with torch.no_grad():
        assert model.model.get_image_features(**blank).last_hidden_state.shape == (1, 5 * 64, 64)


def test_tiny_mini_gemini_needs_a_clip_tower():
    with pytest.raises(UserError, match=r"model.tiny.tower='siglip'.*needs a CLIP tower"):
        build_tiny(dataclasses.replace(SPEC, tower="siglip"))


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading


def test_save_load_round_trip(normal, tmp_path):
    model, tokenizer = normal
    register()  # again: idempotent
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is MiniGeminiConfig and config.aux_vision_config.hidden_sizes == [8, 16, 32, 64]
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is mgm.MiniGeminiForConditionalGeneration and family_name(loaded) == "mini_gemini"
    ids, pixels = input_ids(model, tokenizer), hr_pixels(model)
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=ids, pixel_values=pixels).logits, model(input_ids=ids, pixel_values=pixels).logits
        )


def test_generate_equals_greedy_without_cache(normal):
    model, tokenizer = normal
    ids, pixels = input_ids(model, tokenizer, batch=1), hr_pixels(model, batch=1)
    with torch.no_grad():
        generated = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
        sequence = ids
        for _ in range(4):
            logits = model(input_ids=sequence, pixel_values=pixels, use_cache=False).logits
            sequence = torch.cat([sequence, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, sequence)


@pytest.mark.slow  # a fresh interpreter: ~5 s of imports
def test_auto_classes_after_import_visionzip_tune(tmp_path):
    """``import visionzip_tune`` alone registers the model type: a fresh interpreter loads a saved tiny MGM."""
    save_tiny(tmp_path / "saved", SPEC)
    code = (
        "import visionzip_tune; from transformers import AutoModelForImageTextToText as A; "
        f"print(type(A.from_pretrained({str(tmp_path / 'saved')!r})).__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "MiniGeminiForConditionalGeneration"
