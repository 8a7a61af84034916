"""A held-out LLaVA JSON with ``"choices"`` (the demo's ``eval.json``, or your own) as two local lmms-eval tasks:
``<name>_gen`` asks each question and scores the exact answer (``generate_until``), ``<name>_mc`` scores the choices
by likelihood (``multiple_choice``). Written as a parquet file plus task YAMLs that read it with ``datasets``'
packaged parquet builder, so nothing is downloaded; pass the folder to lmms-eval's ``--include_path``.

Single-image samples are used (the question is the first human turn without its ``<image>`` tag, the answer the
last gpt turn, one of the choices); others are skipped and counted.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import yaml

from visionzip_tune.data.validate import IMAGE_TAG
from visionzip_tune.errors import UserError

PARQUET = "{name}.parquet"


def choice_task_names(name: str = "heldout") -> list[str]:
    """The two tasks :func:`write_choice_tasks` writes for ``name``: exact answers, then likelihood of the choices."""
    return [f"{name}_gen", f"{name}_mc"]


def _rows(samples: list[dict], image_folder: Path, source: Path) -> tuple[dict[str, list], int]:
    rows: dict[str, list] = {"id": [], "image": [], "question": [], "answer": [], "choices": []}
    skipped = 0
    for sample in samples:
        turns = sample.get("conversations") or []
        choices = sample.get("choices")
        image = sample.get("image")
        usable = isinstance(image, str) and isinstance(choices, list) and len(turns) >= 2
        if not usable or turns[-1].get("value") not in choices:
            skipped += 1
            continue
        path = image_folder / image
        if not path.is_file():
            raise UserError(f"{source}: sample {sample.get('id')}: image {path} does not exist")
        rows["id"].append(str(sample.get("id")))
        rows["image"].append({"bytes": path.read_bytes(), "path": None})
        rows["question"].append(turns[0]["value"].replace(IMAGE_TAG, "").strip())
        rows["answer"].append(turns[-1]["value"])
        rows["choices"].append([str(c) for c in choices])
    return rows, skipped


def write_choice_tasks(
    samples_json: str | Path, image_folder: str | Path, out_dir: str | Path, name: str = "heldout"
) -> tuple[list[str], int]:
    """Write ``out_dir/{name}.parquet``, ``{name}_gen.yaml`` and ``{name}_mc.yaml``; returns (task names, number
    of samples skipped). :class:`UserError` when the file is unreadable or no sample is usable."""
    source = Path(samples_json)
    try:
        samples = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{source}: cannot read a held-out LLaVA JSON array: {err}") from None
    if not isinstance(samples, list):
        raise UserError(f"{source}: expected a JSON array of LLaVA samples")
    rows, skipped = _rows(samples, Path(image_folder), source)
    if not rows["id"]:
        raise UserError(
            f"{source}: no single-image sample with 'choices' holding its last answer, so no task can be made"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parquet = (out / PARQUET.format(name=name)).resolve()
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).to_parquet(str(parquet))
    common = {
        "dataset_path": "parquet",  # datasets' packaged builder: reads the local file, downloads nothing
        "dataset_kwargs": {"data_files": {"test": str(parquet)}},
        "test_split": "test",
        "doc_to_visual": "image",
        "doc_to_text": "{{question}}",
        "doc_to_target": "answer",
        "metadata": {"version": 1.0, "source": str(source.resolve())},
    }
    gen, mc = choice_task_names(name)
    tasks = {
        gen: {
            "output_type": "generate_until",
            "generation_kwargs": {"max_new_tokens": 16, "temperature": 0, "do_sample": False},
            "metric_list": [
                {
                    "metric": "exact_match",
                    "aggregation": "mean",
                    "higher_is_better": True,
                    "ignore_case": True,
                    "ignore_punctuation": True,
                }
            ],
        },
        mc: {
            "output_type": "multiple_choice",
            "doc_to_choice": "choices",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        },
    }
    for task, spec in tasks.items():
        (out / f"{task}.yaml").write_text(yaml.safe_dump({"task": task, **common, **spec}, sort_keys=False))
    return list(tasks), skipped
