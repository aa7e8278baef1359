"""The lab knows its processes: one that execs (as ``egressgw run`` does once, to start on its
allocator) is still the lab's throughout, and one that is gone is gone."""

from __future__ import annotations

import subprocess
import sys
import time

from egressgw.lab.lab import process_alive
from egressgw.lab.state import ProcessRecord

# execs itself argv[1] more times, then waits a moment: the marker stays in its command line
EXECS_ITSELF = """
import os, sys, time
left = int(sys.argv[1])
if left:
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[0], str(left - 1), sys.argv[2]])
time.sleep(0.3)
"""


def test_a_process_that_execs_stays_alive_to_the_lab_until_it_exits() -> None:
    marker = "lab-exec-marker"
    child = subprocess.Popen([sys.executable, "-c", EXECS_ITSELF, "20", marker])
    record = ProcessRecord(child.pid, "", [], "", marker)
    polls, deadline = 0, time.monotonic() + 30
    try:
        while child.poll() is None and time.monotonic() < deadline:
            alive = process_alive(record)
            polls += 1
            assert alive or child.poll() is not None, f"seen as gone after {polls} polls"
    finally:
        child.kill()
        child.wait(timeout=10)
    assert polls > 100
    assert not process_alive(record)


def test_a_process_without_the_marker_is_not_the_labs() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        assert not process_alive(ProcessRecord(child.pid, "", [], "", "lab-other-marker"))
    finally:
        child.kill()
        child.wait(timeout=10)
