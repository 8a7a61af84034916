"""torch's C++ extension build lock (DeepSpeed's CPU ops): a lock a killed build left is removed with a warning
naming it, a lock a live build holds is waited for and its holder named, and the op no run uses is never built.
Real processes holding the lock through torch's own FileBaton, real SIGKILLs, a real first-start build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEMO, train_args

from visionzip_tune.training.build_lock import BUILD_QUIET_S, LockState, clear_build_locks, lock_state

# Takes the lock exactly as torch's JIT build does (and keeps it open as torch does for the whole build).
HOLD = """
import sys, time
from torch.utils.file_baton import FileBaton
baton = FileBaton(sys.argv[1])
assert baton.try_acquire()
print("held", flush=True)
if sys.argv[2] == "die":
    import os; os._exit(0)  # as a SIGKILL would: the lock file stays
time.sleep(600)
"""
CLEAR = "import sys; from pathlib import Path; from visionzip_tune.training.build_lock import clear_build_locks; "
CLEAR += "print(clear_build_locks(Path(sys.argv[1])))"


def hold(lock: Path, then: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), then], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = path.read_text() if path.exists() else ""
        if text in seen:
            return seen
        assert proc.poll() is None, f"ended ({proc.returncode}) before saying {text!r}:\n{seen[-3000:]}"
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} within {timeout} s:\n{seen[-3000:]}")


def test_a_live_build_is_waited_for_with_its_holder_named_and_its_lock_recovered_once_it_is_killed(tmp_path):
    lock = tmp_path / "ext" / "cpu_adam" / "lock"
    lock.parent.mkdir(parents=True)
    holder = hold(lock, "stay")
    log = tmp_path / "waiter.err"
    with open(log, "w") as err:
        waiter = subprocess.Popen(
            [sys.executable, "-c", CLEAR, str(tmp_path / "ext")],
            stderr=err,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "VZT_WAIT_REPORT_S": "0.5"},
        )
    seen = wait_for_text(log, "[wait]", waiter)
    assert f"[ops] waiting for the build lock {lock}, held by the live build of process(es) {holder.pid} (" in seen
    report = seen.split("[wait]")[1]
    assert "waiting for another process's C++ op build for" in report and f"process(es) {holder.pid} (" in report
    time.sleep(1)
    assert waiter.poll() is None  # waits, does not crash or steal the lock
    assert lock.exists()
    holder.send_signal(signal.SIGKILL)  # the build dies without removing its lock
    holder.wait()
    assert waiter.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert f"[ops] warning: removed the stale build lock {lock} after waiting" in log.read_text()
    assert not lock.exists()


def test_a_lock_no_process_holds_is_removed_at_once_with_a_warning_naming_it(tmp_path, capsys):
    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    hold(lock, "die").wait()
    assert lock.exists()
    assert clear_build_locks(tmp_path / "ext") == [lock]
    err = capsys.readouterr().err
    assert f"[ops] warning: removed the stale build lock {lock}: no live process holds it" in err
    assert not lock.exists() and clear_build_locks(tmp_path / "ext") == []


def test_compilers_left_running_by_a_killed_build_hold_its_lock(tmp_path):
    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()
    lock.touch()
    compiler = subprocess.Popen(["sleep", "60"], cwd=lock.parent)  # works in the build directory, as ninja's do
    try:
        assert compiler.pid in lock_state(lock).holders
    finally:
        compiler.kill()
        compiler.wait()
    assert lock_state(lock).holders == [] and lock_state(lock).stale


def test_on_a_shared_filesystem_a_lock_nobody_here_holds_is_stale_only_once_its_build_is_quiet():
    assert not LockState(holders=[], quiet_s=60, shared=True).stale  # another host may still be compiling
    assert LockState(holders=[], quiet_s=BUILD_QUIET_S, shared=True).stale
    assert LockState(holders=[], quiet_s=0, shared=False).stale
    assert not LockState(holders=[123], quiet_s=BUILD_QUIET_S, shared=False).stale


@pytest.mark.slow
def test_a_rank_killed_during_its_first_start_build_leaves_a_lock_the_rerun_recovers(train_assets, tmp_path):
    """The reported hang: a rank SIGKILLed while DeepSpeed's CPU Adam compiles in a fresh extensions directory; the
    rerun used to wait on the lock forever, and now removes it, rebuilds and trains."""
    extensions = tmp_path / "extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "visionzip_tune", "train", str(DEMO)]
    command += train_args(
        train_assets, tmp_path / "run", "deepspeed.offload_optimizer=true", "train.max_steps=1", "data.eval_path=null"
    )
    lock = extensions / "cpu_adam" / "lock"
    with open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 300
    while not lock.exists():
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.err").read_text()[-3000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # mid-build: the OOM killer, or a scheduler after its grace period
    first.wait()
    assert lock.exists()

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"[ops] warning: removed the stale build lock {lock}" in rerun.stderr
    assert "[train] done" in rerun.stdout
    assert not lock.exists() and any((extensions / "cpu_adam").glob("cpu_adam*.so"))
    assert not (extensions / "deepspeed_shm_comm").exists()  # the op no run uses was never built
