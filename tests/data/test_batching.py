"""LengthGroupedSampler: deterministic per (seed, epoch), disjoint equal shards, LLaVA modality grouping, resume."""

from __future__ import annotations

import random

import pytest

from visionzip_tune.data import LengthGroupedSampler
from visionzip_tune.errors import UserError


def mixed_lengths(n=203, text_share=0.15, seed=0):
    rng = random.Random(seed)
    return [rng.randint(5, 400) * (-1 if rng.random() < text_share else 1) for _ in range(n)]


def shards(lengths, mb, world, **kwargs):
    return [LengthGroupedSampler(lengths, mb, world, rank, **kwargs) for rank in range(world)]


@pytest.mark.parametrize("group", [True, False])
def test_ranks_get_disjoint_equal_shards_covering_every_sample(group):
    lengths = mixed_lengths()
    samplers = shards(lengths, 4, 3, seed=1, group_by_modality=group)
    orders = [list(s) for s in samplers]
    assert {len(o) for o in orders} == {len(samplers[0])} and len(orders[0]) % 4 == 0
    assert len(orders[0]) == 4 * -(-len(lengths) // 12)
    everything = [i for o in orders for i in o]
    assert set(everything) == set(range(len(lengths)))
    assert len(everything) - len(set(everything)) == 12 * -(-len(lengths) // 12) - len(lengths)  # only the padding


def test_order_is_a_function_of_seed_and_epoch():
    lengths = mixed_lengths()
    a, b = LengthGroupedSampler(lengths, 4, 2, 1, seed=5), LengthGroupedSampler(lengths, 4, 2, 1, seed=5)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(LengthGroupedSampler(lengths, 4, 2, 1, seed=6)) != list(LengthGroupedSampler(lengths, 4, 2, 1, seed=5))


def test_modality_grouping_keeps_micro_steps_single_modality_and_lengths_similar():
    lengths = mixed_lengths(n=400)
    sampler = LengthGroupedSampler(lengths, 4, 2, 0, seed=3, group_by_modality=True)
    megabatches = sampler.epoch_megabatches()
    modality = [{lengths[i] > 0 for chunk in mb for i in chunk} for mb in megabatches]
    assert sum(len(m) > 1 for m in modality) <= 1  # only the last, built from both pools' leftovers, may mix
    assert all(len(m) == 1 for m in modality[:-1])

    # Dealing each length-sorted megabatch to the lightest rank evens out the tokens per rank at every step.
    def imbalance(s):
        return sum(
            max(totals) - min(totals)
            for mb in s.epoch_megabatches()
            for totals in [[sum(abs(lengths[i]) for i in c) for c in mb]]
        )

    plain = LengthGroupedSampler(lengths, 4, 2, 0, seed=3, group_by_modality=False)
    assert imbalance(sampler) < imbalance(plain) / 3


def test_even_split_balances_total_length_across_ranks():
    lengths = [400, 300, 200, 100, 90, 80, 70, 60]
    sampler = LengthGroupedSampler(lengths, 4, 2, 0, seed=0)
    (chunks,) = sampler.epoch_megabatches()
    # Longest first, each to the lighter rank that still has room: 400 | 300, 200 | 100 (tie: rank 0), 90 | 80, 70
    # | 60 (rank 1 is full).
    assert chunks == [[0, 3, 4, 7], [1, 2, 5, 6]]
    assert [sum(lengths[i] for i in c) for c in chunks] == [650, 650]


def test_resume_continues_the_same_order():
    lengths = mixed_lengths()
    full = LengthGroupedSampler(lengths, 4, 2, 1, seed=9)
    full.set_epoch(2)
    expected = list(full)
    state = full.state_dict(consumed=24)
    assert state["epoch"] == 2 and state["consumed"] == 24
    resumed = LengthGroupedSampler(lengths, 4, 2, 1, seed=9)
    resumed.load_state_dict(state)
    assert list(resumed) == expected[24:] and len(resumed) == len(expected) - 24
    resumed.set_epoch(3)
    assert len(list(resumed)) == len(expected)


def test_resume_with_changed_geometry_is_refused():
    lengths = mixed_lengths()
    state = LengthGroupedSampler(lengths, 4, 2, 0, seed=9).state_dict(consumed=8)
    with pytest.raises(UserError, match="num_replicas 2 -> 4"):
        LengthGroupedSampler(lengths, 4, 4, 0, seed=9).load_state_dict(state)


def test_fewer_samples_than_one_megabatch_still_fills_every_rank():
    samplers = shards([3, -2, 5], 4, 2, seed=0)
    taken = [list(s) for s in samplers]
    assert [len(t) for t in taken] == [4, 4]
    assert set(taken[0] + taken[1]) == {0, 1, 2}  # every sample, some twice to fill the megabatch


def test_bad_arguments():
    with pytest.raises(ValueError, match="non-zero"):
        LengthGroupedSampler([1, 0, -1], 2)
    with pytest.raises(ValueError, match="rank 2 of 2"):
        LengthGroupedSampler([1, 2], 2, 2, 2)
    with pytest.raises(ValueError, match="no samples"):
        LengthGroupedSampler([], 2)
