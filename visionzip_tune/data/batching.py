"""Batches: a padding collator (training's, which evaluation shares) and a deterministic, sharded, resumable sampler
grouped like LLaVA's."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from visionzip_tune.data.template import IGNORE_INDEX
from visionzip_tune.errors import UserError


class Collator:
    """Pads a list of examples into a batch: on the right (training, scoring), or on the left (``padding_side="left"``,
    generation: every row's next token is then the batch's next column).

    Returns ``input_ids`` (B, T) padded with ``pad_token_id``, ``attention_mask`` (B, T) from the true lengths (not
    from ``input_ids != pad``, which would hide a real ``<unk>`` when pad = unk as in LLaVA), ``labels`` (B, T)
    padded with -100, ``ids``, and every vision input of the items concatenated over the batch in item order:
    ``pixel_values`` (all images, (n, 3, H, W), or (n, crops, 3, S, S) zero-padded on the crop axis to the batch's
    most crops), ``image_sizes`` (n, 2), ``batch_num_images`` (images per image-bearing item), ``pixel_values_videos``
    (videos, T, 3, S, S). A key is absent when no item has it.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, items: Sequence[dict]) -> dict:
        width = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            columns = slice(width - n, width) if self.padding_side == "left" else slice(0, n)
            input_ids[row, columns] = item["input_ids"]
            labels[row, columns] = item["labels"]
            attention_mask[row, columns] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        batch.update(collate_vision([item["vision"] for item in items]))
        batch["ids"] = [item["id"] for item in items]
        return batch


def collate_vision(visions: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every vision input of ``visions`` (the items' ``vision`` dicts) concatenated over them in item order, as
    :class:`Collator` batches them; a key is absent when no item has it."""
    keys = dict.fromkeys(key for vision in visions for key in vision)  # first-seen order, no repeats
    return {key: _concat([vision[key] for vision in visions if key in vision]) for key in keys}


def _concat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate on dim 0; 5-D anyres pixel values (n, crops, 3, S, S) are zero-padded to the most crops first
    (the models read each image's real crop count from its size and drop the padding)."""
    if tensors[0].dim() == 5:
        crops = max(t.shape[1] for t in tensors)
        tensors = [torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 0, 0, crops - t.shape[1])) for t in tensors]
    return torch.cat(tensors)


def _megabatches(indices: list[int], lengths: Sequence[int], size: int, g: torch.Generator) -> list[list[int]]:
    """Shuffle ``indices``, cut them into groups of ``size``, sort each group longest first."""
    shuffled = [indices[p] for p in torch.randperm(len(indices), generator=g).tolist()]
    return [sorted(shuffled[k : k + size], key=lambda i: -abs(lengths[i])) for k in range(0, len(shuffled), size)]


def _split_even(megabatch: list[int], lengths: Sequence[int], n: int) -> list[list[int]]:
    """Deal a longest-first megabatch into ``n`` equal-size chunks, each item to the chunk with least total length."""
    per_chunk = len(megabatch) // n
    chunks: list[list[int]] = [[] for _ in range(n)]
    totals = [0] * n
    for i in megabatch:
        k = min((k for k in range(n) if len(chunks[k]) < per_chunk), key=lambda k: totals[k])
        chunks[k].append(i)
        totals[k] += abs(lengths[i])
    return chunks


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """This rank's sample indices for one epoch, in micro-batch order; use with ``batch_size=micro_batch_size``.

    An epoch is a list of megabatches of ``num_replicas * micro_batch_size`` indices; rank r takes the r-th
    micro-batch of each, so ranks get disjoint slices and the same number of batches (the last megabatch is
    completed with indices from the start of the epoch). The order is a pure function of (seed, epoch).

    ``group_by_modality=True`` follows LLaVA's ``group_by_modality_length``: samples with images (length > 0) and
    text-only samples (length < 0) are shuffled and grouped into megabatches separately, each megabatch is sorted
    by length and dealt into micro-batches of similar total length, and the megabatches are shuffled; the partial
    megabatches of both pools form the mixed last one(s). ``False``: a plain seeded shuffle.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        micro_batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        group_by_modality: bool = True,
    ):
        if not lengths:
            raise ValueError("no samples to sample from")
        if micro_batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"bad sampler geometry: micro_batch_size={micro_batch_size}, rank {rank} of {num_replicas}"
            )
        if group_by_modality and any(length == 0 for length in lengths):
            raise ValueError("lengths must be non-zero: positive with images, negative for text-only")
        self.lengths = list(lengths)
        self.micro_batch_size = micro_batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.group_by_modality = group_by_modality
        self.epoch = 0
        self.start = 0
        megabatch = micro_batch_size * num_replicas
        self.num_batches = -(-len(self.lengths) // megabatch)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order; ``start`` skips that many of this rank's samples (a mid-epoch resume)."""
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return self.num_batches * self.micro_batch_size - self.start

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_order()[self.start :])

    def rank_order(self) -> list[int]:
        """All of this rank's indices for the current epoch (ignoring ``start``)."""
        return [i for megabatch in self.epoch_megabatches() for i in megabatch[self.rank]]

    def epoch_megabatches(self) -> list[list[list[int]]]:
        """The epoch as ``[megabatch][rank] -> micro-batch of indices``."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        size = self.micro_batch_size * self.num_replicas
        if self.group_by_modality:
            pools = [
                [i for i, n in enumerate(self.lengths) if n > 0],
                [i for i, n in enumerate(self.lengths) if n < 0],
            ]
            full, partial = [], []
            for pool in pools:
                for mb in _megabatches(pool, self.lengths, size, g) if pool else []:
                    (full if len(mb) == size else partial).append(mb)
            full = [full[k] for k in torch.randperm(len(full), generator=g).tolist()]
            rest = sorted((i for mb in partial for i in mb), key=lambda i: -abs(self.lengths[i]))
            groups = full + [rest[k : k + size] for k in range(0, len(rest), size)]
        else:
            order = torch.randperm(len(self.lengths), generator=g).tolist()
            groups = [order[k : k + size] for k in range(0, len(order), size)]
        head = [i for group in groups for i in group]
        need = size - len(groups[-1])
        groups[-1] = groups[-1] + [head[k % len(head)] for k in range(need)]
        return [self._deal(group) for group in groups]

    def _deal(self, megabatch: list[int]) -> list[list[int]]:
        if self.group_by_modality:
            return _split_even(megabatch, self.lengths, self.num_replicas)
        mb = self.micro_batch_size
        return [megabatch[r * mb : (r + 1) * mb] for r in range(self.num_replicas)]

    def state_dict(self, consumed: int) -> dict:
        """Resume state after this rank took ``consumed`` samples of the current epoch (counting from its start)."""
        return {
            "epoch": self.epoch,
            "consumed": consumed,
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "micro_batch_size": self.micro_batch_size,
            "num_samples": len(self.lengths),
            "group_by_modality": self.group_by_modality,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` left off; the sampling geometry must be unchanged."""
        mine = self.state_dict(0)
        fixed = [k for k in mine if k not in ("epoch", "consumed")]
        changed = [f"{k} {state[k]} -> {mine[k]}" for k in fixed if state[k] != mine[k]]
        if changed:
            raise UserError(
                "cannot resume the data order: the sampler changed since the checkpoint (" + ", ".join(changed) + "); "
                "resume with the same data, seed, number of processes and micro-batch size"
            )
        self.set_epoch(state["epoch"], state["consumed"])
