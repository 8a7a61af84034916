"""A compressed-feature cache: the frozen part of a model's features path -- the tower and the compression,
everything before the first module projector mode trains (``families.frozen_features``) -- computed once per image
or video and read from disk by every later epoch, rerun and sweep (learning rate, seed, schedule), so a training
step runs only the trainable modules and the LLM.

What is cached is the family's (``Family.frozen_features``): the LLaVA families' compressed tower rows per image,
crop or frame (the projector's input); Qwen's, in ``post`` merge space, the merger inputs the rows are made of and
the compression's selection (training reruns merger -> merge exactly), in ``pre`` space the merged merger-input
rows; Mini-Gemini's zipped mined tokens when the mining is frozen (``train.projector_modules=mlp_only``).

Layout: ``ROOT/<key digest>/`` per :class:`CacheKey` (the family, vision config, the weights of the modules the rows
come from, compressor and budget, image processor settings, media transform, dtype), holding safetensors shards
written whole under a temporary name (a shard that exists is complete; a killed build resumes from the complete
ones), each entry keyed by its sample's media bytes (:class:`MediaHashes`).

Built by ``python -m visionzip_tune cache RECIPE`` (under torchrun on every GPU) or before a run with
``train.feature_cache=ROOT`` (``visionzip_tune.training.cache`` ties it to a recipe). Read by the data path through
:class:`CachedMedia`, a ``data.MediaSource``: a training batch then carries ``cached_image.*`` / ``cached_video.*``
tensors instead of pixels, which ``families.forward.forward_with_vision`` hands to ``features_from_frozen``.

Evaluation shares the frozen part the same way (:mod:`visionzip_tune.evaluation.tower_share`): the training-free and
the tuned projector at one budget, and the choices of one multiple-choice question, take one tower pass per image
(:func:`frozen_parts`), their batches carrying ``cached_image.*`` rows like a cached training batch.
"""

from visionzip_tune.feature_cache.build import (
    BATCH_SIZE,
    SHARD_ENTRIES,
    BuildOptions,
    Job,
    build,
    chunks_to_build,
    frozen_parts,
    plan_jobs,
)
from visionzip_tune.feature_cache.cache import FeatureCache
from visionzip_tune.feature_cache.key import CacheKey, MediaHashes, cache_key
from visionzip_tune.feature_cache.media import CachedMedia, media_paths, sample_key
from visionzip_tune.feature_cache.store import Shards

__all__ = [
    "BATCH_SIZE",
    "SHARD_ENTRIES",
    "BuildOptions",
    "CacheKey",
    "CachedMedia",
    "FeatureCache",
    "Job",
    "MediaHashes",
    "Shards",
    "build",
    "cache_key",
    "chunks_to_build",
    "frozen_parts",
    "media_paths",
    "plan_jobs",
    "sample_key",
]
