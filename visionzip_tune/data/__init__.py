"""LLaVA-format instruction data: load -> validate -> subset -> template + tokenize -> batches.

from visionzip_tune.data import Collator, DataConfig, SupervisedDataset, load_samples
from visionzip_tune.training.build import placeholders
samples = load_samples("llava_v1_5_mix665k.json")           # memory-mapped datasets.Dataset, ids as str
ds = SupervisedDataset(samples, DataConfig(image_folder=...), processing, placeholders(model.config))
batch = Collator(tokenizer.pad_token_id)([ds[0], ds[1]])    # input_ids, labels, ..., pixel_values, ...

The data path knows no model family: the placeholder counts come in as :class:`Placeholders`.
"""

from visionzip_tune.data.batching import Collator, LengthGroupedSampler, collate_vision
from visionzip_tune.data.config import DataConfig
from visionzip_tune.data.dataset import Placeholders, SupervisedDataset
from visionzip_tune.data.media import FileMedia, MediaSource
from visionzip_tune.data.processing import Processing, load_processing
from visionzip_tune.data.source import load_samples
from visionzip_tune.data.template import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "DataConfig",
    "FileMedia",
    "LengthGroupedSampler",
    "MediaSource",
    "Placeholders",
    "Processing",
    "SupervisedDataset",
    "collate_vision",
    "load_processing",
    "load_samples",
]
