"""visionzip_tune: VisionZip token compression in the training data path of LLaVA-style and Qwen VLMs.

import visionzip_tune as vzt
vzt.apply_visionzip(model, dominant=54, contextual=10, processor=processor)  # 64 tokens per image
vzt.apply_visionzip(qwen, dominant_ratio=0.45, contextual_ratio=0.05)       # Qwen2.5-VL / Qwen3-VL: 50% per image
vzt.apply_compression(model, "divprune", tokens=64, processor=processor)     # another compressor, 64 rows per image
vzt.remove_visionzip(model, processor)                                       # stock again
vzt.load_projector(model, "runs/x/export", processor=processor)              # tuned projector + its budget
"""

from visionzip_tune.export import load_projector
from visionzip_tune.families import (
    apply_compression,
    apply_visionzip,
    remove_visionzip,
    tokens_per_image,
    tokens_per_video,
)

__all__ = [
    "apply_compression",
    "apply_visionzip",
    "remove_visionzip",
    "tokens_per_image",
    "tokens_per_video",
    "load_projector",
]
__version__ = "0.1.0"
