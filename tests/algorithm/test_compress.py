"""compress.py on tensors small enough to check by hand, plus parity with the from-spec reference."""

from __future__ import annotations

import math

import pytest
import torch

from reference_visionzip import zip_one
from visionzip_tune.algorithm import compress


def test_budget_validation_names_the_numbers():
    compress.validate_budget(54, 10, 577)
    compress.validate_budget(1, 0, 1)
    compress.validate_budget(500, 77, 577)  # D + C == N is allowed
    for dominant, contextual in [(0, 10), (54, -1), (500, 78), (578, 0)]:
        with pytest.raises(ValueError, match=rf"dominant={dominant}, contextual={contextual} for N=577"):
            compress.validate_budget(dominant, contextual, 577)
    for bad in [(54.0, 10), (54, True), ("54", 10)]:
        with pytest.raises(ValueError, match="must be an int"):
            compress.validate_budget(*bad, 577)


def test_key_metric_averages_heads():
    keys = torch.tensor([[[1.0, 2.0, 3.0, 6.0]]])  # B=1, N=1, 2 heads of size 2
    assert compress.key_metric(keys, num_heads=2).tolist() == [[[2.0, 4.0]]]


def test_cls_scores_by_hand():
    # 1 head of size 1, scale 1: CLS logits over keys [0, ln 2, 0] -> softmax [1/4, 1/2, 1/4]; patches are 1..2.
    cls_query = torch.tensor([[1.0]])
    keys = torch.tensor([[[0.0], [math.log(2.0)], [0.0]]])
    scores = compress.cls_attention_scores(cls_query, keys, num_heads=1, scale=1.0)
    torch.testing.assert_close(scores, torch.tensor([[0.5, 0.25]]))
    # Two identical heads: the per-head rows are summed, not averaged.
    scores2 = compress.cls_attention_scores(cls_query.repeat(1, 2), keys.repeat(1, 1, 2), num_heads=2, scale=1.0)
    torch.testing.assert_close(scores2, torch.tensor([[1.0, 0.5]]))


def test_received_scores_by_hand_and_chunk_invariant():
    # Queries [1], [0]; keys [ln 3], [0]: row 0 = [3/4, 1/4], row 1 = [1/2, 1/2]; received = mean over rows.
    queries = torch.tensor([[[1.0], [0.0]]])
    keys = torch.tensor([[[math.log(3.0)], [0.0]]])
    scores = compress.received_attention_scores(queries, keys, num_heads=1, scale=1.0)
    torch.testing.assert_close(scores, torch.tensor([[5 / 8, 3 / 8]]))

    torch.manual_seed(0)
    queries, keys = torch.randn(2, 50, 16), torch.randn(2, 50, 16)
    whole = compress.received_attention_scores(queries, keys, num_heads=4, scale=0.5)
    chunked = compress.received_attention_scores(queries, keys, num_heads=4, scale=0.5, chunk_elements=7)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(whole.sum(dim=-1), torch.ones(2))  # each query's row sums to 1


def test_dominant_positional_order_and_ties():
    # With CLS: patch scores for positions 1..4; the two tied 0.5s win, CLS is always kept.
    with_cls = compress.select_dominant(torch.tensor([[0.1, 0.5, 0.5, 0.2]]), dominant=3, has_cls=True)
    assert with_cls.tolist() == [[0, 2, 3]]
    # A three-way tie for one slot goes to the lowest position.
    assert compress.select_dominant(torch.tensor([[0.5, 0.5, 0.5]]), 2, has_cls=True).tolist() == [[0, 1]]
    # Without CLS: positional order, not score order; dominant=1 with CLS keeps only CLS.
    assert compress.select_dominant(torch.tensor([[0.1, 0.2, 0.9]]), 2, has_cls=False).tolist() == [[1, 2]]
    assert compress.select_dominant(torch.tensor([[0.3, 0.9, 0.1, 0.9]]), 2, has_cls=False).tolist() == [[1, 3]]
    assert compress.select_dominant(torch.tensor([[0.3, 0.9]]), 1, has_cls=True).tolist() == [[0]]


def test_take_tokens_per_image_rows():
    x = torch.arange(2 * 4 * 1.0).view(2, 4, 1)  # image 0 holds 0..3, image 1 holds 4..7
    assert compress.take_tokens(x, torch.tensor([[3, 0], [1, 2]])).tolist() == [[[3.0], [0.0]], [[5.0], [6.0]]]


def test_remaining_positions_in_order():
    kept = torch.tensor([[0, 2, 5], [1, 3, 4]])
    assert compress.remaining_positions(kept, 6).tolist() == [[1, 3, 4], [0, 2, 5]]


@pytest.mark.parametrize(
    "remaining, contextual, targets",
    [(10, 3, [0, 3, 6]), (7, 2, [0, 3]), (5, 5, [0, 1, 2, 3, 4]), (6, 4, [0, 1, 2, 3]), (4, 0, [])],
)
def test_stride_targets(remaining, contextual, targets):
    got_targets, merged = compress.contextual_targets(remaining, contextual)
    assert got_targets == targets
    assert merged == [i for i in range(remaining) if i not in targets]


def test_merge_by_hand():
    # R=4, C=2 -> step 2, targets at 0 and 2; token 1 leans to target 0, token 3 to target 2.
    metric = torch.tensor([[[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.1, 3.0]]])
    hidden = torch.tensor([[[1.0], [10.0], [100.0], [1000.0]]])
    merged, targets, groups = compress.merge_contextual(hidden, metric, contextual=2)
    assert targets.tolist() == [0, 2]
    assert groups.tolist() == [[0, 0, 1, 1]]  # each target in its own group
    assert merged.tolist() == [[[11.0], [1100.0]]]  # target + mean of assigned, target not in the mean


def test_merge_mean_empty_target_and_tie():
    # R=5, C=2 -> step 2, targets 0 and 2; tokens 1, 3, 4. Token 1 is equally close to both -> first target;
    # token 3 and 4 also go to target 0, so target 2 gets nobody and stays as it is.
    metric = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [5.0, 0.0], [2.0, 0.1]]])
    hidden = torch.tensor([[[1.0], [10.0], [100.0], [20.0], [30.0]]])
    merged, _, _ = compress.merge_contextual(hidden, metric, contextual=2)
    assert merged.tolist() == [[[1.0 + 20.0], [100.0]]]  # mean(10, 20, 30) = 20


def test_contextual_zero_and_full_budget():
    torch.manual_seed(0)
    hidden, queries, keys = torch.randn(3, 2, 9, 8).unbind(0)
    args = dict(num_heads=2, scale=0.5, has_cls=True)
    only_dominant = compress.visionzip(hidden, queries, keys, dominant=4, contextual=0, **args)
    assert only_dominant.tokens.shape == (2, 4, 8)
    assert only_dominant.contextual_indices.shape == (2, 0)
    dropped = only_dominant.groups == compress.DROPPED
    assert (only_dominant.groups[~dropped] == compress.DOMINANT).all() and dropped.sum(1).tolist() == [5, 5]
    kept = only_dominant.dominant_indices[..., None].expand(-1, -1, 8)
    assert torch.equal(only_dominant.tokens, hidden.gather(1, kept))
    # D + C == N: nothing is merged, so every token survives unchanged (dominant ones first).
    everything = compress.visionzip(hidden, queries, keys, dominant=4, contextual=5, **args)
    order = torch.cat([everything.dominant_indices, everything.contextual_indices], dim=1)
    assert sorted(order[0].tolist()) == list(range(9))
    assert torch.equal(everything.tokens, hidden.gather(1, order[..., None].expand(-1, -1, 8)))


def test_invalid_budget_raises_from_visionzip():
    hidden = torch.zeros(1, 5, 4)
    with pytest.raises(ValueError, match="dominant=4, contextual=2 for N=5"):
        compress.visionzip(hidden, hidden, hidden, num_heads=1, scale=1.0, dominant=4, contextual=2, has_cls=True)


def _attention(queries, keys, heads, scale):
    q = queries.view(*queries.shape[:2], heads, -1).transpose(1, 2)
    k = keys.view(*keys.shape[:2], heads, -1).transpose(1, 2)
    return (q @ k.transpose(-1, -2) * scale).softmax(dim=-1)  # (B, H, N, N)


@pytest.mark.parametrize("has_cls", [True, False])
@pytest.mark.parametrize("dominant, contextual", [(10, 4), (1, 3), (7, 0), (20, 13)])
def test_matches_reference_batched(has_cls, dominant, contextual):
    torch.manual_seed(dominant * 100 + contextual)
    batch, tokens, heads, width = 3, 33, 4, 32
    hidden, queries, keys = torch.randn(3, batch, tokens, width).unbind(0)
    scale = (width // heads) ** -0.5
    result = compress.visionzip(
        hidden, queries, keys, num_heads=heads, scale=scale, dominant=dominant, contextual=contextual, has_cls=has_cls
    )
    assert result.tokens.shape == (batch, dominant + contextual, width)
    attention = _attention(queries, keys, heads, scale)
    metric = compress.key_metric(keys, heads)
    for b in range(batch):
        expected, kept, targets = zip_one(hidden[b], attention[b], metric[b], dominant, contextual, has_cls)
        assert result.dominant_indices[b].tolist() == kept
        assert result.contextual_indices[b].tolist() == targets
        torch.testing.assert_close(result.tokens[b], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("has_cls", [True, False])
def test_groups_and_scores_say_what_became_of_every_position(has_cls):
    torch.manual_seed(3)
    hidden, queries, keys = torch.randn(3, 2, 17, 8).unbind(0)
    result = compress.visionzip(
        hidden, queries, keys, num_heads=2, scale=0.5, dominant=5, contextual=3, has_cls=has_cls
    )
    assert result.scores.shape == (2, 16 if has_cls else 17)
    for b in range(2):
        groups = result.groups[b]
        assert (groups == compress.DOMINANT).nonzero().flatten().tolist() == result.dominant_indices[b].tolist()
        for c, target in enumerate(result.contextual_indices[b].tolist()):
            assert groups[target] == c
            others = [p for p in (groups == c).nonzero().flatten().tolist() if p != target]
            expected = hidden[b, target] + (hidden[b, others].mean(0) if others else 0)
            torch.testing.assert_close(result.tokens[b, 5 + c], expected)
        picked = result.dominant_indices[b, int(has_cls) :] - int(has_cls)  # the patches chosen by score
        assert result.scores[b, picked].min() >= result.scores[b].sort(descending=True).values[len(picked) - 1]


def test_low_precision_hidden_keeps_dtype():
    torch.manual_seed(0)
    hidden, queries, keys = torch.randn(3, 2, 17, 8, dtype=torch.bfloat16).unbind(0)
    result = compress.visionzip(hidden, queries, keys, num_heads=2, scale=0.5, dominant=5, contextual=3, has_cls=True)
    assert result.tokens.dtype == torch.bfloat16
    assert result.tokens.shape == (2, 8, 8)
