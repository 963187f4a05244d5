"""minitrain.comm_thread: one thread runs every collective, hands back results and errors, and
survives fork; the ring collectives report their errors through it."""
import multiprocessing as mp
import threading

import pytest
import torch

from minitrain.collectives import ring_all_reduce
from minitrain.comm_thread import run_on_comm_thread


def _in_a_thread(fn, timeout_s=10.0):
    """fn() on a helper thread; fails (instead of hanging the suite) if it does not finish."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except Exception as exc:  # re-raised below, in the test's own thread
            box["error"] = exc

    helper = threading.Thread(target=run, daemon=True)
    helper.start()
    helper.join(timeout_s)
    assert not helper.is_alive(), f"did not finish within {timeout_s} s: a deadlock?"
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_the_call_runs_on_the_comm_thread_and_its_result_comes_back():
    name, value = run_on_comm_thread(lambda x: (threading.current_thread().name, 2 * x), 21)
    assert (name, value) == ("minitrain-comm", 42)


def test_an_exception_on_the_comm_thread_is_raised_in_the_caller():
    with pytest.raises(ZeroDivisionError):
        run_on_comm_thread(lambda: 1 / 0)
    assert run_on_comm_thread(lambda: "still alive") == "still alive"


def test_calls_from_many_threads_all_run_on_one_thread():
    """One thread for every caller: collectives cannot overtake each other on the wire."""
    seen = set()
    callers = [threading.Thread(target=lambda: [seen.add(run_on_comm_thread(threading.get_ident))
                                                for _ in range(20)]) for _ in range(3)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(10.0)
    assert len(seen) == 1 and threading.get_ident() not in seen


def _in_a_child(fn, timeout_s=20.0):
    """fn() in a forked child process, its result; a child that hangs is killed and fails the
    test (a deadlocked comm thread in the child cannot block this process's)."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=lambda: results.put(fn()), daemon=True)
    child.start()
    child.join(timeout_s)
    if child.is_alive():
        child.kill()
        pytest.fail(f"the child hung for {timeout_s} s: a deadlock")
    assert child.exitcode == 0, child.exitcode
    return results.get(timeout=5)


def test_a_call_made_on_the_comm_thread_runs_inline_instead_of_waiting_on_itself():
    nested = lambda: run_on_comm_thread(lambda: run_on_comm_thread(lambda: 7))  # noqa: E731
    assert _in_a_child(nested) == 7


def test_a_forked_child_gets_its_own_comm_thread():
    """fork copies the Python object, not the OS thread: the child must start its own."""
    run_on_comm_thread(lambda: None)  # the parent's thread exists before the fork
    assert _in_a_child(lambda: run_on_comm_thread(lambda: "child ok")) == "child ok"


class _FailingGroup:
    """Two ranks on paper; every send fails, as a broken connection would."""

    def rank(self):
        return 0

    def size(self):
        return 2

    def recv(self, tensors, src, tag):
        return _Done()

    def send(self, tensors, dst, tag):
        raise RuntimeError("connection reset by the neighbour")


class _Done:
    def wait(self):
        return True


def test_a_failing_send_inside_the_ring_is_raised_in_the_caller():
    with pytest.raises(RuntimeError, match="connection reset"):
        _in_a_thread(lambda: ring_all_reduce(torch.ones(8), group=_FailingGroup()))
