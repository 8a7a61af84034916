"""Data-parallel evaluation on 2 CPU processes (gloo): lmms-eval's own launchers (``torchrun``, ``accelerate
launch``) with ``--model visionzip``, and ``python -m visionzip_tune eval`` with ``NPROC_PER_NODE=2``, each giving
what one process gives; and an error on one rank as one paragraph with exit status 2. Real processes, slow."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import datasets
import pytest
from conftest import ROOT, lmms_eval_or_skip

from visionzip_tune.__main__ import main as cli
from visionzip_tune.evaluation.lmms_tasks import write_choice_tasks

lmms_eval_or_skip()
from lmms_eval import evaluator  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

from visionzip_tune.evaluation.lmms import VisionZipModel  # noqa: E402

TASKS = ["heldout_gen", "heldout_mc"]
LIMIT = 6
# A process group set up by an in-process training test leaves these in the environment: they would make a child
# process think it is a rank of that group.
DISTRIBUTED_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def clean_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=clean_env(**env), timeout=600)


@pytest.fixture(scope="module")
def tasks_dir(eval_assets, tmp_path_factory):
    _, _, demo = eval_assets
    out = tmp_path_factory.mktemp("dp-tasks")
    write_choice_tasks(demo.eval, demo.images, out)
    return out


def per_document(samples: dict[str, list[dict]]) -> dict:
    """``{(task, doc_id): answers}`` of lmms-eval's samples (in memory, or as its jsonl files write them: strings):
    a generated text, or ``(loss, is_greedy)`` per choice."""

    def answer(resp):
        return (float(resp[0]), str(resp[1]) == "True") if isinstance(resp, (list, tuple)) else str(resp)

    def answers(resps):  # the jsonl file holds a generated text as itself, not as a list of one
        return [answer(r) for r in ([resps] if isinstance(resps, str) else resps)]

    return {(task, s["doc_id"]): answers(s["filtered_resps"]) for task, rows in samples.items() for s in rows}


@pytest.fixture(scope="module")
def one_process(eval_assets, tasks_dir):
    """lmms-eval in this process, batch 4: the samples two processes must reproduce."""
    model_dir, _, _ = eval_assets
    lm = VisionZipModel(pretrained=str(model_dir), dominant=6, contextual=2, batch_size=4)
    manager = TaskManager("WARNING", include_path=str(tasks_dir))
    results = evaluator.simple_evaluate(model=lm, tasks=TASKS, task_manager=manager, limit=LIMIT, log_samples=True)
    return per_document(results["samples"])


def logged_samples(out) -> dict:
    samples = {task: [json.loads(line) for line in next(out.rglob(f"*_samples_{task}.jsonl")).open()] for task in TASKS}
    return per_document(samples)


def assert_same_answers(two, one):
    assert two.keys() == one.keys()
    for key, answers in one.items():
        if key[0] == "heldout_gen":
            assert two[key] == answers, key
        else:  # losses to float tolerance
            assert [greedy for _, greedy in two[key]] == [greedy for _, greedy in answers]
            assert [loss for loss, _ in two[key]] == pytest.approx([loss for loss, _ in answers], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_lmms_eval_launchers_split_the_requests_and_answer_as_one_process(
    launcher, eval_assets, tasks_dir, one_process, tmp_path
):
    model_dir, _, _ = eval_assets
    out = tmp_path / "out"
    if launcher == "torchrun":
        start = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    else:  # on a machine without a GPU, --multi_gpu is what makes accelerate start several processes
        start = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2"]
        start += [
            "--num_machines=1",
            "--mixed_precision=no",
            "--dynamo_backend=no",
            f"--main_process_port={free_port()}",
        ]
    command = [*start, "-m", "lmms_eval", "--model", "visionzip", "--batch_size", "3", "--limit", str(LIMIT)]
    command += ["--model_args", f"pretrained={model_dir},dominant=6,contextual=2", "--tasks", ",".join(TASKS)]
    command += ["--include_path", str(tasks_dir), "--output_path", str(out), "--log_samples"]
    done = run(command)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_answers(logged_samples(out), one_process)


@pytest.mark.slow
def test_eval_on_two_processes_writes_what_one_process_writes(eval_assets, tmp_path):
    _, export, demo = eval_assets
    argv = ["--projector", str(export), "--held-out", str(demo.eval), "--image-folder", str(demo.images)]
    argv += ["--limit", "3", "--budgets", "3+1"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli(["eval", *argv, "--output-dir", str(one)]) == 0  # one process: in this one
    done = run([sys.executable, "-m", "visionzip_tune", "eval", *argv, "--output-dir", str(two)], NPROC_PER_NODE="2")
    assert done.returncode == 0, done.stderr[-3000:]
    reports = {n: json.loads((out / "results.json").read_text()) for n, out in ((1, one), (2, two))}
    assert reports[2]["processes"] == 2 and reports[1]["processes"] == 1
    for one, two in zip(reports[1]["runs"], reports[2]["runs"]):
        assert one["label"] == two["label"] and one["scores"] == two["scores"]
        for task in one["lmms_eval"]:
            assert {k: v for k, v in one["lmms_eval"][task].items() if "stderr" not in k} == {
                k: v for k, v in two["lmms_eval"][task].items() if "stderr" not in k
            }
        # lmms-eval pads the shorter rank's requests with copies of its last one: two ranks run a few more
        assert two["throughput"]["requests"] >= one["throughput"]["requests"] > 0


@pytest.mark.slow
def test_an_error_on_one_rank_is_one_paragraph_and_exit_status_2(eval_assets, tmp_path):
    """Document 1, which only rank 1 of 2 gets, names a video that does not exist."""
    model_dir, _, demo = eval_assets
    image = next(demo.images.iterdir())
    parquet = tmp_path / "bad.parquet"
    rows = {"question": ["What is it?"] * 2, "answer": ["red"] * 2, "visual": [str(image), "/nonexistent/clip.mp4"]}
    datasets.Dataset.from_dict(rows).to_parquet(str(parquet))
    (tmp_path / "bad.yaml").write_text(
        f"task: bad\ndataset_path: parquet\ndataset_kwargs:\n  data_files:\n    test: {parquet}\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_visual: visual\ndoc_to_text: '{{question}}'\ndoc_to_target: answer\n"
        "generation_kwargs: {max_new_tokens: 2}\nmetric_list:\n  - metric: exact_match\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")  # an earlier eval's: gone, since this one fails
    command = [sys.executable, "-m", "visionzip_tune", "eval", "--model", str(model_dir), "--tasks", "bad"]
    done = run([*command, "--include-path", str(tmp_path), "--output-dir", str(out)], NPROC_PER_NODE="2")
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    message = " ".join(done.stderr[done.stderr.index("error: ") :].split())
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert "task bad, document 1: video /nonexistent/clip.mp4: missing video" in message
    assert not (out / "results.json").exists()
