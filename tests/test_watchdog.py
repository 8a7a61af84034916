"""The startup watchdog: a phase that lasts is reported (which, for how long, on what) and again while it lasts; a
short one says nothing; under the launcher a rank keeps its phase in a status file and the launcher's board prints
every waiting rank, and names a rank that has not named a phase. Real threads and files, a tiny threshold."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest

from visionzip_tune import watchdog
from visionzip_tune.errors import UserError
from visionzip_tune.watchdog import RankBoard, Watchdog

TINY = 0.2  # seconds: the threshold of these tests


def reports(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("[wait]")]


def test_a_phase_that_lasts_is_reported_and_again_while_it_lasts(capsys):
    dog = Watchdog("eval", TINY)
    holder = {"pid": 4242}
    with dog.phase("loading the weights of the model", lambda: f"the lock held by process {holder['pid']}"):
        time.sleep(TINY * 3.5)
        holder["pid"] = 4343  # what it waits on is asked at each report
        time.sleep(TINY * 3)
    lines = reports(capsys.readouterr().err)
    time.sleep(TINY * 3)
    assert reports(capsys.readouterr().err) == []  # ended: nothing more
    assert len(lines) >= 2, lines
    assert re.match(
        r"\[wait\] eval: loading the weights of the model for \d+\.\d s, waiting on the lock held by", lines[0]
    )
    assert "VZT_WAIT_REPORT_S" in lines[0] and "VZT_WAIT_REPORT_S" not in lines[1]  # how often: said once
    assert "process 4242" in lines[0] and "process 4343" in lines[-1]


def test_a_short_phase_says_nothing_and_the_innermost_phase_is_the_one_reported(capsys):
    dog = Watchdog("rank 0 of 2", TINY)
    with dog.phase("quick", "nothing"):
        pass
    with dog.phase("setting up", "the model"):
        with dog.phase("the process group's rendezvous", "rank(s) 1 of 2"):
            time.sleep(TINY * 2)
    lines = reports(capsys.readouterr().err)
    assert lines and all("the process group's rendezvous" in line and "rank(s) 1 of 2" in line for line in lines)


def test_ending_a_phase_early_stops_its_reports(capsys):
    dog = Watchdog("eval", TINY)
    with dog.phase("lmms-eval: loading the tasks", "the datasets cache") as end:
        end()  # the first request came: no longer waiting
        time.sleep(TINY * 2)
    assert reports(capsys.readouterr().err) == []


def test_first_of_names_the_wait_for_the_first_item_only(capsys):
    def slow_then_fast():
        time.sleep(TINY * 2.5)
        yield 1
        time.sleep(TINY * 4)  # a later item: training, not the start
        yield 2

    dog = Watchdog("rank 0 of 2", TINY)
    assert list(dog.first_of(slow_then_fast(), "the first batch", "the data loader")) == [1, 2]
    lines = reports(capsys.readouterr().err)
    assert 1 <= len(lines) <= 3 and "the first batch" in lines[0]  # not 4 more while the second item came
    assert list(dog.first_of([], "the first batch", "the data loader")) == []


def test_the_threshold_is_read_from_the_environment_and_checked(monkeypatch):
    monkeypatch.delenv(watchdog.REPORT_ENV, raising=False)
    assert watchdog.report_after_s() == watchdog.DEFAULT_REPORT_S == 30
    monkeypatch.setenv(watchdog.REPORT_ENV, "0.5")
    assert watchdog.report_after_s() == 0.5
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv(watchdog.REPORT_ENV, bad)
        with pytest.raises(UserError, match=rf"VZT_WAIT_REPORT_S='{bad}': give the seconds"):
            watchdog.report_after_s()


def test_ranks_under_the_launcher_keep_a_status_file_that_the_board_prints(tmp_path, capsys):
    board = RankBoard(tmp_path, local_ranks=3, report_after=TINY, starting="starting Python")
    ranks = [Watchdog(f"rank {r} of 3", TINY, tmp_path / f"status-rank{r}.json", local_rank=r) for r in (0, 1)]
    loading, loaded = threading.Event(), threading.Event()

    def rank_loading_weights() -> None:
        with ranks[1].phase("loading the weights of the model", "the files of data/tiny"):
            loading.set()
            loaded.wait()

    thread = threading.Thread(target=rank_loading_weights)
    thread.start()
    loading.wait()
    with ranks[0].phase("the process group's rendezvous", "rank(s) 1, 2 of 3"):
        time.sleep(TINY * 2)
        lines = board.lines(time.time())
    loaded.set()
    thread.join()
    assert reports(capsys.readouterr().err) == []  # a rank under the launcher does not print: the board does
    text = "\n".join(lines)
    assert re.search(
        r"\[wait\] rank 0 of 3: the process group's rendezvous for \d\.\d s, waiting on rank\(s\) 1, 2 of 3", text
    )
    assert re.search(r"\[wait\] rank 1 of 3: loading the weights of the model for \d\.\d s, waiting on the files", text)
    assert "local rank(s) 2 of" in text and "still starting Python" in text  # never named a phase
    assert "VZT_WAIT_REPORT_S" in lines[-1]
    assert "phase" not in json.loads((tmp_path / "status-rank0.json").read_text())  # done: nothing to report
    assert [line for line in board.lines(time.time()) if "rank 0" in line or "rank 1" in line] == []


def test_the_board_puts_ranks_waiting_on_the_same_thing_on_one_line(tmp_path):
    board = RankBoard(tmp_path, local_ranks=2, report_after=TINY, starting="starting Python")
    dogs = [Watchdog(f"rank {r} of 2", TINY, tmp_path / f"status-rank{r}.json", local_rank=r) for r in (0, 1)]
    with dogs[0].phase("initialising DeepSpeed", "all 2 ranks"), dogs[1].phase("initialising DeepSpeed", "all 2 ranks"):
        time.sleep(TINY * 1.5)
        lines = board.lines(time.time())
    assert len(lines) == 1 and lines[0].startswith("[wait] rank 0 of 2, rank 1 of 2: initialising DeepSpeed for")
