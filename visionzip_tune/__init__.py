"""visionzip_tune: VisionZip token compression in the training data path of LLaVA-style VLMs.

    import visionzip_tune as vzt
    vzt.apply_visionzip(model, dominant=54, contextual=10, processor=processor)  # 64 tokens per image
    vzt.remove_visionzip(model, processor)                                       # stock again
"""

from .models import apply_visionzip, remove_visionzip, tokens_per_image, tokens_per_video

__all__ = ["apply_visionzip", "remove_visionzip", "tokens_per_image", "tokens_per_video", "load_projector"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # load_projector lives in export.py (export helper); imported lazily so the core never depends on it.
    if name == "load_projector":
        from .export import load_projector

        return load_projector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
