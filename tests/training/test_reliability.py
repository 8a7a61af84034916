"""A run on a real cluster: preemption signals, launcher death, concurrent runs, resume refusals, clean errors under
train.sh, disk failures, stale temporaries and file permissions. Real torchrun processes and real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEMO, ROOT, cli_error, records, train_args
from safetensors.torch import load_file

from visionzip_tune.training.config import load_config
from visionzip_tune.distributed import init_distributed
from visionzip_tune.errors import UserError
from visionzip_tune.training.lock import LOCK_FILE, RunLock
from visionzip_tune.training.preemption import EXIT_INTERRUPTED, INTERRUPTED_FILE, parse_signals
from visionzip_tune.training.loop import train

PREEMPTION_STEPS = 40  # long enough (seconds) to be interrupted mid-run


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **extra}


class Launched(subprocess.Popen):
    """A background ``train.sh`` whose output goes to files: a pipe nobody reads while the run trains would fill
    up and block the ranks' prints (and with them the whole run)."""

    def output(self) -> tuple[str, str]:
        """(stdout, stderr) so far."""
        return self.out_file.read_text(), self.err_file.read_text()


def train_sh(assets, out: Path, *overrides: str, nproc: int = 2, **extra_env: str) -> Launched:
    """``bash train.sh DEMO ...`` (the launcher) in the background, in its own process group."""
    args = train_args(assets, out, *overrides)
    logs = out.parent / f"{out.name}-{time.monotonic_ns()}"
    with open(f"{logs}.out", "w") as stdout, open(f"{logs}.err", "w") as stderr:
        proc = Launched(
            ["bash", str(ROOT / "train.sh"), str(DEMO), *args],
            env=env(NPROC_PER_NODE=str(nproc), **extra_env),
            stdout=stdout,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
    proc.out_file, proc.err_file = Path(f"{logs}.out"), Path(f"{logs}.err")
    return proc


def preemptible(assets, out: Path, *extra: str) -> list[str]:
    """Overrides of a 2-rank run long enough to be interrupted (checkpoints only at the end unless stopped)."""
    return [f"train.max_steps={PREEMPTION_STEPS}", "train.micro_batch_size=2", "train.save_every=0", *extra]


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until metrics.jsonl has a training record for ``step`` (the run is past setup and stepping)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.output()[1][-3000:]
        if (out / "metrics.jsonl").exists() and any(r["step"] >= step for r in records(out, "train")):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def worker_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the training workers under a launcher process (read from their environment)."""
    found = {}
    stack = children(launcher)
    while stack:
        pid = stack.pop()
        stack += children(pid)
        try:
            environ = dict(
                item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item
            )
            cmdline = Path(f"/proc/{pid}/cmdline").read_text()
        except OSError:  # gone meanwhile (polled often, a short-lived helper process can end between the two reads)
            continue
        if "RANK" in environ and "train" in cmdline:
            found[int(environ["RANK"])] = pid
    return found


def projector(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Preemption


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_exits_75_and_resumes_to_the_same_projector(train_assets, tmp_path):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    reference = train_sh(train_assets, whole, *preemptible(train_assets, whole))
    assert reference.wait(timeout=600) == 0, reference.output()[1][-3000:]

    proc = train_sh(train_assets, stopped, *preemptible(train_assets, stopped))
    wait_for_step(stopped, 3, proc)
    os.kill(proc.pid, signal.SIGTERM)  # the launcher only, as `kill PID` or Kubernetes would
    assert proc.wait(timeout=300) == EXIT_INTERRUPTED, proc.output()[1][-3000:]
    out = proc.output()[0]
    marker = json.loads((stopped / INTERRUPTED_FILE).read_text())
    step = marker["step"]
    assert marker["signal"] == "SIGTERM" and 3 <= step < PREEMPTION_STEPS
    assert f"stopped by SIGTERM after step {step}" in out and "Run the same command again to resume" in out
    assert (stopped / "checkpoints" / "latest").read_text().strip() == f"step-{step:06d}"
    assert max(r["step"] for r in records(stopped, "train")) == step  # no step ran after the checkpoint: none lost
    assert not (stopped / LOCK_FILE).exists()

    resumed = train_sh(train_assets, stopped, *preemptible(train_assets, stopped))
    assert resumed.wait(timeout=600) == 0, resumed.output()[1][-3000:]
    a, b = projector(whole, PREEMPTION_STEPS), projector(stopped, PREEMPTION_STEPS)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert [r["step"] for r in records(stopped, "train")] == list(range(1, PREEMPTION_STEPS + 1))
    assert not (stopped / INTERRUPTED_FILE).exists()


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(train_assets, tmp_path):
    out = tmp_path / "run"
    proc = train_sh(train_assets, out, *preemptible(train_assets, out))
    wait_for_step(out, 2, proc)
    workers = worker_pids(proc.pid)
    assert sorted(workers) == [0, 1]
    os.kill(workers[1], signal.SIGUSR1)  # as SLURM's --signal=USR1 would, here reaching rank 1 alone
    assert proc.wait(timeout=300) == EXIT_INTERRUPTED, proc.output()[1][-3000:]
    marker = json.loads((out / INTERRUPTED_FILE).read_text())
    assert marker["signal"] == "a signal on another rank"  # rank 0, which reports, did not get it itself
    state = json.loads((out / "checkpoints" / f"step-{marker['step']:06d}" / "state.json").read_text())
    assert state["step"] == marker["step"] and state["world_size"] == 2


@pytest.mark.slow
def test_workers_stop_with_a_checkpoint_when_their_launcher_is_killed(train_assets, tmp_path):
    out = tmp_path / "run"
    proc = train_sh(train_assets, out, *preemptible(train_assets, out))
    wait_for_step(out, 2, proc)
    workers = worker_pids(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # no chance to forward anything
    deadline = time.monotonic() + 120
    while any(Path(f"/proc/{pid}").exists() for pid in workers.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}/status").exists() for pid in workers.values()), "workers kept training"
    marker = json.loads((out / INTERRUPTED_FILE).read_text())
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{marker['step']:06d}"


def test_save_on_signal_is_validated():
    assert [s.name for s in parse_signals("SIGTERM, usr1")] == ["SIGTERM", "SIGUSR1"]
    assert parse_signals("") == []
    with pytest.raises(UserError, match="train.save_on_signal.*'SIGKILL' is not a signal a process can catch"):
        load_config(DEMO, ["train.save_on_signal=SIGTERM SIGKILL"])


# ---------------------------------------------------------------------------------------------------------------
# One run per directory, free ports


@pytest.mark.slow
def test_concurrent_runs_one_directory_refused_two_directories_both_finish(train_assets, tmp_path):
    first, other = tmp_path / "first", tmp_path / "other"
    long_run = [f"train.max_steps={100 * PREEMPTION_STEPS}", "train.micro_batch_size=2", "train.save_every=0"]
    proc = train_sh(train_assets, first, *long_run)  # still training while the others start and finish
    wait_for_step(first, 1, proc)
    holder = json.loads((first / LOCK_FILE).read_text())
    config_before = (first / "config.yaml").read_text()

    second = train_sh(train_assets, first, *long_run)  # the same output.dir
    assert second.wait(timeout=300) == 2
    err = " ".join(second.output()[1].split())
    assert f"is in use by another run (process {holder['pid']} on {socket.gethostname()}" in err
    assert "Traceback" not in err
    assert (first / "config.yaml").read_text() == config_before  # nothing of the running run was touched

    parallel = train_sh(train_assets, other, *preemptible(train_assets, other))  # same machine, own free port
    assert parallel.wait(timeout=600) == 0, parallel.output()[1][-3000:]
    assert proc.poll() is None, "the first run should still be training"
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == EXIT_INTERRUPTED, proc.output()[1][-3000:]
    steps = [r["step"] for r in records(first, "train")]
    assert steps == list(range(1, len(steps) + 1))  # every step once: no second writer
    assert not (first / LOCK_FILE).exists() and not (other / LOCK_FILE).exists()


def test_a_live_lock_is_refused_and_a_dead_ones_is_taken_over(tmp_path, capsys):
    lock_file = tmp_path / LOCK_FILE
    holder = RunLock(tmp_path).acquire()
    with pytest.raises(UserError, match=rf"in use by another run \(process {os.getpid()} on "):
        RunLock(tmp_path).acquire()
    holder.release()
    assert not lock_file.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "then"}))
    taken = RunLock(tmp_path).acquire()
    assert "taking over the stale lock" in capsys.readouterr().err
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    taken.release()
    elsewhere = {"host": "another-host", "pid": 1, "started": "now"}
    lock_file.write_text(json.dumps(elsewhere))  # another host, fresh heartbeat: alive as far as we can tell
    with pytest.raises(UserError, match="process 1 on another-host"):
        RunLock(tmp_path).acquire()
    os.utime(lock_file, (0, 0))  # no heartbeat for decades
    RunLock(tmp_path).acquire().release()
    # A killed run's pid, reused since by a live process that started at another time: the lock is stale.
    reused = {"host": socket.gethostname(), "pid": os.getpid(), "start": "1", "started": "long ago"}
    lock_file.write_text(json.dumps(reused))
    RunLock(tmp_path).acquire().release()
    assert "taking over the stale lock" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Resume refusals


def run_in_process(assets, out: Path, *overrides: str):
    return train(load_config(DEMO, train_args(assets, out, *overrides)), init_distributed(), recipe=str(DEMO))


@pytest.mark.parametrize(
    "change, named",
    [
        ("visionzip.dominant=5", "visionzip.dominant: 6 -> 5"),
        ("train.mode=full", "train.mode: 'projector' -> 'full'"),
        ("train.lr=0.02", "train.lr: 0.01 -> 0.02"),
        ("train.micro_batch_size=2", "train.micro_batch_size: 4 -> 2"),
        ("data", "the training data changed (data_fingerprint sha256:"),
    ],
    ids=["budget", "mode", "lr", "batch", "data"],
)
def test_resume_refuses_a_change_that_alters_the_result_before_writing(train_assets, tmp_path, change, named):
    out = tmp_path / "run"
    run_in_process(train_assets, out, "train.max_steps=2", "train.save_every=1", "data.eval_path=null")
    latest = (out / "checkpoints" / "latest").read_text()
    config, metrics = (out / "config.yaml").read_text(), (out / "metrics.jsonl").read_text()
    if change == "data":  # the same number of samples, other content
        samples = json.loads(train_assets[1].train.read_text())
        samples[0]["conversations"][-1]["value"] = "something else"
        other = tmp_path / "other.json"
        other.write_text(json.dumps(samples))
        change = f"data.path={other}"
    with pytest.raises(UserError) as err:
        run_in_process(train_assets, out, "train.max_steps=2", "train.save_every=1", "data.eval_path=null", change)
    message = str(err.value)
    assert named in message and "cannot resume from checkpoint" in message
    assert (out / "config.yaml").read_text() == config and (out / "metrics.jsonl").read_text() == metrics
    assert (out / "checkpoints" / "latest").read_text() == latest and not (out / LOCK_FILE).exists()


def test_resume_accepts_harmless_changes(train_assets, tmp_path):
    out = tmp_path / "run"
    run_in_process(train_assets, out, "train.max_steps=3", "train.save_every=1", "train.keep_checkpoints=0")
    (out / "checkpoints" / "latest").write_text("step-000001\n")  # as if killed after step 1
    run_in_process(
        train_assets, out, "train.max_steps=3", "train.save_every=2", "train.eval_every=1", "logging.progress_bar=true"
    )
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------------------
# Clean errors


def test_launch_preflight_errors_are_one_paragraph_before_anything_starts(train_assets, tmp_path, capsys):
    out = tmp_path / "run"
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1, "image": "x.png", "conversations": [{"from": "human", "value": "<image><image>hi"}, ')
    two_tags = tmp_path / "two-tags.json"
    two_tags.write_text(
        json.dumps(
            [
                {
                    "id": "t",
                    "image": "x.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\n<image>\nWhat?"},
                        {"from": "gpt", "value": "red"},
                    ],
                }
            ]
        )
    )
    cases = {
        f"data.path={bad}": "line 1",
        f"data.path={two_tags}": "id t:",
        "visionzip.dominant=17": "dominant + contextual <= N",
        "model.name_or_path=no-such-org/no-such-model": "looks like a hub id, but it is not in the local cache",
        f"model.name_or_path={tmp_path / 'typo'}": "no such directory",
    }
    for override, expected in cases.items():
        message = cli_error(["launch", str(DEMO), *train_args(train_assets, out), override], capsys)
        assert expected in message, (override, message)
        assert not out.exists()


@pytest.mark.slow
def test_a_bad_image_found_after_torchrun_started_is_one_paragraph_and_exit_2(train_assets, tmp_path):
    samples = json.loads(train_assets[1].train.read_text())
    images = tmp_path / "images"
    images.mkdir()
    for picture in train_assets[1].images.iterdir():
        (images / picture.name).symlink_to(picture)
    broken = next(s for s in samples if "image" in s)
    (images / broken["image"]).unlink()
    (images / broken["image"]).write_bytes(b"not a png")
    out = tmp_path / "run"
    proc = train_sh(train_assets, out, f"data.image_folder={images}", "train.max_steps=6", "train.micro_batch_size=2")
    assert proc.wait(timeout=600) == 2
    err = proc.output()[1]
    assert err.count("error: ") == 1 and "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]
    assert f"sample id {broken['id']}: unreadable image" in " ".join(err.split())


# ---------------------------------------------------------------------------------------------------------------
# Disks and files


@pytest.fixture
def small_filesystem(tmp_path):
    """A 160 KiB tmpfs: room for a run directory's config and logs, not for a checkpoint of the tiny model."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_checkpoint_that_cannot_be_written_is_one_paragraph_and_leaves_nothing(
    train_assets, small_filesystem, capsys
):
    out = small_filesystem / "run"
    args = train_args(train_assets, out, "train.max_steps=2", "train.save_every=1", "data.eval_path=null")
    message = cli_error(["train", str(DEMO), *args], capsys)
    assert f"could not write the checkpoint of step 1 to {out / 'checkpoints'}" in message
    assert "No space left on device" in message and "GiB free of" in message
    root = out / "checkpoints"
    assert not (root / "latest").exists() and not [p for p in root.iterdir() if ".tmp-" in p.name]
    assert not (out / "export").exists() and not (out / LOCK_FILE).exists()


def test_leftovers_of_killed_writes_go_and_files_follow_the_umask(train_assets, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / ".step-000009.tmp-write").mkdir(parents=True)
    (out / ".export.tmp-x1y2").mkdir()
    (out / ".config.yaml.tmp-abc").write_text("half")
    previous = os.umask(0o022)
    try:
        run_in_process(train_assets, out, "train.max_steps=1", "data.eval_path=null")
    finally:
        os.umask(previous)
    leftovers = [p for p in [*out.iterdir(), *(out / "checkpoints").iterdir()] if ".tmp-" in p.name]
    assert leftovers == []
    for path, mode in [
        (out / "config.yaml", 0o644),
        (out / "export", 0o755),
        (out / "export" / "visionzip.json", 0o644),
        (out / "export" / "projector.safetensors", 0o644),
        (out / "checkpoints" / "step-000001", 0o755),
        (out / "checkpoints" / "latest", 0o644),
    ]:
        assert path.stat().st_mode & 0o777 == mode, path


# ---------------------------------------------------------------------------------------------------------------
# Waits: each one says on what while it lasts, and a lock whose holder died stops nothing


@pytest.mark.slow
def test_the_launcher_shows_a_rank_stuck_before_the_rendezvous_and_the_run_stops_naming_it(train_assets, tmp_path):
    out = tmp_path / "run"
    proc = train_sh(train_assets, out, VZT_WAIT_REPORT_S="1", VZT_PROCESS_GROUP_TIMEOUT_S="10")
    try:
        deadline = time.monotonic() + 120
        while 1 not in (workers := worker_pids(proc.pid)) or 0 not in workers:
            assert proc.poll() is None and time.monotonic() < deadline, proc.output()[1][-3000:]
            time.sleep(0.02)
        os.kill(workers[1], signal.SIGSTOP)  # stuck while it starts: a hung filesystem, a debugger, a swapped node
        while Path(f"/proc/{workers[0]}/status").exists() and time.monotonic() < deadline + 120:
            time.sleep(0.1)  # rank 0 gives up on its own
        os.kill(workers[1], signal.SIGKILL)  # what torchrun does to a stopped rank, after 30 s of SIGTERM
        assert proc.wait(timeout=300) == 2, proc.output()[1][-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    err = proc.output()[1]
    reports = [line for line in err.splitlines() if line.startswith("[wait] ")]
    waiting = "[wait] rank 0 of 2: the process group's rendezvous for"
    assert any(line.startswith(waiting) and "rank(s) 1 of 2, not at the rendezvous" in line for line in reports), err
    assert any(f"local rank(s) 1 of {socket.gethostname()}: no phase named" in line for line in reports), err
    message = " ".join(err.split("error: ", 1)[1].split())
    assert "timed out after 10 s (VZT_PROCESS_GROUP_TIMEOUT_S): rank(s) 1 of 2 never came" in message
    assert "Traceback" not in err


HOLD_LOCKS = """
import sys, time
from {module} import {lock_class} as Lock
locks = [Lock(path) for path in sys.argv[1:]]
for lock in locks:
    lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_locks(module: str, lock_class: str, paths: list[Path]) -> subprocess.Popen:
    """A process that takes ``paths`` with the library's own lock class and keeps them until it is killed."""
    source = HOLD_LOCKS.format(module=module, lock_class=lock_class)
    holder = subprocess.Popen([sys.executable, "-c", source, *map(str, paths)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_datasets_cache_lock_is_waited_for_while_its_holder_lives_and_free_once_it_is_killed(train_assets, tmp_path):
    from visionzip_tune.data import load_samples

    cache = tmp_path / "cache"
    load_samples(train_assets[1].train, cache_dir=cache)  # the Arrow cache, and the lock files datasets uses for it
    locks = sorted(cache.rglob("*.lock"))
    assert locks
    holder = hold_locks("datasets.utils._filelock", "FileLock", locks)
    log = tmp_path / "load.err"
    data = str(train_assets[1].train)
    load = f"from visionzip_tune.data import load_samples; load_samples({data!r}, cache_dir={str(cache)!r})"
    with open(log, "w") as err:
        loader = subprocess.Popen([sys.executable, "-c", load], stderr=err, env=env(VZT_WAIT_REPORT_S="0.5"))
    deadline = time.monotonic() + 120
    while "[wait]" not in log.read_text():  # these are the locks a load takes: it waits, and says on what
        assert loader.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    assert "reading the samples for" in log.read_text() and str(cache) in log.read_text()
    holder.kill()  # SIGKILL: the kernel drops a dead process's flock
    holder.wait()
    assert loader.wait(timeout=120) == 0, log.read_text()[-3000:]


def test_a_hub_cache_lock_whose_holder_was_killed_is_taken_at_once(tmp_path):
    from filelock import Timeout
    from huggingface_hub.utils import WeakFileLock

    lock = tmp_path / "hub" / ".locks" / "models--org--model" / "0123abcd.lock"  # as hf_hub_download names them
    lock.parent.mkdir(parents=True)
    holder = hold_locks("filelock", "FileLock", [lock])
    with pytest.raises(Timeout), WeakFileLock(lock, timeout=0.5):
        pass  # a live holder: waited for
    holder.kill()
    holder.wait()
    with WeakFileLock(lock, timeout=5):
        assert lock.exists()


W_AND_B_RUN = """
import sys, time
from pathlib import Path
from visionzip_tune.training.config import load_config
from visionzip_tune.training.metrics import MetricLogger
run = Path(sys.argv[1])
run.mkdir(exist_ok=True)
cfg = load_config({demo!r}, ["logging.wandb=true", "logging.progress_bar=false", f"output.dir={{run}}"])
with MetricLogger(run, cfg, total_steps=10, start_step=0, resumed=sys.argv[2] == "resume") as log:
    log.eval({{"kind": "eval", "step": 0, "accuracy": 0.5, "correct": 1, "total": 2}})
    print("logging", flush=True)
    if sys.argv[2] == "stay":
        time.sleep(600)
"""


@pytest.mark.slow
def test_a_wandb_offline_run_killed_mid_run_does_not_stop_the_next_one_in_its_directory(tmp_path):
    run = tmp_path / "run"
    source = W_AND_B_RUN.format(demo=str(DEMO))
    first = subprocess.Popen(
        [sys.executable, "-c", source, str(run), "stay"], stdout=subprocess.PIPE, text=True, env=env()
    )
    assert "logging" in [first.stdout.readline().strip() for _ in range(2)]  # after the eval line it logged
    first.kill()  # SIGKILL with the W&B run open
    first.wait()
    second = subprocess.run(
        [sys.executable, "-c", source, str(run), "resume"], capture_output=True, text=True, timeout=300, env=env()
    )
    assert second.returncode == 0, second.stderr[-3000:]
    run_id = (run / "wandb_id").read_text().strip()
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # the killed one's, and the new one
