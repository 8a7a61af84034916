"""apply_visionzip / remove_visionzip on real tiny LlavaForConditionalGeneration models (CLIP and SigLIP towers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import visionzip_tune as vzt
from conftest import fed_to_llm, load_tiny
from reference_visionzip import reference_visionzip
from visionzip_tune.algorithm import capture
from visionzip_tune.families.base import zip_tower
from visionzip_tune.families import family_name, language_model, projector_modules, tokens_per_image, vision_tower
from visionzip_tune.demo.tiny import TinySpec, build_tiny_with_processor

PROMPT = "USER: <image>\nWhat colour is the shape? ASSISTANT:"


def _images(n: int, size: int = 224) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 30, 3), dtype=np.uint8)) for _ in range(n)]


def _batch(processor, n: int = 2):
    return processor(images=_images(n), text=[PROMPT] * n, return_tensors="pt", padding=True)


def _image_tokens(model, batch) -> list[int]:
    return (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()


@pytest.mark.parametrize("fixture", ["tiny_clip", "tiny_siglip"])
def test_features_match_eager_reference(request, fixture):
    model, _ = request.getfixturevalue(fixture)
    vzt.apply_visionzip(model, 54, 10)
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 224, 224)
    layer = model.config.vision_feature_layer
    expected = reference_visionzip(model.model.vision_tower, pixels, layer, 54, 10)
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=pixels)
        zipped = zip_tower(model.model.vision_tower, pixels, capture.resolve_layer(4, layer), 54, 10)
    assert zipped.dominant_indices.tolist() == expected.dominant
    assert zipped.contextual_indices.tolist() == expected.contextual
    reference_tokens = torch.stack(expected.tokens)
    torch.testing.assert_close(out.last_hidden_state, reference_tokens, rtol=0, atol=1e-5)
    assert len(out.pooler_output) == 3 and out.pooler_output[0].shape == (64, model.config.text_config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.stack(out.pooler_output), model.model.multi_modal_projector(reference_tokens), rtol=0, atol=1e-5
        )


def test_eager_budget_is_recorded_and_exact(tiny_clip):
    model, _ = tiny_clip
    vzt.apply_visionzip(model, 20, 6, eager=True)
    assert model.config.visionzip == {"dominant": 20, "contextual": 6, "eager": True}
    pixels = torch.randn(2, 3, 224, 224)
    expected = reference_visionzip(model.model.vision_tower, pixels, -2, 20, 6)
    with torch.no_grad():
        tokens = model.model.get_image_features(pixel_values=pixels).last_hidden_state
    assert torch.equal(tokens[:, :20], torch.stack(expected.tokens)[:, :20])  # dominant tokens bit-exact
    assert model.model.vision_tower.config._attn_implementation == "sdpa"


@pytest.fixture(scope="module")
def clip_336():
    """CLIP tower at 336 px / patch 14: 576 patches + CLS, as in LLaVA-1.5."""
    return build_tiny_with_processor(TinySpec(tower="clip", image_size=336, vision_layers=3))


@pytest.mark.parametrize("dominant, contextual", [(54, 10), (108, 20), (162, 30)])
def test_processor_counts_paper_budgets(clip_336, dominant, contextual):
    model, processor = clip_336
    assert tokens_per_image(model.config) == 576
    try:
        vzt.apply_visionzip(model, dominant, contextual, processor)
        batch = _batch(processor)
        assert _image_tokens(model, batch) == [dominant + contextual] * 2
        assert tokens_per_image(model.config) == dominant + contextual
        with torch.no_grad():
            _, fed = fed_to_llm(model, **batch)  # the placeholder check inside accepts the compressed count
        assert fed["image"].shape == (2 * (dominant + contextual), model.config.text_config.hidden_size)
    finally:
        vzt.remove_visionzip(model, processor)
    assert _image_tokens(model, _batch(processor)) == [576, 576]


def test_tower_runs_without_autograd_under_activation_checkpointing(tiny_clip):
    # activation checkpointing calls enable_input_require_grads(), which also hooks the tower's patch embedding.
    model, processor = tiny_clip
    vzt.apply_visionzip(model, 54, 10, processor)
    model.activation_checkpointing_enable()
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    model.train()
    out = model.model.get_image_features(pixel_values=_batch(processor)["pixel_values"])
    assert out.last_hidden_state.grad_fn is None  # tower + selection built no graph
    assert out.pooler_output[0].grad_fn is not None  # the projector did


def test_generate_with_compressed_count(tiny_siglip):
    model, processor = tiny_siglip
    vzt.apply_visionzip(model, 40, 8, processor)
    batch = _batch(processor, n=1)
    assert _image_tokens(model, batch) == [48]
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
        first = model(**batch).logits[0, -1].argmax()
    assert generated.shape == (1, batch["input_ids"].shape[1] + 4)
    assert generated[0, batch["input_ids"].shape[1]] == first


def test_remove_restores_stock_exactly(tiny_clip):
    model, processor = tiny_clip
    batch = _batch(processor)
    with torch.no_grad():
        stock = model(**batch).logits
    vzt.apply_visionzip(model, 54, 10, processor)
    zipped_batch = _batch(processor)
    assert _image_tokens(model, zipped_batch) == [64, 64]
    vzt.remove_visionzip(model, processor)
    assert "get_image_features" not in vars(model.model) and not hasattr(model.config, "visionzip")
    assert "replace_image_token" not in vars(processor)
    again = _batch(processor)
    assert torch.equal(again["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**again).logits, stock)
    assert tokens_per_image(model.config) == 256


def test_other_instances_stay_stock(tiny_clip, tiny_clip_dir):
    model, processor = tiny_clip
    other, other_processor = load_tiny(tiny_clip_dir)
    vzt.apply_visionzip(model, 54, 10, processor)
    assert _image_tokens(other, _batch(other_processor)) == [256, 256]
    with torch.no_grad():
        out = other.model.get_image_features(pixel_values=torch.randn(1, 3, 224, 224))
    assert out.pooler_output[0].shape[0] == 256


def test_save_load_then_apply_alone_rezips(tiny_clip, tmp_path):
    model, processor = tiny_clip
    vzt.apply_visionzip(model, 30, 5, processor)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_tiny(tmp_path)
    assert loaded.config.visionzip == {"dominant": 30, "contextual": 5, "eager": False}
    vzt.apply_visionzip(loaded, processor=loaded_processor)
    batch = _batch(loaded_processor)
    assert _image_tokens(loaded, batch) == [35, 35]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_reapply_changes_budget(tiny_clip):
    model, processor = tiny_clip
    vzt.apply_visionzip(model, 54, 10, processor)
    vzt.apply_visionzip(model, 108, 20, processor)
    batch = _batch(processor)
    assert _image_tokens(model, batch) == [128, 128]
    with torch.no_grad():
        assert fed_to_llm(model, **batch)[1]["image"].shape[0] == 256
    vzt.apply_visionzip(model, contextual=0)  # one argument changes, the other is kept
    assert model.config.visionzip["dominant"] == 108 and tokens_per_image(model.config) == 108
    assert _image_tokens(model, _batch(processor)) == [108, 108]  # the processor follows the model's budget


def test_bad_budgets_and_layers(tiny_clip, tiny_siglip):
    model, _ = tiny_clip
    with pytest.raises(ValueError, match="needs a budget"):
        vzt.apply_visionzip(model)
    with pytest.raises(ValueError, match="dominant=250, contextual=10 for N=257"):
        vzt.apply_visionzip(model, 250, 10)
    with pytest.raises(ValueError, match="dominant=250, contextual=7 for N=256"):
        vzt.apply_visionzip(tiny_siglip[0], 250, 7)
    model.config.vision_feature_layer = [-2, -1]
    with pytest.raises(ValueError, match="single vision_feature_layer"):
        vzt.apply_visionzip(model, 54, 10)
    assert not hasattr(model.config, "visionzip") and "get_image_features" not in vars(model.model)


def test_unsupported_model_lists_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    for call in (
        lambda: vzt.apply_visionzip(llama, 54, 10),
        lambda: projector_modules(llama),
        lambda: family_name(llama),
    ):
        with pytest.raises(ValueError, match=r"LlamaForCausalLM; supported families: llava \(LlavaForConditional"):
            call()
    with pytest.raises(ValueError, match=r"unsupported model type 'llama'.*llava"):
        tokens_per_image(llama.config)


def test_accessors_plain_and_peft(tiny_clip):
    from peft import LoraConfig, get_peft_model

    model, processor = tiny_clip
    assert family_name(model) == family_name(model.config) == "llava"
    assert projector_modules(model) == {"multi_modal_projector": model.model.multi_modal_projector}
    assert vision_tower(model) is model.model.vision_tower
    assert language_model(model) is model.model.language_model
    vzt.apply_visionzip(model, 54, 10, processor)
    lora = LoraConfig(r=2, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    wrapped = get_peft_model(model, lora)
    assert projector_modules(wrapped) == {"multi_modal_projector": model.model.multi_modal_projector}
    assert vision_tower(wrapped) is model.model.vision_tower
    assert language_model(wrapped) is model.model.language_model
    assert family_name(wrapped) == "llava"
    batch = _batch(processor)
    with torch.no_grad():
        assert wrapped(**batch).logits.shape[1] == batch["input_ids"].shape[1]  # the override survives wrapping
    vzt.apply_visionzip(wrapped, 20, 4, processor)  # a peft-wrapped model is zipped through its base model
    assert _image_tokens(model, _batch(processor)) == [24, 24] and model.config.visionzip["dominant"] == 20


def test_bf16_model(tiny_clip):
    model, processor = tiny_clip
    model.to(torch.bfloat16)
    vzt.apply_visionzip(model, 54, 10, processor)
    with torch.no_grad():
        _, fed = fed_to_llm(model, **_batch(processor))  # fp32 pixel values are cast to the tower's dtype
    assert fed["image"].dtype == torch.bfloat16 and fed["image"].shape[0] == 128
