"""LLaVA-format instruction data: load -> validate -> subset -> template + tokenize -> batches; and the demo set.

    from visionzip_tune.data import load_samples, SupervisedDataset, Collator, LengthGroupedSampler
    samples = load_samples("llava_v1_5_mix665k.json")          # memory-mapped datasets.Dataset, ids as str
    ds = SupervisedDataset(samples, image_folder=..., tokenizer=..., image_processor=...,
                           image_tokens=functools.partial(models.sample_image_tokens, config),
                           image_token_id=config.image_token_index,
                           video_tokens=functools.partial(models.tokens_per_video, config),  # video families
                           video_token_id=config.video_token_index)
    batch = Collator(tokenizer.pad_token_id)([ds[0], ds[1]])   # input_ids, labels, ..., pixel_values, ...
"""

from visionzip_tune.data.batching import Collator, LengthGroupedSampler
from visionzip_tune.data.dataset import SupervisedDataset
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
]
