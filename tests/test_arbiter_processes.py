"""The arbiter's threads start and reap handler processes without reading each other's descriptors.

multiprocessing's ``Process.start()`` polls every child not yet joined, and a forkserver
child's poll reads its exit status from its sentinel. From several threads at once that
read can land on a process another thread is reaping: one of them then takes the other's
status (and reports 255), or, once the descriptor's number is reused, reads a new pipe's
bytes. ``rpc.arbiter._Processes`` puts every call into a Process under one lock and waits
for exits outside it. Here six threads start and reap real forkserver children as fast as
they can, each child checking the bytes sent to it: every status must be the child's own.
Without the lock, about one child in 150 was reported 255 on this machine in such a run.
"""

from __future__ import annotations

import multiprocessing
import socket
import threading
from multiprocessing.connection import Connection

import pytest
from process_child import GREETING, check_greeting

from rpc.arbiter import _Processes
from rpc.testing import _prepare_forkserver

THREADS, CHILDREN_EACH = 6, 60


@pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(), reason="needs the forkserver start method")
def test_threads_starting_and_reaping_forkserver_children_each_get_their_own_status():
    _prepare_forkserver()  # (its children then start without importing the test runner)
    context = multiprocessing.get_context("forkserver")
    processes = _Processes()
    codes: dict[int | None, int] = {}
    count_lock = threading.Lock()

    def churn() -> None:
        for _ in range(CHILDREN_EACH):
            parent, child = socket.socketpair()
            child_conn = Connection(child.detach())
            process = context.Process(target=check_greeting, args=(child_conn,))
            processes.start(process)
            child_conn.close()
            with parent:
                parent.sendall(GREETING)
                assert processes.exited(process, 60)
                code = processes.reap(process)
            with count_lock:
                codes[code] = codes.get(code, 0) + 1

    threads = [threading.Thread(target=churn) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not any(thread.is_alive() for thread in threads)
    # 255: a status another thread read; 3 (wrong bytes) or 4 (none): a pipe another thread read.
    assert codes == {0: THREADS * CHILDREN_EACH}
