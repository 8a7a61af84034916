"""Loading a saved VLM and what comes with it, for every half of the package (training, export, inference):
the model of a supported family, its tokenizer and image processor, the dtype to run it in, and a fast refusal of a
model source that cannot be loaded. Errors are :class:`UserError` paragraphs naming the key or flag given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import model_info, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from torch import nn
from transformers import AutoModelForImageTextToText
from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

from visionzip_tune import families, watchdog
from visionzip_tune.data.processing import Processing, load_processing
from visionzip_tune.errors import UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def bf16_supported() -> bool:
    """Whether this machine runs bfloat16 natively: a GPU that supports it (the CPU runs float32)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_dtype(dtype: str) -> torch.dtype:
    """One of :data:`DTYPES` as a torch dtype; ``auto`` is bfloat16 where :func:`bf16_supported`, else float32."""
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return torch.bfloat16 if bf16_supported() else torch.float32
    return getattr(torch, dtype)


def check_model_source(name_or_path: str, key: str = "model.name_or_path") -> None:
    """:class:`UserError` at once when ``name_or_path`` cannot be loaded: a local path that does not exist, or a
    hub id that is neither in the local cache nor reachable (offline, a typo), instead of retrying for minutes."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{key}={name_or_path!r} is not a saved model: {path / 'config.json'} is missing")
        return
    looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise UserError(f"{key}={name_or_path!r}: no such directory (relative paths start at {Path.cwd()})")
    if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        return  # cached: from_pretrained finds it offline too
    if hf_constants.HF_HUB_OFFLINE:
        raise UserError(
            f"{key}={name_or_path!r} looks like a hub id, but it is not in the local cache and HF_HUB_OFFLINE is "
            "set: download it first (huggingface-cli download ...) or give a local directory"
        )
    try:
        model_info(name_or_path, timeout=10)
    except GatedRepoError:
        return  # it exists; from_pretrained says what access it needs
    except RepositoryNotFoundError:
        raise UserError(f"{key}={name_or_path!r}: no such model on the hub (a typo?), and no such directory") from None
    except Exception as err:  # the HTTP client's connection errors: not cached and not downloadable either
        raise UserError(
            f"{key}={name_or_path!r} looks like a hub id, not in the local cache, and the hub cannot be reached "
            f"({type(err).__name__}): check the name, download it where there is a network, or give a local directory"
        ) from None


def base_model_id(name: str) -> str:
    """A hub id as given, a local directory as an absolute path (from_pretrained must find it from anywhere)."""
    return str(Path(name).resolve()) if Path(name).exists() else name


def load_vlm(
    name_or_path: str,
    *,
    key: str = "model.name_or_path",
    what: str = "model",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    zero3_config: dict[str, Any] | None = None,
) -> nn.Module:
    """The VLM saved at ``name_or_path`` (a ``save_pretrained`` directory or a hub id) of a supported family.

    With ``zero3_config`` (a DeepSpeed config of ZeRO stage 3) the model is built inside ``zero.Init``
    (transformers does so while an ``HfDeepSpeedConfig`` is registered): every rank holds only its shard of the
    weights from the start, instead of a full copy per rank in host memory (about 14 GB per rank for a 7B model in
    bf16). Errors name the path as the ``what`` (model, base model) given as ``key`` (a config key, a flag).
    """
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    # zero.Init parses the config before DeepSpeed knows the world size: leave out the global batch it would check.
    registered = (
        HfDeepSpeedConfig({k: v for k, v in zero3_config.items() if k != "train_batch_size"})
        if zero3_config is not None
        else None
    )
    source = (
        f"the files of {name_or_path}" if Path(name_or_path).exists() else f"the hub cache's files of {name_or_path}"
    )
    try:
        with watchdog.phase(f"loading the weights of the {what}", f"{source} (downloaded first when missing)"):
            model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the {what} {name_or_path!r} ({key}): {err}") from None
    finally:
        if registered is not None:
            unset_hf_deepspeed_config()  # only loading is built under zero.Init
    try:
        families.family_of(model)
    except ValueError as err:
        raise UserError(f"the {what} {name_or_path!r} ({key}): {err}") from None
    return model


def load_model_processing(name_or_path: str, key: str = "model.name_or_path") -> Processing:
    """The tokenizer, image processor and chat template saved with a model (``processing.load_processing``)."""
    try:
        return load_processing(name_or_path)
    except (OSError, ValueError) as err:
        raise UserError(f"{key}={name_or_path!r}: cannot load its tokenizer and image processor: {err}") from None
