"""``data subset``: stratified by source, exact totals, verbatim bytes, reproducible anywhere, manifest, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from visionzip_tune.cli.data import main
from visionzip_tune.data.subset import allocate, manifest_path, write_subset
from visionzip_tune.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def qa(k):
    return [{"from": "human", "value": f"<image>\nQuestion {k}?"}, {"from": "gpt", "value": f"Answer {k}."}]


@pytest.fixture
def mix(tmp_path):
    """A small mix shaped like llava_v1_5_mix665k: int and str ids, text-only samples bunched at the end."""
    samples = [{"id": k, "image": f"coco/train2017/{k:012d}.jpg", "conversations": qa(k)} for k in range(50)]
    samples += [{"id": f"vg-{k}", "image": f"vg/VG_100K/{k}.jpg", "conversations": qa(k)} for k in range(30)]
    samples += [{"id": f"sg-{k}", "model": "", "conversations": qa(k)[:1] + qa(k)[1:]} for k in range(20)]
    for s in samples[80:]:
        s["conversations"][0]["value"] = "Tell me a short story."
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(samples, indent=2))
    return path, samples


def test_allocate_is_proportional_with_exact_total():
    assert allocate({"a": 5, "b": 3, "c": 2}, 5) == {"a": 3, "b": 1, "c": 1}  # .5/.5 remainders tie -> by name
    assert allocate({"coco": 364100, "text-only": 40688, "vg": 86417}, 49121) == {
        "coco": 36410,
        "text-only": 4069,
        "vg": 8642,
    }
    assert sum(allocate({"x": 7, "y": 11, "z": 13}, 17).values()) == 17


def test_fraction_is_stratified_and_copies_records_verbatim(tmp_path, mix):
    path, samples = mix
    out = tmp_path / "sub" / "subset.json"
    manifest = write_subset(path, out, seed=0, fraction=Fraction(1, 10))
    chosen = json.loads(out.read_text())
    assert len(chosen) == 10
    by_source = {"coco": 0, "vg": 0, "text-only": 0}
    for s in chosen:
        by_source["text-only" if "image" not in s else s["image"].split("/")[0]] += 1
        assert s in samples  # same keys and values, int ids stay int, "model" stays
    assert by_source == {"coco": 5, "vg": 3, "text-only": 2}
    # Each record is the input's own bytes (here: indented as in the input), in input order.
    raw = path.read_text()
    positions = [raw.index(json.dumps(s, indent=2).replace("\n", "\n  ")) for s in chosen]
    assert positions == sorted(positions)
    assert manifest == json.loads(manifest_path(out).read_text())
    assert manifest["sources"] == {
        "coco": {"in": 50, "out": 5},
        "text-only": {"in": 20, "out": 2},
        "vg": {"in": 30, "out": 3},
    }
    assert manifest["seed"] == 0 and manifest["fraction"] == "1/10" and manifest["count"] is None
    assert manifest["input_samples"] == 100 and manifest["output_samples"] == 10
    import hashlib

    assert manifest["input_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest["output_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


def test_same_bytes_in_a_fresh_process_with_another_hash_seed(tmp_path, mix):
    path, _ = mix
    here, there = tmp_path / "here.json", tmp_path / "there.json"
    assert main(["subset", "--data", str(path), "--output", str(here), "--count", "17", "--seed", "3"]) == 0
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    cmd = [
        sys.executable,
        "-m",
        "visionzip_tune",
        "data",
        "subset",
        "--data",
        str(path),
        "--output",
        str(there),
        "--count",
        "17",
        "--seed",
        "3",
    ]
    subprocess.run(cmd, check=True, cwd=REPO, env=env, capture_output=True)
    assert here.read_bytes() == there.read_bytes()
    assert len(json.loads(here.read_text())) == 17


def test_seed_changes_the_selection_not_the_quotas(tmp_path, mix):
    path, _ = mix
    a = write_subset(path, tmp_path / "a.json", seed=0, count=30)
    b = write_subset(path, tmp_path / "b.json", seed=1, count=30)
    assert a["sources"] == b["sources"]
    assert (tmp_path / "a.json").read_bytes() != (tmp_path / "b.json").read_bytes()


def test_jsonl_input_gives_a_json_array(tmp_path, mix):
    _, samples = mix
    path = tmp_path / "mix.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    write_subset(path, tmp_path / "out.json", seed=0, fraction=Fraction(1, 2))
    chosen = json.loads((tmp_path / "out.json").read_text())
    assert len(chosen) == 50 and all(s in samples for s in chosen)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fraction", "0"], "must be in (0, 1]"),
        (["--fraction", "1.5"], "must be in (0, 1]"),
        (["--fraction", "ten"], "is not a number"),
        (["--fraction", "0.001"], "selects 0 of the 100 samples"),
        (["--count", "101"], "selects 101 of the 100 samples"),
        (["--count", "0"], "--count must be at least 1"),
    ],
)
def test_bad_amounts_are_user_errors_and_write_nothing(tmp_path, mix, args, message):
    path, _ = mix
    out = tmp_path / "out.json"
    with pytest.raises(UserError) as err:
        main(["subset", "--data", str(path), "--output", str(out), *args])
    assert message in str(err.value)
    assert not out.exists() and not manifest_path(out).exists()


def test_output_over_input_and_missing_input_are_refused(tmp_path, mix):
    path, _ = mix
    with pytest.raises(UserError, match="is the input file"):
        main(["subset", "--data", str(path), "--output", str(path), "--count", "3"])
    with pytest.raises(UserError, match="no such file"):
        main(["subset", "--data", str(tmp_path / "none.json"), "--output", str(tmp_path / "o.json"), "--count", "3"])
    with pytest.raises(SystemExit):  # argparse: exactly one of --fraction / --count
        main(["subset", "--data", str(path), "--output", str(tmp_path / "o.json")])
