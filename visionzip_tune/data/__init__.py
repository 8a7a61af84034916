"""LLaVA-format instruction data: load -> validate -> subset -> template + tokenize -> batches; and the demo set.

    from visionzip_tune.data import load_samples, model_placeholders, SupervisedDataset, Collator
    samples = load_samples("llava_v1_5_mix665k.json")          # memory-mapped datasets.Dataset, ids as str
    ds = SupervisedDataset(samples, image_folder=..., tokenizer=..., image_processor=...,
                           **model_placeholders(model.config))  # the model's token ids and count functions
    batch = Collator(tokenizer.pad_token_id)([ds[0], ds[1]])   # input_ids, labels, ..., pixel_values, ...
"""

from visionzip_tune.data.batching import Collator, LengthGroupedSampler
from visionzip_tune.data.dataset import SupervisedDataset, model_placeholders
from visionzip_tune.data.demo import make_demo_dataset
from visionzip_tune.data.source import load_samples
from visionzip_tune.data.template import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "LengthGroupedSampler",
    "SupervisedDataset",
    "load_samples",
    "make_demo_dataset",
    "model_placeholders",
]
