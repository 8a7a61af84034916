"""Every compressor against an independent implementation of the rule its docstring states (tests/reference_compressors.py):
hand-checkable inputs, then the signals of a real tiny CLIP tower; exact indices, values to float tolerance."""

from __future__ import annotations

import pytest
import torch

import reference_compressors as ref
from visionzip_tune.algorithm import compress
from visionzip_tune.algorithm.compress import DOMINANT, DROPPED
from visionzip_tune.algorithm.compressors import COMPRESSORS, GRID, Signals, compressor_named, pixel_seeds
from visionzip_tune.algorithm.compressors.pool import bins
from visionzip_tune.demo.tiny import TinySpec, build_tiny
from visionzip_tune.families import vision_tower

TOL = dict(atol=1e-5, rtol=1e-5)


def signals_of(unit_signals: list[ref.UnitSignals]) -> Signals:
    """The batch's Signals as a family builds them, from the reference's per-unit tensors."""
    hidden = torch.stack([u.hidden for u in unit_signals])
    attention = torch.stack([u.attention for u in unit_signals])
    first = unit_signals[0]
    return Signals(
        hidden,
        has_cls=first.has_cls,
        grid=(first.side, first.side),
        heads=attention.shape[1],
        cls_attention=attention[:, :, 0, 1:].sum(dim=1) if first.has_cls else None,
        received_attention=attention.mean(dim=1).mean(dim=1),
        keys=torch.stack([u.keys for u in unit_signals]),
        seeds=pixel_seeds(torch.stack([u.pixels for u in unit_signals])),
    )


@pytest.fixture(scope="module")
def clip_units():
    """Signals of 3 images at layer -2 of a tiny CLIP tower: 4 x 4 patches + CLS."""
    model, _, _ = build_tiny(TinySpec(image_size=56, patch_size=14, vision_layers=3, vision_hidden=32))
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    return ref.tower_signals(vision_tower(model), pixels, -2)


def test_the_registry_names_six_compressors_each_with_its_source():
    assert list(COMPRESSORS) == ["visionzip", "random", "pool", "divprune", "vispruner", "prumerge_plus"]
    assert all(compressor.source for compressor in COMPRESSORS.values())
    with pytest.raises(ValueError, match="no compressor named 'topk'; the compressors are visionzip, random"):
        compressor_named("topk")


def test_visionzip_as_a_compressor_is_compress_py_exactly(clip_units):
    signals = signals_of(clip_units)
    result = COMPRESSORS["visionzip"].compress(signals, {"dominant": 5, "contextual": 2})
    metric, scores = signals.keys, signals.cls_attention
    expected = compress.select_and_merge(signals.hidden, metric, scores, dominant=5, contextual=2, has_cls=True)
    for field in ("tokens", "dominant_indices", "contextual_indices", "groups"):
        assert torch.equal(getattr(result, field), getattr(expected, field))


# ---------------------------------------------------------------------------------------------------------------
# random


def test_random_keeps_the_patches_its_stated_hash_ranks_first(clip_units):
    signals = signals_of(clip_units)
    result = COMPRESSORS["random"].compress(signals, {"tokens": 5, "seed": 3, "resample": False})
    for b, unit in enumerate(clip_units):
        kept = ref.random_kept(unit.pixels, 16, 5, seed=3)
        assert result.dominant_indices[b].tolist() == [j + 1 for j in kept]  # CLS is position 0, never kept
        assert torch.equal(result.tokens[b], unit.hidden[[j + 1 for j in kept]])
    assert (result.groups[:, 0] == DROPPED).all() and ((result.groups == DOMINANT).sum(dim=1) == 5).all()


def test_random_is_the_same_for_the_same_image_in_any_dtype_and_differs_with_the_seed():
    large = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(2))  # hashed every 7th value
    assert pixel_seeds(large).tolist() == [ref.pixel_seed(large[0])]
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    assert torch.equal(pixel_seeds(pixels), pixel_seeds(pixels.to(torch.bfloat16)))
    assert pixel_seeds(pixels)[0] != pixel_seeds(pixels)[1]
    hidden = torch.randn(2, 17, 8)

    def kept(seed, resample=False, images=pixels):
        signals = Signals(hidden, has_cls=True, seeds=pixel_seeds(images))
        params = {"tokens": 6, "seed": seed, "resample": resample}
        return COMPRESSORS["random"].compress(signals, params).dominant_indices

    assert torch.equal(kept(0), kept(0)) and not torch.equal(kept(0), kept(1))
    torch.manual_seed(0)
    first = kept(0, resample=True)
    assert not torch.equal(first, kept(0, resample=True))  # a new draw at every call


# ---------------------------------------------------------------------------------------------------------------
# pool


def test_pool_bins_by_the_stated_floor_rule():
    assert bins(4, 4, 2).view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert bins(5, 5, 2).view(5, 5)[:, 0].tolist() == [0, 0, 0, 2, 2]  # floor(r * 2 / 5): 0, 0, 0, 1, 1


@pytest.mark.parametrize("rows, columns, tokens", [(4, 4, 4), (5, 5, 4), (3, 5, 9), (4, 4, 16)])
def test_pool_rows_are_bin_means(rows, columns, tokens):
    hidden = torch.randn(2, 1 + rows * columns, 6)
    result = COMPRESSORS["pool"].compress(Signals(hidden, has_cls=True, grid=(rows, columns)), {"tokens": tokens})
    side = int(tokens**0.5)
    for b in range(2):
        expected, patch_bins = ref.pool_rows(hidden[b, 1:], rows, columns, side)
        torch.testing.assert_close(result.tokens[b], expected, **TOL)
        assert result.groups[b, 1:].tolist() == patch_bins and result.groups[b, 0] == DROPPED
        # each row stands at its bin's first (top-left) patch
        assert result.contextual_indices[b].tolist() == [1 + patch_bins.index(k) for k in range(tokens)]
    assert result.dominant_indices.shape == (2, 0)


def test_pool_refuses_a_budget_that_is_not_a_square_or_exceeds_the_grid():
    pool = COMPRESSORS["pool"]
    with pytest.raises(ValueError, match="tokens=8 is not a square"):
        pool.resolve({"tokens": 8})
    with pytest.raises(ValueError, match="a 4 x 4 grid of rows from a 3 x 6 patch grid"):
        pool.compress(Signals(torch.randn(1, 19, 4), has_cls=True, grid=(3, 6)), {"tokens": 16})


# ---------------------------------------------------------------------------------------------------------------
# divprune, vispruner, prumerge_plus


def test_divprune_hand_checkable():
    # Patches 0 and 1 are near-duplicates, 2 is orthogonal to both, 3 is the opposite of 0. Nearest other patch:
    # 0 and 1 about 0.005 away, 2 about 0.9 (from 1), 3 exactly 1 (from 2): 3 is kept first. Then the patch
    # farthest from 3: 0 (distance 2), ahead of 1 (1.99) and 2 (1).
    features = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    result = COMPRESSORS["divprune"].compress(Signals(features[None], has_cls=False), {"tokens": 2})
    assert result.dominant_indices.tolist() == [[0, 3]] == [ref.divprune_kept(features, 2)]


@pytest.mark.parametrize("tokens", [1, 4, 9])
def test_divprune_equals_the_greedy_max_min_rule(clip_units, tokens):
    result = COMPRESSORS["divprune"].compress(signals_of(clip_units), {"tokens": tokens})
    for b, unit in enumerate(clip_units):
        assert result.dominant_indices[b].tolist() == [j + 1 for j in ref.divprune_kept(unit.patches, tokens)]


@pytest.mark.parametrize("tokens, ratio", [(4, 0.5), (10, 0.5), (7, 0.25), (6, 1.0), (3, 0.0)])
def test_vispruner_equals_important_then_diverse(clip_units, tokens, ratio):
    result = COMPRESSORS["vispruner"].compress(signals_of(clip_units), {"tokens": tokens, "important_ratio": ratio})
    for b, unit in enumerate(clip_units):
        kept = ref.vispruner_kept(unit.patches, unit.cls_attention_mean, tokens, ratio)
        assert result.dominant_indices[b].tolist() == [j + 1 for j in kept]
        assert torch.equal(result.tokens[b], unit.hidden[[j + 1 for j in kept]])


@pytest.mark.parametrize("tokens, neighbours", [(5, 32), (9, 4), (2, 3)])
def test_prumerge_plus_equals_its_fixed_k_rule(clip_units, tokens, neighbours):
    signals = signals_of(clip_units)
    result = COMPRESSORS["prumerge_plus"].compress(signals, {"tokens": tokens, "neighbours": neighbours})
    for b, unit in enumerate(clip_units):
        rows, kept = ref.prumerge_rows(unit.patches, unit.cls_attention_mean, unit.keys[1:], tokens, neighbours)
        assert result.dominant_indices[b].tolist() == [j + 1 for j in kept]
        torch.testing.assert_close(result.tokens[b], rows, **TOL)
        pruned = [j + 1 for j in range(16) if j not in kept]
        assert result.groups[b, pruned].tolist() == [0] * len(pruned)  # all in the extra row


@pytest.mark.parametrize("name", [name for name in COMPRESSORS if name != "visionzip"])
def test_combine_remakes_the_rows_from_other_hidden_states(clip_units, name):
    """What a feature cache relies on: the selection of one run makes the rows of any hidden states of the same
    positions, as compress would with those hidden states and the same signals."""
    compressor = COMPRESSORS[name]
    params = compressor.resolve({"tokens": 4})
    signals = signals_of(clip_units)
    selection = compressor.compress(signals, params)
    other = torch.randn_like(signals.hidden)
    moved = Signals(
        other,
        features=signals.features,
        has_cls=True,
        grid=signals.grid,
        heads=signals.heads,
        cls_attention=signals.cls_attention,
        received_attention=signals.received_attention,
        keys=signals.keys,
        seeds=signals.seeds,
    )
    assert torch.equal(compressor.combine(other, selection), compressor.compress(moved, params).tokens)


def test_compressors_read_only_the_signals_they_declare():
    hidden = torch.randn(1, 17, 4)
    bare = Signals(hidden, has_cls=True, grid=(4, 4))  # no attention, keys or seeds
    for name in ("pool", "divprune"):
        COMPRESSORS[name].compress(bare, {"tokens": 4})
    for name, params in (
        ("vispruner", {"tokens": 4, "important_ratio": 0.5}),
        ("random", {"tokens": 4, "seed": 0, "resample": False}),
    ):
        assert COMPRESSORS[name].needs(True) - {GRID}
        with pytest.raises(ValueError, match="this tower gives no"):
            COMPRESSORS[name].compress(bare, params)


def test_parameters_are_checked_with_their_names():
    with pytest.raises(ValueError, match="the divprune compressor takes tokens, not seed"):
        compressor_named("divprune").resolve({"tokens": 4, "seed": 1})
    with pytest.raises(ValueError, match="the pool compressor needs tokens"):
        compressor_named("pool").resolve({})
    with pytest.raises(ValueError, match="vispruner: important_ratio must be a number in"):
        compressor_named("vispruner").resolve({"tokens": 4, "important_ratio": 2})
    with pytest.raises(ValueError, match="tokens=20 rows per unit, but a unit has only 16 patches"):
        compressor_named("random").fits({"tokens": 20}, 17, has_cls=True)
