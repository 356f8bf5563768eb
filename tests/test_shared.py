"""pop3sf.shared: what the processes of ``processes = N`` share, with real processes.

A real fork for the shared counters, a real second process (the fd passed to it) for the
record locks, and SIGKILL to show the kernel releases a dead holder's locks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from pop3sf.shared import AccountLocks, GroupCounts, PenaltyMarks, SharedState

HOLD = """
import fcntl, os, sys, time
fd, offset = int(sys.argv[1]), int(sys.argv[2])
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
print("held", flush=True)
time.sleep(60)
"""


def test_group_counts_sum_the_rows_of_every_process() -> None:
    counts = GroupCounts(2)
    try:
        counts.row = 0
        counts.add("192.0.2.1", 1)
        pid = os.fork()
        if pid == 0:                        # the other process writes only its own row
            counts.row = 1
            counts.add("192.0.2.1", 2)
            counts.add("192.0.2.9", 1)
            os._exit(0)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert counts.total("192.0.2.1") == 3
        assert counts.grand_total() == 4
        counts.add("192.0.2.1", -1)
        assert counts.total("192.0.2.1") == 2
        counts.clear(1)                     # the other process died: its connections are gone
        assert counts.total("192.0.2.1") == 0
        assert counts.total("192.0.2.9") == 0
        counts.add("192.0.2.1", -5)         # never below zero
        assert counts.total("192.0.2.1") == 0
    finally:
        counts.close()


def test_account_locks_exclude_other_processes_until_they_die() -> None:
    locks = AccountLocks()
    try:
        base = locks.base("alice")
        assert base == locks.base("alice") != locks.base("bob")
        holder = subprocess.Popen([sys.executable, "-c", HOLD, str(locks.fd), str(base)],
                                  pass_fds=[locks.fd], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            assert not locks.try_lock(base)             # never waits
            assert locks.try_lock(base + 1)             # another byte: another slot
            locks.unlock(base + 1)
            holder.send_signal(signal.SIGKILL)
            holder.wait(10)
            assert locks.try_lock(base)                 # released with the dead process
            locks.unlock(base)
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait()
            if holder.stdout is not None:
                holder.stdout.close()
    finally:
        locks.close()


def test_shared_state_closes_everything() -> None:
    before = set(os.listdir("/proc/self/fd"))
    state = SharedState(3)
    assert len(state.penalty_key) == 32
    state.close()
    assert set(os.listdir("/proc/self/fd")) <= before


def test_penalty_marks_seen_by_every_process() -> None:
    marks = PenaltyMarks()
    try:
        pid = os.fork()
        if pid == 0:                        # a child saw a wrong password from this group
            marks.mark("198.51.100.7")
            os._exit(0)
        os.waitpid(pid, 0)
        assert marks.marked("198.51.100.7")
        assert not marks.marked("198.51.100.8") or \
            marks.slot("198.51.100.8") == marks.slot("198.51.100.7")
        marks.unmark(marks.slot("198.51.100.7"))     # the parent, once the penalty decayed
        assert not marks.marked("198.51.100.7")
    finally:
        marks.close()
