"""One prepared GPU check: the project's first GPU figures from one command, in about 8 minutes on one GPU.

    bash bench/gpu_check.sh OUT_DIR [--work DIR] [--demo-steps N] [--demo-samples N]
    python bench/gpu_check.py OUT_DIR ...        (the same, where visionzip_tune is already importable)

With a CUDA device, in this order (each part bounded: a warm-up and a few rounds, medians; timestamped progress):

  parity  zipped features of a random CLIP-L/336 tower (hidden 1024, 24 layers, 16 heads, 577 tokens, layer -2)
          on the GPU in fp32 (TF32 off) and in bf16 against the CPU's fp32 result on the same weights and pixels,
          budgets 54+10, 108+20, 162+30: indices and values, with the pass criteria of PARITY_CRITERIA
  tower   bench_visionzip's tower bench at that geometry in bf16, CUDA events, batch 8 and 32: stock SDPA tower
          vs VisionZip (hooks, early stop) vs the official eager route vs the selection alone, at 54+10
  step    bench_train's projector-mode step (forward + backward + AdamW) on that tower and a Llama of hidden 1024,
          24 layers, MLP 4096 built from config, bf16, batch 16: 576 / 192 / 64 tokens per image, time ratios,
          the FLOP-count prediction and peak CUDA memory (reset between budgets)
  demo    bash train.sh recipes/tiny/demo.yaml in bf16 on one GPU process (DeepSpeed, NCCL): the loss must fall
          and the exported projector must load back into a fresh model
  eval    the lmms-eval model ``visionzip`` on that tower and Llama (bench_eval's local tasks: the demo's held-out
          questions, generated and scored as choices): requests/s at batch 1, 16 and auto in bf16, stock and at
          54+10, with the model's own time to first token; and batch invariance, every document's answers at batch
          16 against batch 1 (texts, choices, greedy flags, largest loss difference), in bf16 and in fp32 (TF32 off)

Without a CUDA device the same command runs the same parts on the CPU at small sizes, the demo shortened (fp32;
parity then compares CPU bf16 with CPU fp32), and says which GPU parts it skipped. Nothing is downloaded.

Writes OUT_DIR/gpu_check.json (environment, each part's numbers and verdict, what was skipped and why; rewritten
after every part, so a cut-off run still leaves the parts it finished), OUT_DIR/gpu_check.md (the short table,
also printed at the end), OUT_DIR/gpu_check.log (everything printed) and OUT_DIR/demo.log (the demo's own output).
The demo's model, data and run directory go to --work (default: a fresh temporary directory). Exit status: 0 when
every part that ran passed (benches: ran), 1 otherwise. The device command for a lent GPU is in bench/gpu_check.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib.metadata
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO_RECIPE = ROOT / "recipes" / "tiny" / "demo.yaml"
_START = time.monotonic()

BUDGETS = ((54, 10), (108, 20), (162, 30))  # the paper's LLaVA-1.5 budgets: 64, 128, 192 tokens
IMAGE_SIZE, FEATURE_LAYER = 336, -2  # LLaVA-1.5's tower input and feature layer (577 tokens with CLS at patch 14)

# Parity pass criteria, per dtype of the candidate run (the reference is the CPU's fp32 run of the same tower).
# A random tower attends almost uniformly, so neighbouring CLS-attention scores differ by ~1e-5 relative (measured
# at CLIP-L: 2e-6 to 3e-5 between the 54th, 108th or 162nd best patch and the next). Rounding can therefore swap a
# token just below the cut with one just above it: a near-tie, not an error. A candidate passes when
#   agreement >= min_agreement: the share of dominant indices (CLS + top patches, per image) both runs keep;
#   every index the candidate keeps and the reference does not is a near-tie: its reference score lies at most
#     tie_tolerance (relative) below the reference's cut (the lowest patch score the reference keeps); a wrong
#     selection keeps tokens far below the cut (the median patch of a random CLIP-L scores 4% below it);
#   dominant values at the positions both keep differ by at most max_diff (largest) and mean_diff (mean) times the
#     RMS of the reference's tokens.
# fp32 with TF32 off differs from the CPU in summation order only (~1e-6 relative): the same indices are expected,
# a swap at most within 1e-4 of the cut. bf16 keeps 8 bits of mantissa: measured on the CPU against fp32, CLIP-L
# keeps 96-100% of the indices (swaps within 6e-5 of the cut; a 4-layer, 128-wide tower within 1e-3) with values
# 0.14 (largest) and 0.009 (mean) times the RMS apart; the bounds leave 2x room on values, 10x on ties.
PARITY_CRITERIA = {
    "float32": {"min_agreement": 0.98, "tie_tolerance": 1e-4, "max_diff": 1e-3, "mean_diff": 1e-4},
    "bfloat16": {"min_agreement": 0.9, "tie_tolerance": 1e-2, "max_diff": 0.3, "mean_diff": 0.02},
}


@dataclass(frozen=True)
class Plan:
    """Sizes of every part for one kind of machine."""

    device: str
    tower: tuple[int, int, int]  # hidden, layers, heads of the CLIP tower (parity and tower bench)
    parity_batch: int
    parity_dtypes: tuple[str, ...]  # candidate dtypes on ``device``, each compared with the CPU's fp32 run
    bench_dtype: str
    tower_batches: tuple[int, ...]
    tower_rounds: int
    step_geometry: str  # bench_train.GEOMETRIES
    step_batch: int
    step_rounds: int
    demo_bf16: bool
    demo_samples: int | None  # None: the recipe's
    demo_steps: int | None
    demo_timeout_s: int
    eval_geometry: str  # bench_train.GEOMETRIES, a LLaVA for the eval part
    eval_docs: int  # documents per task
    eval_batches: tuple[int | str, ...]  # the first is the reference the others' answers are compared with
    eval_dtypes: tuple[str, ...]  # the first is timed; every one is compared across batch sizes


GPU_PLAN = Plan(
    device="cuda",
    tower=(1024, 24, 16),
    parity_batch=8,
    parity_dtypes=("float32", "bfloat16"),
    bench_dtype="bfloat16",
    tower_batches=(8, 32),
    tower_rounds=10,
    step_geometry="clip-l",
    step_batch=16,
    step_rounds=10,
    demo_bf16=True,
    demo_samples=None,
    demo_steps=None,
    demo_timeout_s=300,
    eval_geometry="clip-l",
    eval_docs=64,
    eval_batches=(1, 16, "auto"),
    eval_dtypes=("bfloat16", "float32"),
)
# The CPU plan runs every code path in about a minute of CPU time (1.5-3.5 minutes of wall time on a shared 2-core
# machine); its numbers mean little.
CPU_PLAN = Plan(
    device="cpu",
    tower=(128, 4, 4),
    parity_batch=4,
    parity_dtypes=("bfloat16",),
    bench_dtype="float32",
    tower_batches=(2,),
    tower_rounds=2,
    step_geometry="tiny",
    step_batch=1,
    step_rounds=2,
    demo_bf16=False,
    demo_samples=200,
    demo_steps=40,
    demo_timeout_s=600,
    eval_geometry="tiny",
    eval_docs=6,
    eval_batches=(1, 8),
    eval_dtypes=("float32",),
)

# What a machine without CUDA cannot run, by part (the part itself then runs at CPU sizes).
GPU_ONLY = {
    "parity": "CLIP-L/336 zipped features on the GPU (fp32 and bf16) against the CPU's fp32 result",
    "tower": "the tower bench at CLIP-L/336 in bf16 with CUDA events, batch 8 and 32",
    "step": "the step bench on CLIP-L/336 + a Llama 1024 x 24 in bf16 with peak CUDA memory",
    "demo": "the demo recipe in bf16 on a GPU (DeepSpeed's CUDA accelerator, NCCL)",
    "eval": "lmms-eval requests/s at batch 1, 16 and auto and batch invariance on CLIP-L/336 + a Llama 1024 x 24 in "
    "bf16 and fp32 on a GPU",
}


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')} +{time.monotonic() - _START:.0f}s] {message}", flush=True)


class _Tee:
    """sys.stdout that also writes into the log file, so the benches' own tables land in the log too."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def __getattr__(self, name: str):  # encoding, isatty, fileno, ...: the console's
        return getattr(self.streams[0], name)


# ---------------------------------------------------------------------------------------------------------------
# environment


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver_version() -> str | None:
    try:
        import pynvml  # nvidia-ml-py, where installed

        pynvml.nvmlInit()
        return pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # the driver version is a nicety: any failure leaves it unknown
        return None


# The versions that matter to the check (the wheels carried to an offline machine shadow some of its own).
PACKAGES = (
    "transformers",
    "deepspeed",
    "datasets",
    "peft",
    "accelerate",
    "huggingface-hub",
    "tokenizers",
    "safetensors",
    "pyarrow",
    "fsspec",
)


def environment() -> dict:
    import transformers

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "packages": {name: _version(name) for name in PACKAGES},
        "transformers_path": str(Path(transformers.__file__).parent),  # which copy won on PYTHONPATH
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            bf16_supported=torch.cuda.is_bf16_supported(),
            cudnn=torch.backends.cudnn.version(),
            nccl=str(torch.cuda.nccl.version()),  # a tuple (major, minor, patch) in recent torch, an int before
            driver=_driver_version(),
        )
    return env


# ---------------------------------------------------------------------------------------------------------------
# parity: zipped features on the device against the CPU's fp32 result


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """fp32 matmuls and convolutions in full fp32 on CUDA (TF32 would round their inputs to 10 bits of mantissa;
    cuDNN convolutions, the patch embedding among them, use it by default). The legacy switches: torch >= 2.9 keeps
    its new ``fp32_precision`` ones in step with them, whereas setting only the new ones can make a later read of
    the legacy ones raise."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def capture(tower, pixels: torch.Tensor):
    """Layer FEATURE_LAYER of the tower: hidden states and that layer's q/k (``capture.run_until``)."""
    from visionzip_tune.algorithm import capture

    with torch.no_grad():
        return capture.run_until(tower, pixels, capture.resolve_layer(len(tower.encoder.layers), FEATURE_LAYER))


def zip_captured(captured, dominant: int, contextual: int):
    """VisionZip on a captured layer, as the model does it (``families.base.zip_layer``)."""
    from visionzip_tune.families.base import zip_layer

    return zip_layer(captured, dominant, contextual)


def compare_zips(reference, candidate, scores: torch.Tensor, criteria: dict) -> dict:
    """Indices and values of a candidate ``compress.ZipResult`` against the reference's (both on the CPU, tokens in
    fp32). scores: (B, N - 1) the reference's CLS-attention scores of patches 1..N-1. Returns the measures that
    PARITY_CRITERIA bounds, the contextual targets' agreement (it follows from the dominant set) and ``pass``."""
    rms = reference.tokens.pow(2).mean().sqrt()
    kept = identical = 0
    worst_tie, diffs = 0.0, []
    for ref_idx, cand_idx, ref_tokens, cand_tokens, image_scores in zip(
        reference.dominant_indices.tolist(),
        candidate.dominant_indices.tolist(),
        reference.tokens,
        candidate.tokens,
        scores.tolist(),
    ):
        shared = sorted(set(ref_idx) & set(cand_idx))
        kept += len(shared)
        identical += ref_idx == cand_idx
        cut = min(image_scores[i - 1] for i in ref_idx if i > 0)  # CLS (index 0) is kept by rule, not by score
        for extra in set(cand_idx) - set(ref_idx):
            worst_tie = max(worst_tie, (cut - image_scores[extra - 1]) / cut)
        # Dominant tokens are emitted in positional order: a shared position sits at its rank in each run.
        rows = torch.tensor([ref_idx.index(i) for i in shared]), torch.tensor([cand_idx.index(i) for i in shared])
        diffs.append((ref_tokens[rows[0]] - cand_tokens[rows[1]]).abs())
    diff = torch.cat(diffs) / rms
    contextual = sum(
        len(set(r) & set(c))
        for r, c in zip(reference.contextual_indices.tolist(), candidate.contextual_indices.tolist())
    )
    measured = {
        "agreement": kept / reference.dominant_indices.numel(),
        "images_identical": identical / len(reference.dominant_indices),
        "contextual_agreement": contextual / max(1, reference.contextual_indices.numel()),
        "worst_tie": worst_tie,  # largest relative distance below the cut of an index only the candidate keeps
        "max_diff": float(diff.max()),
        "mean_diff": float(diff.mean()),
    }
    measured["pass"] = bool(
        measured["agreement"] >= criteria["min_agreement"]
        and measured["worst_tie"] <= criteria["tie_tolerance"]
        and measured["max_diff"] <= criteria["max_diff"]
        and measured["mean_diff"] <= criteria["mean_diff"]
    )
    return measured


def part_parity(plan: Plan) -> dict:
    from bench_visionzip import build_tower

    from visionzip_tune.algorithm import compress

    hidden, layers, heads = plan.tower
    tower = build_tower("clip", IMAGE_SIZE, hidden, layers, heads, "cpu")
    pixels = torch.randn(plan.parity_batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    log(f"parity: CPU fp32 reference, CLIP {hidden}x{layers}, batch {plan.parity_batch}")
    reference = capture(tower, pixels)
    scores = compress.cls_attention_scores(reference.queries[:, 0], reference.keys, heads, reference.scale)
    references = {budget: zip_captured(reference, *budget) for budget in BUDGETS}
    rows = []
    for dtype_name in plan.parity_dtypes:
        dtype = getattr(torch, dtype_name)
        candidate_tower = copy.deepcopy(tower).to(device=plan.device, dtype=dtype)
        with no_tf32() if dtype == torch.float32 else contextlib.nullcontext():
            captured = capture(candidate_tower, pixels.to(plan.device))
            zips = {budget: zip_captured(captured, *budget) for budget in BUDGETS}
        for (dominant, contextual), zipped in zips.items():
            candidate = compress.ZipResult(*(field.cpu() for field in zipped if field is not None))._replace(
                tokens=zipped.tokens.cpu().float()
            )
            measured = compare_zips(references[dominant, contextual], candidate, scores, PARITY_CRITERIA[dtype_name])
            rows.append({"device": plan.device, "dtype": dtype_name, "budget": f"{dominant}+{contextual}", **measured})
            log(
                f"parity: {plan.device} {dtype_name} {dominant}+{contextual}: agreement {measured['agreement']:.3f}, "
                f"worst tie {measured['worst_tie']:.1e}, max/mean diff {measured['max_diff']:.1e}/"
                f"{measured['mean_diff']:.1e} x RMS: {'pass' if measured['pass'] else 'FAIL'}"
            )
        del candidate_tower, captured, zips
    return {
        "status": "pass" if all(row["pass"] for row in rows) else "fail",
        "reference": "cpu float32",
        "tower": {"hidden": hidden, "layers": layers, "heads": heads, "image_size": IMAGE_SIZE, "layer": FEATURE_LAYER},
        "batch": plan.parity_batch,
        "criteria": PARITY_CRITERIA,
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------------------------
# benches


def part_tower(plan: Plan) -> dict:
    import bench_visionzip

    hidden, layers, heads = plan.tower
    rows = []
    for batch in plan.tower_batches:
        args = bench_visionzip.parse_args(
            [
                "--batch",
                str(batch),
                "--rounds",
                str(plan.tower_rounds),
                "--hidden",
                str(hidden),
                "--layers",
                str(layers),
                "--heads",
                str(heads),
                "--device",
                plan.device,
                "--dtype",
                plan.bench_dtype,
            ]
        )
        log(f"tower: CLIP {hidden}x{layers} {plan.bench_dtype}, batch {batch}, {plan.tower_rounds} rounds")
        times = bench_visionzip.bench_tower("clip", IMAGE_SIZE, FEATURE_LAYER, args)
        bench_visionzip.print_rows(f"clip b{batch}", times, percent=("selection",))
        stock = statistics.median(times["stock"])
        for variant, values in times.items():
            median = statistics.median(values)
            rows.append(
                {
                    "batch": batch,
                    "variant": variant,
                    "median_ms": median,
                    "best_ms": min(values),
                    "ratio_to_stock": median / stock,
                }
            )
        empty_cache(plan)
    return {
        "status": "ok",
        "tower": {"hidden": hidden, "layers": layers, "heads": heads, "image_size": IMAGE_SIZE, "layer": FEATURE_LAYER},
        "dtype": plan.bench_dtype,
        "budget": "54+10",
        "rounds": plan.tower_rounds,
        "timer": "cuda events" if plan.device == "cuda" else "perf_counter",
        "rows": rows,
    }


def part_step(plan: Plan) -> dict:
    import bench_train

    argv = [
        "--geometry",
        plan.step_geometry,
        "--batch",
        str(plan.step_batch),
        "--rounds",
        str(plan.step_rounds),
        "--device",
        plan.device,
        "--dtype",
        plan.bench_dtype,
    ]
    if plan.device == "cpu":  # CPU peak memory needs a fresh process per budget: too slow for this check
        argv.append("--no-memory")
    args = bench_train.parse_args(argv)
    log(f"step: geometry {plan.step_geometry} {plan.bench_dtype}, batch {plan.step_batch}, {plan.step_rounds} rounds")
    rows = bench_train.run(args)
    bench_train.print_table(args, rows)
    empty_cache(plan)
    return {
        "status": "ok",
        "geometry": bench_train.GEOMETRIES[plan.step_geometry],
        "dtype": plan.bench_dtype,
        "batch": plan.step_batch,
        "text_tokens": args.text,
        "rounds": plan.step_rounds,
        "memory": "torch.cuda.max_memory_allocated" if plan.device == "cuda" else "skipped on the CPU",
        "rows": rows,
    }


def empty_cache(plan: Plan) -> None:
    if plan.device == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# eval: the lmms-eval model, batched


def part_eval(plan: Plan, work: Path) -> dict:
    import bench_eval
    from bench_train import GEOMETRIES
    from lmms_eval.tasks import TaskManager

    from visionzip_tune.data.processing import Processing
    from visionzip_tune.demo.dataset import make_demo_dataset
    from visionzip_tune.demo.tiny import TinySpec, build_tiny
    from visionzip_tune.evaluation.lmms import ZippedModel
    from visionzip_tune.evaluation.lmms_tasks import write_choice_tasks
    from visionzip_tune.families import apply_visionzip, remove_visionzip
    from visionzip_tune.inference.prompts import Prompter

    demo = make_demo_dataset(work / "eval-data", n=4, seed=0, n_eval=plan.eval_docs)
    write_choice_tasks(demo.eval, demo.images, work / "eval-tasks")
    manager = TaskManager("ERROR", include_path=str(work / "eval-tasks"))
    shape = GEOMETRIES[plan.eval_geometry]
    model, tokenizer, image_processor = build_tiny(TinySpec(family="llava", text_init_std=0.06, **shape))
    prompter = Prompter.for_recipe(model, Processing(tokenizer, image_processor, tokenizer.chat_template), None)
    rates, invariance = [], []
    for dtype_name in plan.eval_dtypes:
        model.to(device=plan.device, dtype=getattr(torch, dtype_name))
        for budget in (None, (54, 10)):
            if budget is None:
                remove_visionzip(model)
            else:
                apply_visionzip(model, *budget)
            setting = "stock" if budget is None else f"{budget[0]}+{budget[1]}"
            passes = {}
            with no_tf32() if dtype_name == "float32" else contextlib.nullcontext():
                bench_eval.evaluate_once(functools.partial(ZippedModel, model, prompter), manager, 2)  # warm-up
                for batch in plan.eval_batches:
                    log(f"eval: {dtype_name} {setting} batch {batch}, {plan.eval_docs} documents per task")
                    views = functools.partial(ZippedModel, model, prompter, batch_size=batch)
                    passes[batch] = bench_eval.evaluate_once(views, manager, plan.eval_docs)
                    if dtype_name == plan.eval_dtypes[0]:
                        rates.append(
                            {
                                "dtype": dtype_name,
                                "setting": setting,
                                "batch": batch,
                                "batch_size": passes[batch].batch_size,
                                **{f"{kind}_per_s": rate for kind, rate in passes[batch].rates.items()},
                                "ttft_ms": passes[batch].ttft_ms,
                            }
                        )
                    empty_cache(plan)
            reference = plan.eval_batches[0]
            for batch in plan.eval_batches[1:]:
                compared = bench_eval.compare_answers(passes[reference].answers, passes[batch].answers)
                invariance.append({"dtype": dtype_name, "setting": setting, "batch": batch, **compared})
                log(
                    f"eval: {dtype_name} {setting} batch {batch} vs {reference}: texts identical "
                    f"{compared['texts_identical']:.3f}, choices {compared['choices_identical']:.3f}, largest loss "
                    f"difference {compared['loss_max_diff']:.1e}"
                )
    remove_visionzip(model)
    empty_cache(plan)
    return {
        "status": "ok",
        "geometry": shape,
        "documents": plan.eval_docs,
        "reference_batch": plan.eval_batches[0],
        "rates": rates,
        "invariance": invariance,
    }


# ---------------------------------------------------------------------------------------------------------------
# demo: the tiny recipe end to end through train.sh


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def interpreter_shims(work: Path) -> Path:
    """A bin directory whose ``python`` and ``torchrun`` run this interpreter: train.sh calls both by name, and a
    GPU machine may have only ``python3`` on its PATH, or a ``torchrun`` of another Python."""
    shims = work / "bin"
    shims.mkdir(parents=True, exist_ok=True)
    for name, module in (("python", ""), ("torchrun", " -m torch.distributed.run")):
        shim = shims / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}"{module} "$@"\n')
        shim.chmod(0o755)
    return shims


def demo_command(plan: Plan, work: Path, run_dir: Path) -> list[str]:
    data = work / "demo-data"
    overrides = [
        f"output.dir={run_dir}",
        f"model.name_or_path={work / 'demo-model'}",
        f"data.path={data / 'train.json'}",
        f"data.image_folder={data / 'images'}",
        f"data.eval_path={data / 'eval.json'}",
        "logging.progress_bar=false",
        f"deepspeed.bf16={str(plan.demo_bf16).lower()}",
    ]
    if plan.demo_samples is not None:
        overrides.append(f"data.demo_samples={plan.demo_samples}")
    if plan.demo_steps is not None:
        overrides += [f"train.max_steps={plan.demo_steps}", f"train.save_every={plan.demo_steps}"]
    return ["bash", str(ROOT / "train.sh"), str(DEMO_RECIPE), *overrides]


def run_logged(command: list[str], env: dict, log_path: Path, timeout_s: int) -> int:
    """Run ``command`` with its output in ``log_path``, killed after ``timeout_s`` (its whole process group:
    torchrun's workers too); echo its setup lines and every fifth of its steps."""
    step = re.compile(r"^step +(\d+)/(\d+) ")

    def echoed(line: str) -> bool:
        match = step.match(line)
        return line.startswith(("[train]", "[eval]")) or bool(match and int(match[1]) % max(1, int(match[2]) // 5) == 0)

    with (
        open(log_path, "w") as out,
        subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        ) as proc,
    ):
        watchdog = threading.Timer(timeout_s, os.killpg, (proc.pid, signal.SIGKILL))
        watchdog.start()
        try:
            for line in proc.stdout:
                out.write(line)
                if echoed(line):
                    log(f"demo: {line.rstrip()}")
            code = proc.wait()
        finally:
            watchdog.cancel()
    if code == -signal.SIGKILL:
        log(f"demo: killed after {timeout_s} s")
    return code


def loss_fell(losses: list[float]) -> dict:
    """Mean loss of the first and last tenth of the steps (at least one step each); falls = last <= 0.95 x first."""
    k = max(1, len(losses) // 10)
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    return {"steps": len(losses), "loss_first": first, "loss_last": last, "loss_fell": last <= 0.95 * first}


def export_loads_back(model_dir: Path, export_dir: Path) -> dict:
    """Load the export into a fresh base model (``vzt.load_projector``) and check what it did: the projector holds
    the exported tensors (not its initial ones) and the model now feeds the recorded budget of tokens per image."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    import visionzip_tune as vzt

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    exported = load_file(export_dir / "projector.safetensors")
    initial = {name: model.model.state_dict()[name].clone() for name in exported}
    vzt.load_projector(model, export_dir)
    loaded = model.model.state_dict()
    budget = json.loads((export_dir / "visionzip.json").read_text())
    expected = budget["dominant"] + budget["contextual"]
    size = model.config.vision_config.image_size
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=torch.randn(2, 3, size, size)).pooler_output
    result = {
        "tensors_match": all(torch.equal(loaded[name], tensor) for name, tensor in exported.items()),
        "projector_trained": any(not torch.equal(initial[name], tensor) for name, tensor in exported.items()),
        "tokens_per_image": vzt.tokens_per_image(model.config),
        "feature_rows": [int(rows.shape[0]) for rows in features],
        "expected_tokens": expected,
    }
    result["loads_back"] = bool(
        result["tensors_match"]
        and result["projector_trained"]
        and result["tokens_per_image"] == expected
        and result["feature_rows"] == [expected, expected]
    )
    return result


def part_demo(plan: Plan, work: Path, out: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="demo-run-", dir=work))  # fresh: an old run there would be resumed
    path = f"{interpreter_shims(work)}{os.pathsep}{os.environ['PATH']}"
    env = {
        **os.environ,
        "NPROC_PER_NODE": "1",
        "MASTER_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
        "DS_ACCELERATOR": plan.device,
        "PATH": path,
    }
    command = demo_command(plan, work, run_dir)
    log(f"demo: {' '.join(command[1:])}")
    code = run_logged(command, env, out / "demo.log", plan.demo_timeout_s)
    result = {"command": " ".join(command[1:]), "run_dir": str(run_dir), "bf16": plan.demo_bf16, "exit_code": code}
    if code != 0:
        tail = (out / "demo.log").read_text().splitlines()[-40:]
        return {"status": "error", **result, "log_tail": tail}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["accuracy"] for r in records if r["kind"] == "eval"]
    result.update(loss_fell([r["loss"] for r in records if r["kind"] == "train"]))
    result.update(accuracy_before=accuracy[0], accuracy_after=accuracy[-1])
    result.update(export_loads_back(work / "demo-model", run_dir / "export"))
    result["status"] = "pass" if result["loss_fell"] and result["loads_back"] else "fail"
    log(
        f"demo: loss {result['loss_first']:.3f} -> {result['loss_last']:.3f}, accuracy {accuracy[0]:.3f} -> "
        f"{accuracy[-1]:.3f}, export loads back: {result['loads_back']}: {result['status']}"
    )
    return result


# ---------------------------------------------------------------------------------------------------------------
# report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(report: dict) -> str:
    """The short markdown table of a report (gpu_check.md)."""
    env, parts = report["environment"], report["parts"]
    packages = env["packages"]
    if report["device"] == "cuda":
        title = f"GPU check: {env['gpu']} (torch {env['torch']}, CUDA {env['cuda']}, "
    else:
        title = f"GPU check: no CUDA device, CPU parts at small sizes (torch {env['torch']}, "
    lines = [f"### {title}transformers {packages['transformers']}, deepspeed {packages['deepspeed']})", ""]
    if report["skipped"]:
        lines += ["Skipped (GPU only): " + "; ".join(skip["what"] for skip in report["skipped"]) + ".", ""]
    for name, part in parts.items():
        if part.get("status") == "error":
            lines += [f"**{name}**: error: {part['error']}", ""]
    if parts.get("parity", {}).get("rows"):
        parity = parts["parity"]
        tower = parity["tower"]
        lines += [
            f"**Parity**: zipped features vs the CPU's fp32 run (CLIP {tower['hidden']}x{tower['layers']}, "
            f"batch {parity['batch']}; worst of budgets 54+10, 108+20, 162+30; criteria in the JSON)",
            "",
            "| run | indices agreeing | worst near-tie | max / mean diff (x RMS) | verdict |",
            "|---|---|---|---|---|",
        ]
        for dtype in dict.fromkeys(row["dtype"] for row in parity["rows"]):
            rows = [row for row in parity["rows"] if row["dtype"] == dtype]
            lines.append(
                f"| {rows[0]['device']} {dtype} | {100 * min(r['agreement'] for r in rows):.1f}% | "
                f"{max(r['worst_tie'] for r in rows):.1e} | {max(r['max_diff'] for r in rows):.1e} / "
                f"{max(r['mean_diff'] for r in rows):.1e} | {'pass' if all(r['pass'] for r in rows) else 'FAIL'} |"
            )
        lines.append("")
    if parts.get("tower", {}).get("rows"):
        tower = parts["tower"]
        shape = tower["tower"]
        lines += [
            f"**VisionZip tower** (CLIP {shape['hidden']}x{shape['layers']} at {shape['image_size']} px, "
            f"{tower['dtype']}, 54 + 10 tokens; median ms of {tower['rounds']} rounds, {tower['timer']})",
            "",
            "| batch | stock SDPA | VisionZip | official eager route | selection alone |",
            "|---|---|---|---|---|",
        ]
        for batch in dict.fromkeys(row["batch"] for row in tower["rows"]):
            cell = {row["variant"]: row for row in tower["rows"] if row["batch"] == batch}
            lines.append(
                f"| {batch} | {cell['stock']['median_ms']:.1f} | {cell['visionzip']['median_ms']:.1f} "
                f"({cell['visionzip']['ratio_to_stock']:.2f}x) | {cell['eager']['median_ms']:.1f} "
                f"({cell['eager']['ratio_to_stock']:.2f}x) | {cell['selection']['median_ms']:.2f} "
                f"({100 * cell['selection']['ratio_to_stock']:.2f}%) |"
            )
        lines.append("")
    if parts.get("step", {}).get("rows"):
        step = parts["step"]
        shape = step["geometry"]
        lines += [
            f"**Projector-mode step** (CLIP {shape['vision_hidden']}x{shape['vision_layers']} + Llama "
            f"{shape['text_hidden']}x{shape['text_layers']}, {step['dtype']}, batch {step['batch']}, "
            f"{step['text_tokens']} text tokens; memory: {step['memory']})",
            "",
            "| tokens per image | step ms | time ratio | FLOP ratio | peak MiB (step / total) | memory ratio |",
            "|---|---|---|---|---|---|",
        ]
        for row in step["rows"]:
            lines.append(
                f"| {row['tokens_per_image']} ({row['budget']}) | {row['step_ms']:.1f} | {row['time_ratio']:.3f} | "
                f"{row['flop_ratio']:.3f} | {_fmt(row['peak_mib'], '.0f')} / {_fmt(row['peak_total_mib'], '.0f')} | "
                f"{_fmt(row['mem_ratio'], '.3f')} |"
            )
        lines.append("")
    demo = parts.get("demo", {})
    if "loss_first" in demo:
        lines += [
            f"**Demo** (`recipes/tiny/demo.yaml`, {'bf16' if demo['bf16'] else 'fp32'}, {demo['steps']} steps): "
            f"loss {demo['loss_first']:.2f} -> {demo['loss_last']:.2f}, held-out accuracy "
            f"{demo['accuracy_before']:.3f} -> {demo['accuracy_after']:.3f}, export loads back: "
            f"{'yes' if demo['loads_back'] else 'NO'}: {demo['status']}",
            "",
        ]
    evaluation = parts.get("eval", {})
    if evaluation.get("rates"):
        shape = evaluation["geometry"]
        lines += [
            f"**lmms-eval model `visionzip`** (CLIP {shape['vision_hidden']}x{shape['vision_layers']} + Llama "
            f"{shape['text_hidden']}x{shape['text_layers']}, {evaluation['documents']} documents per task; requests/s "
            "of the model's own generate_until / loglikelihood calls, one process)",
            "",
            "| dtype | setting | batch | generate req/s | loglikelihood req/s | TTFT ms |",
            "|---|---|---|---|---|---|",
        ]
        for row in evaluation["rates"]:
            batch = f"auto ({row['batch_size']})" if row["batch"] == "auto" else row["batch"]
            rates = [row["generate_until_per_s"], row["loglikelihood_per_s"]]
            cells = [format(rate, ".1f") if isinstance(rate, float) else str(rate) for rate in rates]
            lines.append(
                f"| {row['dtype']} | {row['setting']} | {batch} | {cells[0]} | {cells[1]} | {_fmt(row['ttft_ms'], '.1f')} |"
            )
        lines += [
            "",
            f"Batch invariance (every document's answers against batch {evaluation['reference_batch']}):",
            "",
            "| dtype | setting | batch | texts identical | choices identical | greedy flags identical | max loss diff |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in evaluation["invariance"]:
            lines.append(
                f"| {row['dtype']} | {row['setting']} | {row['batch']} | {100 * row['texts_identical']:.1f}% | "
                f"{100 * row['choices_identical']:.1f}% | {100 * row['greedy_identical']:.1f}% | "
                f"{row['loss_max_diff']:.1e} |"
            )
        lines.append("")
    verdicts = ", ".join(f"{name} {part['status']}" for name, part in parts.items())
    lines.append(f"Total {report['seconds']:.0f} s; {verdicts}.")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    report["seconds"] = time.monotonic() - _START
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(table(report))


def run_part(name: str, fn: Callable[[], dict], report: dict, out: Path) -> None:
    """Run one part; an exception fails that part only (recorded with its traceback), and the report is rewritten."""
    log(f"{name}: start")
    started = time.monotonic()
    try:
        result = fn()
    except Exception as error:  # one broken part must not cost the figures of the others
        traceback.print_exc(file=sys.stdout)
        result = {
            "status": "error",
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc().splitlines()[-30:],
        }
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["seconds"] = time.monotonic() - started
    report["parts"][name] = result
    write_report(report, out)
    log(f"{name}: {result['status']} in {result['seconds']:.0f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bash bench/gpu_check.sh",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output", type=Path, help="folder for gpu_check.json, gpu_check.md and the logs")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder for the demo (default: a new temp dir)")
    parser.add_argument(
        "--demo-steps",
        type=int,
        default=None,
        help=f"train.max_steps of the demo (default: GPU: the recipe's; CPU: {CPU_PLAN.demo_steps})",
    )
    parser.add_argument(
        "--demo-samples",
        type=int,
        default=None,
        help=f"data.demo_samples of the demo (default: GPU: the recipe's; CPU: {CPU_PLAN.demo_samples})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.stdout = _Tee(sys.__stdout__, open(out / "gpu_check.log", "w"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(name, "1")  # nothing here needs the network; never wait for it

    cuda = torch.cuda.is_available()
    plan = GPU_PLAN if cuda else CPU_PLAN
    overrides = {"demo_steps": args.demo_steps, "demo_samples": args.demo_samples}
    plan = Plan(**{**asdict(plan), **{k: v for k, v in overrides.items() if v is not None}})
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    skipped = (
        []
        if cuda
        else [
            {"part": name, "what": what, "why": "no CUDA device (torch.cuda.is_available() is False)"}
            for name, what in GPU_ONLY.items()
        ]
    )
    report = {
        "device": plan.device,
        "environment": environment(),
        "plan": asdict(plan),
        "work": str(work),
        "skipped": skipped,
        "parts": {},
    }
    env = report["environment"]
    log(
        f"{env.get('gpu', 'no GPU')}; torch {env['torch']} (CUDA {env['cuda']}), transformers "
        f"{env['packages']['transformers']}, deepspeed {env['packages']['deepspeed']}; output {out}, work {work}"
    )
    if not cuda:
        log(f"no CUDA device: skipped {', '.join(GPU_ONLY.values())}; running the CPU parts at small sizes")

    run_part("parity", lambda: part_parity(plan), report, out)
    run_part("tower", lambda: part_tower(plan), report, out)
    run_part("step", lambda: part_step(plan), report, out)
    run_part("demo", lambda: part_demo(plan, work, out), report, out)
    run_part("eval", lambda: part_eval(plan, work), report, out)

    report["ok"] = all(part["status"] in ("pass", "ok") for part in report["parts"].values())
    write_report(report, out)
    print()
    print(table(report), end="")
    log(f"{'all parts passed' if report['ok'] else 'SOME PARTS FAILED'}; wrote {out / 'gpu_check.json'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
