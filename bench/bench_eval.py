"""Evaluation throughput: lmms-eval's own model for the family against ``visionzip``, on one tiny model and one
local task, side by side in one run.

    python bench/bench_eval.py [--family llava|qwen2_5_vl] [--docs 24] [--rounds 3] [--threads 2]

Builds a random tiny model (LLaVA: a 224 px CLIP tower of 256 patches, 4 x 128, and a 4 x 256 Llama; Qwen2.5-VL
the same widths on its own tower), and the demo's held-out set as lmms-eval's local tasks ``heldout_gen``
(``generate_until``, up to 16 new tokens) and ``heldout_mc`` (``loglikelihood`` of each choice), ``--docs``
documents each. It times:

  peer           lmms-eval's own model at its best setting here: ``llava_hf`` at batch 1 (it asserts batch 1 for
                 generation; its data-parallel path needs GPUs), ``qwen2_5_vl`` at batch 8 (it batches)
  visionzip b1   ``--model visionzip``, stock, batch 1, one process
  visionzip b8   the same at batch 8
  b8 shared      the same with the frozen tower's output shared across requests about one image (lmms-eval's
                 ``visionzip`` model does this by default: ``tower_share_gib``)
  visionzip 64   54 + 10 = 64 tokens per image (Qwen: 0.45 + 0.05, half of each image's tokens), batch 8
  1 / 2 procs    ``python -m visionzip_tune eval`` on the stock model, batch 8, with ``NPROC_PER_NODE=1`` and ``2``
                 (``--threads`` CPU threads in all, split over the processes)

In-process variants are timed around the model's own ``generate_until`` / ``loglikelihood`` calls (from the request
list lmms-eval hands the model to its answers: preprocessing included, lmms-eval's task building and scoring not),
interleaved round-robin over ``--rounds`` rounds; the table shows medians. The process variants report the eval
command's own count (results.json: requests the model answered over the slowest rank's answering time). A peer that
cannot run here (a missing dependency, transformers 5) is listed with the reason instead of a number.
Goals (CPU): visionzip stock at its best >= the peer at its best; batch 8 >= 3x batch 1; 2 processes >= 1.6x one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
from lmms_eval import evaluator
from lmms_eval.tasks import TaskManager

from visionzip_tune.demo.dataset import make_demo_dataset
from visionzip_tune.demo.tiny import TinySpec, save_tiny
from visionzip_tune.evaluation.lmms import VisionZipModel, ZippedModel
from visionzip_tune.evaluation.lmms_tasks import write_choice_tasks
from visionzip_tune.evaluation.tower_share import TowerShare

for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):  # a local task: nothing to download
    os.environ.setdefault(_key, "1")
ROOT = Path(__file__).resolve().parents[1]
TASKS = {"generate_until": "heldout_gen", "loglikelihood": "heldout_mc"}


def spec_of(family: str) -> TinySpec:
    return TinySpec(
        family=family,
        image_size=224,
        patch_size=14,
        vision_hidden=128,
        vision_layers=4,
        vision_heads=4,
        text_hidden=256,
        text_layers=4,
        text_heads=4,
        text_init_std=0.06,
    )


def budget_of(family: str) -> dict:
    return (
        dict(dominant_ratio=0.45, contextual_ratio=0.05)
        if family.startswith("qwen")
        else dict(dominant=54, contextual=10)
    )


def timed(lm) -> dict[str, list[float]]:
    """Wrap ``lm``'s request methods (on the instance, over its class's own) to record ``[requests, seconds]``."""
    spent = {kind: [0, 0.0] for kind in TASKS}
    for kind in TASKS:
        method = getattr(type(lm), kind).__get__(lm)

        def run(requests, method=method, kind=kind):
            start = time.perf_counter()
            answers = method(requests)
            spent[kind][0] += len(requests)
            spent[kind][1] += time.perf_counter() - start
            return answers

        setattr(lm, kind, run)
    return spent


class Pass(NamedTuple):
    """One lmms-eval pass of a model over both tasks: requests/s per request kind (a task that failed: its reason),
    every document's answers (``{(task, doc_id): [text] or [(loss, is_greedy), ...]}``) and, for ``visionzip``,
    the model's own mean time to first token and the largest batch it ran (``batch_size=auto``: what it picked)."""

    rates: dict[str, float | str]
    answers: dict
    ttft_ms: float | None
    batch_size: int | None


def evaluate_once(make_lm, manager, docs: int) -> Pass:
    """One pass of a model from ``make_lm()``, one lmms-eval run per task (lmms-eval's clean() drops a model's
    modules after a run: each run gets its own view)."""
    rates: dict[str, float | str] = {}
    answers, ttft, batch_size = {}, None, None
    for kind, task in TASKS.items():
        lm = make_lm()
        spent = timed(lm)
        try:
            results = evaluator.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=docs)
        except Exception as err:  # a peer on this machine (transformers 5): report why instead of a number
            rates[kind] = f"fails: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
            continue
        requests, seconds = spent[kind]
        rates[kind] = requests / seconds
        answers.update(per_document(results["samples"]))
        if hasattr(lm, "throughput"):
            batch_size = max(batch_size or 0, lm.throughput.batch_size)
            ttft = lm.throughput.summary()["ttft_ms"] if kind == "generate_until" else ttft
    return Pass(rates, answers, ttft, batch_size)


def per_document(samples: dict[str, list[dict]]) -> dict:
    """``{(task, doc_id): answers}`` of lmms-eval's samples: a generated text, or ``(loss, is_greedy)`` per choice."""

    def answer(resp):
        return (float(resp[0]), bool(resp[1])) if isinstance(resp, (list, tuple)) else str(resp)

    return {
        (task, s["doc_id"]): [answer(r) for r in s["filtered_resps"]] for task, rows in samples.items() for s in rows
    }


def compare_answers(reference: dict, other: dict) -> dict[str, float]:
    """How far ``other``'s answers are from ``reference``'s, document by document (batch invariance): the share of
    generated texts that are identical, of choice documents whose choice (lowest loss) and greedy flags are the same,
    and the largest loss difference."""
    texts = [key for key, answers in reference.items() if isinstance(answers[0], str)]
    choices = [key for key in reference if key not in texts]
    same_choice = sum(
        min(range(len(reference[k])), key=lambda c: reference[k][c][0])
        == min(range(len(other[k])), key=lambda c: other[k][c][0])
        for k in choices
    )
    return {
        "texts_identical": sum(reference[k] == other[k] for k in texts) / max(1, len(texts)),
        "choices_identical": same_choice / max(1, len(choices)),
        "greedy_identical": sum([g for _, g in reference[k]] == [g for _, g in other[k]] for k in choices)
        / max(1, len(choices)),
        "loss_max_diff": max((abs(a[0] - b[0]) for k in choices for a, b in zip(reference[k], other[k])), default=0.0),
    }


def peer_model(family: str, model_dir: Path):
    """lmms-eval's own model at its best setting here, or the reason it cannot be built."""
    try:
        if family.startswith("qwen"):
            from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL

            return "qwen2_5_vl (batch 8)", Qwen2_5_VL(pretrained=str(model_dir), device_map="cpu", batch_size=8)
        from lmms_eval.models.simple.llava_hf import LlavaHf

        # device_map "" (its default) reaches from_pretrained and fails on transformers 5 (lmms-eval #438)
        return "llava_hf (batch 1)", LlavaHf(pretrained=str(model_dir), device="cpu", device_map="cpu", dtype="float32")
    except Exception as err:
        name = "qwen2_5_vl" if family.startswith("qwen") else "llava_hf"
        return name, f"cannot run here: {type(err).__name__}: {str(err).splitlines()[0][:160]}"


def processes_rate(model_dir: Path, demo, docs: int, processes: int, threads: int) -> float | str:
    """The eval command's own requests/s on the stock model with ``processes`` ranks."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "visionzip_tune", "eval", "--model", str(model_dir)]
        command += ["--held-out", str(demo.eval), "--image-folder", str(demo.images), "--limit", str(docs)]
        command += ["--batch-size", "8", "--output-dir", out]
        drop = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update(NPROC_PER_NODE=str(processes), OMP_NUM_THREADS=str(max(1, threads // processes)))
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return f"fails: {done.stderr.strip().splitlines()[-1][:160]}"
        return json.loads((Path(out) / "results.json").read_text())["runs"][0]["throughput"]["requests_per_s"]


def cell(value) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) and b > 0 else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="llava", choices=["llava", "qwen2_5_vl"])
    parser.add_argument("--docs", type=int, default=24, help="documents per task")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    model_dir = save_tiny(work / "model", spec_of(args.family))
    demo = make_demo_dataset(work / "demo", n=4, seed=0, n_eval=args.docs)
    write_choice_tasks(demo.eval, demo.images, work / "tasks")

    stock = VisionZipModel(pretrained=str(model_dir), dtype="float32", device="cpu")
    zipped = VisionZipModel(pretrained=str(model_dir), dtype="float32", device="cpu", **budget_of(args.family))
    label = "64 tokens" if not args.family.startswith("qwen") else "50% of tokens"
    variants = {
        "visionzip stock, batch 1": lambda: ZippedModel(stock.model, stock.prompter, batch_size=1),
        "visionzip stock, batch 8": lambda: ZippedModel(stock.model, stock.prompter, batch_size=8),
        # The lmms-eval model's default: the choices of a question run the tower once. A fresh share per task
        # and pass (evaluate_once makes a model per task), so no run reuses another's.
        "visionzip stock, batch 8, tower shared": lambda: ZippedModel(
            stock.model, stock.prompter, batch_size=8, tower_share=TowerShare()
        ),
        f"visionzip {label}, batch 8": lambda: ZippedModel(zipped.model, zipped.prompter, batch_size=8),
    }
    peer_name, peer = peer_model(args.family, model_dir)
    if not isinstance(peer, str):
        module = peer._model  # lmms-eval's clean() drops a model's modules after each pass: give it back each time
        variants = {peer_name: lambda: (setattr(peer, "_model", module), peer)[1], **variants}

    rates: dict[str, dict[str, list]] = {name: {kind: [] for kind in TASKS} for name in variants}
    manager = TaskManager("ERROR", include_path=str(work / "tasks"))
    evaluate_once(variants[next(iter(variants))], manager, 2)  # warm-up: datasets, kernels
    for round_ in range(args.rounds):
        names = list(variants)
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            for kind, rate in evaluate_once(variants[name], manager, args.docs).rates.items():
                rates[name][kind].append(rate)
        print(f"[bench-eval] round {round_ + 1}/{args.rounds}", file=sys.stderr, flush=True)

    def median(name: str, kind: str):
        values = rates[name][kind]
        numbers = [v for v in values if isinstance(v, float)]
        return statistics.median(numbers) if len(numbers) == len(values) else values[0]

    procs = {n: processes_rate(model_dir, demo, args.docs, n, args.threads) for n in (1, 2)}

    print(f"\n{args.family}: {args.docs} documents per task, {args.threads} CPU threads, medians of {args.rounds}")
    print("\n| model | generate_until requests/s | loglikelihood requests/s |\n|---|---|---|")
    if isinstance(peer, str):
        print(f"| {peer_name} | {peer} | |")
    for name in variants:
        print(f"| {name} | {cell(median(name, 'generate_until'))} | {cell(median(name, 'loglikelihood'))} |")
    print("\n| eval command, stock, batch 8 | requests/s (both tasks) |\n|---|---|")
    for n, rate in procs.items():
        print(f"| {n} process{'es' if n > 1 else ''} | {cell(rate)} |")

    gen = {name: median(name, "generate_until") for name in variants}
    best = max((v for k, v in gen.items() if k.startswith("visionzip stock") and isinstance(v, float)), default=None)
    print("\nratios (goal):")
    if not isinstance(peer, str):
        print(f"  visionzip stock at its best / {peer_name}, generate: {ratio(best, gen[peer_name])} (>= 1)")
    else:
        print(f"  visionzip stock at its best / {peer_name}: n/a, the peer {peer}")
    for kind in TASKS:
        b1, b8 = median("visionzip stock, batch 1", kind), median("visionzip stock, batch 8", kind)
        print(f"  batch 8 / batch 1, {kind}: {ratio(b8, b1)} (>= 3)")
        shared = median("visionzip stock, batch 8, tower shared", kind)
        print(f"  batch 8 with the tower shared (the default) / batch 1, {kind}: {ratio(shared, b1)}")
        z8 = median(f"visionzip {label}, batch 8", kind)
        print(f"  {label} / stock at batch 8, {kind}: {ratio(z8, b8)}")
    print(f"  2 processes / 1 process: {ratio(procs[2], procs[1])} (>= 1.6)")


if __name__ == "__main__":
    main()
