"""The ranks' rendezvous: a rank that never comes is named by the others within the report threshold, and they stop
after VZT_PROCESS_GROUP_TIMEOUT_S with one paragraph naming it (exit 2) instead of waiting for torch's half hour.
A real rank process, started as torchrun starts one, whose peer is never started."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

from visionzip_tune.distributed import process_group_timeout
from visionzip_tune.errors import UserError


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_rank_that_never_comes_is_named_and_the_others_stop_with_one_paragraph(tmp_path):
    port = free_port()
    rank0 = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env = {**os.environ, **rank0, "VZT_WAIT_REPORT_S": "0.5", "VZT_PROCESS_GROUP_TIMEOUT_S": "5"}
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "visionzip_tune", "train", f"output.dir={run_dir}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    reports = [line for line in done.stderr.splitlines() if line.startswith("[wait] rank 0 of 2: ")]
    assert reports, done.stderr[-3000:]
    first = re.match(
        r"\[wait\] rank 0 of 2: the process group's rendezvous for (\d+\.\d) s, waiting on (.*)", reports[0]
    )
    assert float(first[1]) < 2.5  # said within the threshold (0.5 s, and some scheduling)
    assert first[2].startswith(f"rank(s) 1 of 2, not at the rendezvous 127.0.0.1:{port} yet")
    error = " ".join(done.stderr.split("error: ", 1)[1].split())
    assert error.startswith(
        f"the process group's rendezvous at 127.0.0.1:{port} timed out after 5.0 s (VZT_PROCESS_GROUP_TIMEOUT_S): "
        "rank(s) 1 of 2 never came."
    )
    assert "Traceback" not in done.stderr and not run_dir.exists()  # nothing written


def test_the_process_group_timeout_is_read_from_the_environment_and_checked(monkeypatch):
    monkeypatch.delenv("VZT_PROCESS_GROUP_TIMEOUT_S", raising=False)
    assert process_group_timeout() is None  # torch's own defaults
    monkeypatch.setenv("VZT_PROCESS_GROUP_TIMEOUT_S", "90")
    assert process_group_timeout().total_seconds() == 90
    monkeypatch.setenv("VZT_PROCESS_GROUP_TIMEOUT_S", "never")
    with pytest.raises(UserError, match="VZT_PROCESS_GROUP_TIMEOUT_S='never': give the seconds a rank waits"):
        process_group_timeout()
