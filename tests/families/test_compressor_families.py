"""Every family x compressor pair: the compressor's rows reach the LLM, as many as the shared count functions say
(the processor, the data path and the model agree), or the pair is refused in one paragraph naming what is
missing. Tiny random models of every family; a real image through the training data path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import visionzip_tune as vzt
from conftest import fed_to_llm
from visionzip_tune.algorithm.compressors import COMPRESSORS
from visionzip_tune.data import Processing
from visionzip_tune.demo.tiny import TinySpec, build_tiny
from visionzip_tune.families import FAMILIES, recorded_zips, tokens_per_unit
from visionzip_tune.inference.prompts import Prompter

QWEN = ("qwen2_5_vl", "qwen3_vl")
# Towers without CLS cannot feed the compressors that rank by the CLS token's attention.
REFUSED = {(family, name) for family in ("llava_onevision", *QWEN) for name in ("vispruner", "prumerge_plus")}


def params_of(family: str, name: str) -> dict:
    if name == "visionzip":
        return {"dominant_ratio": 0.3, "contextual_ratio": 0.1} if family in QWEN else {"dominant": 5, "contextual": 2}
    return {"tokens": 4}


@pytest.fixture(scope="module")
def tiny_models():
    """One tiny model of every family (56 px units of 14 px patches; Qwen images up to 112 px) and its processing."""
    models = {}
    for family in FAMILIES:
        spec = TinySpec(family=family, image_size=112 if family in QWEN else 56, patch_size=14, vision_layers=2)
        model, tokenizer, image_processor = build_tiny(spec)
        models[family] = (model, Processing(tokenizer, image_processor, tokenizer.chat_template))
    return models


@pytest.mark.parametrize("name", list(COMPRESSORS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_pair_feeds_its_rows_or_is_refused(tiny_models, family, name):
    model, processing = tiny_models[family]
    vzt.remove_visionzip(model)
    if (family, name) in REFUSED:
        with pytest.raises(ValueError) as refused:
            vzt.apply_compression(model, name, **params_of(family, name))
        message = str(refused.value)
        assert f"the {name} compressor reads the CLS attention row" in message and "no CLS token" in message
        assert "compressors that run on it: visionzip, random, pool, divprune" in message
        assert not hasattr(model.config, "visionzip")
        return
    vzt.apply_compression(model, name, **params_of(family, name))
    prompter = Prompter(model, processing, template="chat_template")
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    media = prompter.media([picture])
    ids = torch.tensor([prompter.prompt([], "What is it?", media)])
    with recorded_zips(model) as zips, torch.no_grad():
        _, fed = fed_to_llm(
            model, input_ids=ids, attention_mask=torch.ones_like(ids), **prompter.model_inputs(media, ids)
        )
    assert fed["image"].shape[0] == media.image_tokens[0] == (ids == model.config.image_token_id).sum()
    units = sum(zipped.result.tokens.shape[0] for zipped in zips) if family not in QWEN else None
    if name != "visionzip":
        assert tokens_per_unit(model.config) == 4
        assert model.config.visionzip["method"] == name
        if units is not None:  # every unit (image, crop, view) became exactly K rows
            assert media.image_tokens[0] == 4 * units
    vzt.remove_visionzip(model)


def test_grid_order_is_visionzip_only(tiny_models):
    model, _ = tiny_models["llava_next"]
    with pytest.raises(ValueError, match="token_order='grid' is VisionZip's official LLaVA-NeXT layout"):
        vzt.apply_compression(model, "pool", tokens=4, token_order="grid")


def test_a_compressor_budget_is_checked_against_the_tower_from_the_config_alone(tiny_models):
    model, _ = tiny_models["llava"]
    with pytest.raises(ValueError, match="tokens=20 rows per unit, but a unit has only 16 patches"):
        vzt.apply_compression(model, "divprune", tokens=20)
    with pytest.raises(ValueError, match="no compressor named 'tome'"):
        vzt.apply_compression(model, "tome", tokens=4)


def test_switching_compressors_starts_from_the_new_ones_defaults(tiny_models):
    model, _ = tiny_models["llava"]
    vzt.apply_compression(model, "random", tokens=4, seed=7)
    vzt.apply_compression(model, "random", tokens=6)  # the same compressor: unset keys as recorded
    assert model.config.visionzip == {"method": "random", "tokens": 6, "seed": 7, "resample": False, "eager": False}
    vzt.apply_visionzip(model, 5, 2)  # VisionZip's own keys: VisionZip
    assert model.config.visionzip == {"dominant": 5, "contextual": 2, "eager": False}
    vzt.apply_compression(model, "random", tokens=4)
    assert model.config.visionzip["seed"] == 0
    vzt.remove_visionzip(model)
