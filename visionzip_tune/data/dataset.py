"""``SupervisedDataset``: loaded samples -> tokenized, label-masked examples with their vision inputs.

Bad samples follow one policy (``on_bad_sample``): structural problems are known from loading and handled up front;
an unreadable image or video is only found when the sample is opened, so ``__getitem__`` then substitutes the next good
sample (every rank keeps the same number of batches, no worker dies). Samples too long to fit are always dropped.
Every drop is counted and, with ``skip_log``, appended to that file as ``{"id", "reason"}`` lines.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow.compute as pc
import torch

from visionzip_tune.data.config import DataConfig
from visionzip_tune.data.media import FileMedia, MediaSource
from visionzip_tune.data.processing import Processing
from visionzip_tune.data.source import column, data_path
from visionzip_tune.data.template import Templater, TooLong, fit_to_length, llava_turns
from visionzip_tune.data.validate import BadSample, row_video
from visionzip_tune.errors import UserError

_LISTED = 10  # bad samples named in an error message before "... and N more"
# The reasons a summary counts apart from "malformed".
_KINDS = ("missing image", "unreadable image", "missing video", "unreadable video", "too long")


def modality_lengths(samples) -> list[int]:
    """LLaVA's ``modality_lengths``: words over all turns, negative for text-only samples (never 0); a sample with
    images or a video is multimodal (positive)."""
    table = samples.with_format("arrow")[:]
    words = []
    for turns in table.column("conversations").chunks:  # chunk by chunk: the text is never copied whole
        per_turn = pc.count_substring_regex(pc.struct_field(pc.list_flatten(turns), "value"), pattern=r"\S+")
        parents = pc.list_parent_indices(turns).to_numpy(zero_copy_only=False)
        words.append(np.bincount(parents, weights=per_turn.to_numpy(zero_copy_only=False), minlength=len(turns)))
    per_sample = np.maximum(np.concatenate(words).astype(np.int64), 1) if words else np.zeros(0, np.int64)
    has_image = pc.list_value_length(table.column("images")).to_numpy(zero_copy_only=False) > 0
    has_frames = pc.list_value_length(table.column("frame_files")).to_numpy(zero_copy_only=False) > 0
    has_file = pc.is_valid(table.column("video_file")).to_numpy(zero_copy_only=False)
    return np.where(has_image | has_frames | has_file, per_sample, -per_sample).tolist()


def refuse_unusable(samples) -> None:
    """:class:`UserError` listing the structurally unusable samples of loaded ``samples`` (the first few), if any:
    what ``data.on_bad_sample=error`` refuses before training starts."""
    problems = column(samples, "problem")
    bad = [r for r, p in enumerate(problems) if p is not None]
    if bad:
        ids = column(samples.select(bad[:_LISTED]), "id")
        listed = "; ".join(f"id {i}: {problems[r]}" for i, r in zip(ids, bad))
        more = f"; ... and {len(bad) - _LISTED} more" if len(bad) > _LISTED else ""
        raise UserError(
            f"{data_path(samples)}: {len(bad)} unusable sample(s): {listed}{more}. Fix them, or set "
            "data.on_bad_sample=skip to leave them out (run `python -m visionzip_tune data check` for the full list)."
        )


class Placeholders(NamedTuple):
    """A model's placeholder ids and token-count functions -- the model's own (``build.placeholders(config)``), so
    data and model cannot disagree.

    ``image_tokens(sizes)`` gives the placeholder count of each image of one sample from the sizes
    ``MediaTransform.images`` reports ((height, width) as the image processor saw it; Qwen: its patch grid);
    ``video_tokens(size, times)`` what a video becomes in the text, from the size ``MediaTransform.video_inputs``
    reports and its frames' times in seconds: its placeholder count, or runs of placeholders (ints) between texts
    (Qwen3-VL: a run per frame after its timestamp) -- None for a model without video input, whose video samples
    are then bad samples; ``video_timing(size, times)`` the inputs the model takes about a video besides its
    pixels (Qwen2.5-VL: ``second_per_grid_ts``), None for none.
    """

    image_tokens: Callable[[list[tuple[int, ...]]], list[int]]
    image_token_id: int
    video_tokens: Callable[[int | tuple[int, ...], list[float]], int | list[str | int]] | None = None
    video_token_id: int | None = None
    video_timing: Callable[[int | tuple[int, ...], list[float]], dict[str, torch.Tensor]] | None = None


class SupervisedDataset(torch.utils.data.Dataset):
    """Map-style dataset of ``{"id", "input_ids", "labels", "vision"}``.

    ``vision``: the model inputs of the sample's images (:meth:`MediaTransform.images`: ``pixel_values`` and, from
    anyres processors, ``image_sizes`` / ``batch_num_images``, from grid processors ``image_grid_thw``) and, for a video
    sample, its :meth:`MediaTransform.video_inputs` (``pixel_values_videos`` (1, T, 3, S, S), or Qwen's patches and
    ``video_grid_thw``) with its timing inputs; ``{}`` for a text-only sample. Each image becomes exactly as many
    placeholder ids as the model's count function says (``placeholders``), each video likewise.

    ``data`` gives the template, image aspect, frames per video, token limit, bad-sample policy and folders
    (``image_folder`` overrides ``data.image_folder``, for a held-out set with its own images; videos are read from
    ``data.video_folder``, default the image folder). ``processing.chat_template`` overrides the tokenizer's for
    ``template="chat_template"`` (processors often carry the chat template instead of their tokenizer). ``media``
    gives each sample's vision inputs: by default :class:`FileMedia` (the files, decoded and processed); a feature
    cache's instead holds the frozen part of their features (``visionzip_tune.feature_cache``).
    """

    def __init__(
        self,
        samples,
        data: DataConfig,
        processing: Processing,
        placeholders: Placeholders,
        *,
        image_folder: str | Path | None = None,
        skip_log: str | Path | None = None,
        media: MediaSource | None = None,
    ):
        if (placeholders.video_tokens is None) != (placeholders.video_token_id is None):
            raise ValueError("give both video_tokens and video_token_id (a model with video input), or neither")
        self.samples = samples
        self.path = data_path(samples)
        files = FileMedia.for_data(data, processing.image_processor, image_folder=image_folder, data_path=self.path)
        self.image_folder = files.image_folder
        self.media = files if media is None else media
        self.templater = Templater(
            processing.tokenizer,
            data.template,
            placeholders.image_token_id,
            processing.chat_template,
            placeholders.video_token_id,
        )
        self.placeholders = placeholders
        self.max_length = data.max_length
        self.on_bad_sample = data.on_bad_sample
        self.skip_log = Path(skip_log) if skip_log is not None else None
        self._skipped: dict[str, str] = {}
        self.rows = self._usable_rows()
        lengths = modality_lengths(samples)
        self.lengths = [lengths[r] for r in self.rows]

    def _usable_rows(self) -> list[int]:
        problems = column(self.samples, "problem")
        bad = [r for r, p in enumerate(problems) if p is not None]
        if self.on_bad_sample == "error":
            refuse_unusable(self.samples)
        for r in bad:
            self._record_skip(self.samples[r]["id"], problems[r])
        if len(bad) == len(problems):
            raise UserError(f"{self.path}: no usable sample ({len(problems)} samples, all unusable)")
        return [r for r, p in enumerate(problems) if p is None]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        # A sample found bad here is replaced by the next one, so batches stay full and equal across ranks.
        for k in range(len(self.rows)):
            sample = self.samples[self.rows[(i + k) % len(self.rows)]]
            try:
                return self.example(sample)
            except TooLong as bad:
                self._record_skip(sample["id"], bad.reason)
            except BadSample as bad:
                if self.on_bad_sample == "error":
                    raise UserError(
                        f"{self.path}: sample id {sample['id']}: {bad.reason}. Fix the data, or set "
                        "data.on_bad_sample=skip to leave such samples out."
                    ) from None
                self._record_skip(sample["id"], bad.reason)
        raise UserError(f"{self.path}: no usable sample, every one was dropped: {self.skip_summary()}")

    def example(self, sample: dict) -> dict:
        """The training example of one loaded sample; ``BadSample``/``TooLong`` if it cannot be used."""
        vision: dict[str, torch.Tensor] = {}
        image_counts: list[int] = []
        video_counts: list[int] = []
        video = row_video(sample)
        if video is not None:
            if self.placeholders.video_tokens is None:
                raise BadSample("video, but the model takes no video input")
            video_inputs, size, times = self.media.video(sample)
            vision.update(video_inputs)
            if self.placeholders.video_timing is not None:
                vision.update(self.placeholders.video_timing(size, times))
            video_counts.append(self.placeholders.video_tokens(size, times))
        if sample["images"]:
            image_inputs, sizes = self.media.images(sample)
            vision.update(image_inputs)
            image_counts = self.placeholders.image_tokens(sizes)
        turns = llava_turns(sample["conversations"], len(image_counts), len(video_counts))
        ids, labels = self.templater(turns, image_counts, video_counts)
        ids, labels = fit_to_length(
            ids, labels, self.placeholders.image_token_id, self.max_length, self.placeholders.video_token_id
        )
        return {
            "id": sample["id"],
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "vision": vision,
        }

    def _record_skip(self, sample_id: str, reason: str) -> None:
        if sample_id in self._skipped:
            return
        self._skipped[sample_id] = reason
        if self.skip_log is not None:
            self.skip_log.parent.mkdir(parents=True, exist_ok=True)
            # One short line per write: appends from several dataloader workers do not interleave.
            with open(self.skip_log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"id": sample_id, "reason": reason}, ensure_ascii=False) + "\n")

    def read_skipped(self) -> dict[str, str]:
        """``{id: reason}`` of every sample dropped so far (from ``skip_log``, which dataloader workers share)."""
        if self.skip_log is None or not self.skip_log.exists():
            return dict(self._skipped)
        with open(self.skip_log, encoding="utf-8") as f:
            return {entry["id"]: entry["reason"] for entry in map(json.loads, f)}

    def skip_summary(self) -> str:
        """One line for the end of a run: how many samples were dropped, by kind, and where the list is."""
        skipped = self.read_skipped()
        if not skipped:
            return "no samples skipped"
        kinds: dict[str, int] = {}
        for reason in skipped.values():
            kind = next((k for k in _KINDS if reason.startswith(k)), "malformed")
            kinds[kind] = kinds.get(kind, 0) + 1
        by_kind = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
        where = f"; list in {self.skip_log}" if self.skip_log else ""
        return f"skipped {len(skipped)} of {len(self.samples)} samples ({by_kind}){where}"
