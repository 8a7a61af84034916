"""A seeded subset stratified by source, written as the input's own bytes, with a manifest next to it.

Same input + seed -> same bytes on any machine: a sample's rank inside its source is the SHA-256 of
(seed, row index), not a platform- or version-dependent RNG, and the kept records are copied verbatim in file order.
Quotas per source use the largest-remainder method on exact fractions, so the total is exactly
``round(fraction * N)`` (or ``count``) and each source keeps its share. No image is opened.
"""

from __future__ import annotations

import hashlib
import json
from fractions import Fraction
from pathlib import Path

from visionzip_tune.files import atomic_file, atomic_write, file_sha256
from visionzip_tune.data.source import column, load_samples
from visionzip_tune.errors import UserError

MANIFEST_FORMAT = "visionzip_tune.subset/1"


def manifest_path(output: str | Path) -> Path:
    """``subset.json`` -> ``subset.manifest.json``."""
    output = Path(output)
    return output.with_name(output.stem + ".manifest.json")


def allocate(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` over strata in proportion to ``sizes`` (largest remainder; ties by name)."""
    n = sum(sizes.values())
    quotas = {name: Fraction(total * size, n) for name, size in sizes.items()}
    out = {name: int(q) for name, q in quotas.items()}
    leftover = total - sum(out.values())
    by_remainder = sorted(sizes, key=lambda name: (-(quotas[name] - out[name]), name))
    for name in by_remainder[:leftover]:
        out[name] += 1
    return out


def rank_key(seed: int, index: int) -> bytes:
    return hashlib.sha256(f"visionzip_tune.subset:{seed}:{index}".encode()).digest()


def strata(sources: list[str]) -> dict[str, list[int]]:
    """Row indices per source, in file order."""
    out: dict[str, list[int]] = {}
    for index, source in enumerate(sources):
        out.setdefault(source, []).append(index)
    return out


def select(strata_rows: dict[str, list[int]], quotas: dict[str, int], seed: int) -> list[int]:
    """Ascending row indices: the ``quotas[s]`` rows of each source ``s`` that rank first for ``seed``."""
    chosen = []
    for name, rows in strata_rows.items():
        chosen += sorted(rows, key=lambda i: rank_key(seed, i))[: quotas[name]]
    return sorted(chosen)


def parse_fraction(text: str) -> Fraction:
    """``"0.1"`` or ``"1/10"`` as an exact fraction in (0, 1]."""
    try:
        fraction = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"--fraction {text!r} is not a number (use e.g. 0.1 or 1/10)") from None
    if not 0 < fraction <= 1:
        raise UserError(f"--fraction {text} must be in (0, 1]")
    return fraction


def write_subset(
    data: str | Path, output: str | Path, *, seed: int, fraction: Fraction | None = None, count: int | None = None
) -> dict:
    """Write the subset of ``data`` to ``output`` (a JSON array) and its manifest; return the manifest."""
    if (fraction is None) == (count is None):
        raise UserError("give exactly one of a fraction and a count of samples to keep")
    data, output = Path(data), Path(output)
    if output.resolve() == data.resolve():
        raise UserError(f"the output path {output} is the input file; choose another path")
    samples = load_samples(data)
    sources = column(samples, "source")
    n = len(sources)
    total = int(fraction * n + Fraction(1, 2)) if fraction is not None else count
    if not 1 <= total <= n:
        asked = f"fraction {fraction}" if fraction is not None else f"count {count}"
        raise UserError(f"a {asked} selects {total} of the {n} samples in {data}; it must select between 1 and {n}")
    by_source = strata(sources)
    counts_in = {name: len(by_source[name]) for name in sorted(by_source)}
    counts_out = allocate(counts_in, total)
    spans = samples.select(select(by_source, counts_out, seed)).select_columns(["offset", "nbytes"])
    digest = hashlib.sha256()
    with open(data, "rb") as src, atomic_file(output) as dst:
        # The kept records are copied byte for byte, in file order, into a JSON array.
        for k, span in enumerate(spans):
            src.seek(span["offset"])
            chunk = (b"[\n" if k == 0 else b",\n") + src.read(span["nbytes"])
            digest.update(chunk)
            dst.write(chunk)
        digest.update(b"\n]\n")
        dst.write(b"\n]\n")
    manifest = {
        "format": MANIFEST_FORMAT,
        "input": data.name,
        "input_sha256": file_sha256(data),
        "input_samples": n,
        "seed": seed,
        "fraction": None if fraction is None else str(fraction),
        "count": count,
        "output": output.name,
        "output_sha256": digest.hexdigest(),
        "output_samples": total,
        "sources": {name: {"in": counts_in[name], "out": counts_out[name]} for name in counts_in},
    }
    atomic_write(manifest_path(output), (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest
