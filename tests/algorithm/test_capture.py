"""capture.py on real tiny CLIP and SigLIP towers: hooks see what eager attention sees, early stop is exact."""

from __future__ import annotations

import copy

import pytest
import torch

from visionzip_tune.algorithm import capture, compress
from visionzip_tune.families.base import zip_tower


def _eager_copy(tower):
    eager = copy.deepcopy(tower)
    eager.set_attn_implementation("eager")
    return eager


def _attention_from(captured: capture.LayerCapture) -> torch.Tensor:
    """(B, H, N, N) attention probabilities recomputed from hooked queries and keys."""
    b, n, _ = captured.queries.shape
    q = captured.queries.view(b, n, captured.num_heads, -1).transpose(1, 2)
    k = captured.keys.view(b, n, captured.num_heads, -1).transpose(1, 2)
    return (q @ k.transpose(-1, -2) * captured.scale).softmax(dim=-1)


@pytest.fixture
def towers(tiny_clip, tiny_siglip):
    return {"clip": tiny_clip[0].model.vision_tower, "siglip": tiny_siglip[0].model.vision_tower}


@pytest.fixture
def pixels():
    torch.manual_seed(0)
    return torch.randn(2, 3, 224, 224)


def test_resolve_layer():
    assert capture.resolve_layer(24, -2) == 22  # LLaVA-1.5: hidden_states[-2] = output of layers[22]
    assert capture.resolve_layer(24, -1) == 23
    assert capture.resolve_layer(24, 24) == 23
    assert capture.resolve_layer(24, 1) == 0
    assert capture.resolve_layer(24, -24) == 0
    with pytest.raises(ValueError, match="embeddings"):
        capture.resolve_layer(24, 0)
    with pytest.raises(ValueError, match="embeddings"):
        capture.resolve_layer(24, -25)
    with pytest.raises(ValueError, match="out of range"):
        capture.resolve_layer(24, 25)
    with pytest.raises(ValueError, match="single vision_feature_layer"):
        capture.resolve_layer(24, [-2, -1])


def test_tokens_per_tower_output(towers):
    assert capture.tokens_per_tower_output(towers["clip"].config) == 257
    assert capture.tokens_per_tower_output(towers["siglip"].config) == 256
    assert capture.tower_has_cls(towers["clip"]) and not capture.tower_has_cls(towers["siglip"])


@pytest.mark.parametrize("name, layer", [("clip", 2), ("siglip", 3), ("siglip", 2)])
def test_hooked_qk_give_eager_attention(towers, pixels, name, layer):
    eager = _eager_copy(towers[name])
    with torch.no_grad():
        expected = eager(pixels, output_attentions=True).attentions[layer]  # (B, H, N, N)
        captured = capture.run_until(eager, pixels, layer)
    torch.testing.assert_close(_attention_from(captured), expected, rtol=0, atol=1e-6)
    if captured.has_cls:  # only the CLS row is computed, summed over heads
        cls_query = captured.queries[:, 0]
        scores = compress.cls_attention_scores(cls_query, captured.keys, captured.num_heads, captured.scale)
        torch.testing.assert_close(scores, expected[:, :, 0, 1:].sum(dim=1), rtol=0, atol=1e-6)
    else:  # attention received, mean over heads then over queries
        scores = compress.received_attention_scores(captured.queries, captured.keys, captured.num_heads, captured.scale)
        torch.testing.assert_close(scores, expected.mean(dim=1).mean(dim=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("layer", [0, 2, 3])
def test_early_stop_equals_full_forward(towers, pixels, name, layer):
    tower = towers[name]
    calls = []
    late = tower.encoder.layers[layer + 1 :]
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in late]
    with torch.no_grad():
        captured = capture.run_until(tower, pixels, layer)
    for h in handles:
        h.remove()
    assert calls == []  # layers after L never ran
    with torch.no_grad():
        full = tower(pixels, output_hidden_states=True).hidden_states[layer + 1]
    assert torch.equal(captured.hidden, full)
    assert tower.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_eager_option_is_bit_exact_with_eager_tower(towers, pixels, name):
    tower = towers[name]
    with torch.no_grad():
        expected = _eager_copy(tower)(pixels, output_hidden_states=True).hidden_states[3]
        sdpa = capture.run_until(tower, pixels, 2)
        eager = capture.run_until(tower, pixels, 2, eager=True)
    assert torch.equal(eager.hidden, expected)
    assert tower.config._attn_implementation == "sdpa"  # switched for the call only
    torch.testing.assert_close(sdpa.hidden, expected, rtol=0, atol=1e-5)


def _hook_count(tower):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tower.modules())


@pytest.mark.parametrize("eager", [False, True])
def test_hooks_and_attention_restored_even_on_error(towers, eager):
    tower = towers["clip"]
    before = _hook_count(tower)
    with torch.no_grad():
        capture.run_until(tower, torch.randn(1, 3, 224, 224), 2, eager=eager)
        assert _hook_count(tower) == before
        with pytest.raises(ValueError, match="doesn't match model"):  # wrong image size fails inside the tower
            capture.run_until(tower, torch.randn(1, 3, 112, 112), 2, eager=eager)
    assert _hook_count(tower) == before
    assert tower.config._attn_implementation == "sdpa"


def test_unsupported_tower_is_named():
    from transformers import ViTConfig, ViTModel

    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match=r"ViTModel.*CLIPVisionModel, SiglipVisionModel"):
        capture.run_until(vit, torch.randn(1, 3, 224, 224), 0)
    with pytest.raises(ValueError, match="type 'vit'.*clip_vision_model, siglip_vision_model"):
        capture.tokens_per_tower_output(vit.config)


def test_visionzip_features_shapes(towers, pixels):
    with torch.no_grad():
        clip = zip_tower(towers["clip"], pixels, 2, dominant=54, contextual=10)
        siglip = zip_tower(towers["siglip"], pixels, 3, dominant=30, contextual=0)
    assert clip.tokens.shape == (2, 64, 64) and clip.dominant_indices[:, 0].tolist() == [0, 0]
    assert siglip.tokens.shape == (2, 30, 64) and siglip.contextual_indices.shape == (2, 0)
