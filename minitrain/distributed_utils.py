"""Launch a function on N CPU processes that form one torch.distributed group (gloo).

What: `launch(fn, world_size, *args, timeout_s=60)` starts `world_size` processes, joins them
into one gloo process group, calls `fn(rank, world_size, *args, **kwargs)` in each, and returns
the list of the ranks' return values (index = rank). Tests, lessons and benchmarks all use it, so
none of them copies the set-up code.

Why: torch.distributed code needs several processes. In production `torchrun` starts them and sets
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; here one Python call does the same for a lesson or
a test. The pieces that make it safe:
- a rendezvous nobody else can join: a `FileStore` in a fresh temporary folder (no TCP port to
  race for: a port found free by binding port 0 can be taken by another process before rank 0
  listens on it, and then ranks of two different jobs can meet);
- a timeout on the rendezvous, on every collective and on the whole launch, so a bug that leaves
  one rank waiting for a message that never comes fails loudly instead of hanging the test suite;
- results sent back as bytes (`torch.save`), so tensors survive the child process exiting, and
  flushed to the pipe before the rank tears anything down;
- an orderly exit: every rank passes a barrier before `destroy_process_group`, so no rank leaves
  (closing its sockets) while a peer is still inside a collective; the parent lets the ranks exit
  on their own and reports a rank that crashes while leaving instead of killing it unseen;
- an exception in any rank is re-raised in the parent with that rank's traceback.

Start method: "fork" (Linux default here) starts a rank in ~0.1 s because the parent's imported
modules are reused; "spawn" starts a fresh interpreter (seconds: it re-imports torch) and needs
`fn` to be importable (defined at module level). Fork is safe here because the parent never
initialises a process group and runs torch with one thread.

Common bugs: starting a distributed script with plain `python` runs a single process with
WORLD_SIZE unset; use `torchrun --nproc_per_node N` (or this helper) instead. And tearing a job
down by killing its processes as soon as the answers are in: a rank still closing its group
then loses its peers mid-operation, and a crash there (SIGABRT from C++ teardown) goes unseen.
"""
import datetime
import importlib
import io
import os
import queue
import shutil
import socket
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    """A TCP port that was free a moment ago (the OS picks it when binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _worker(rank, world_size, port, store_path, timeout_s, fn, args, kwargs, results, threads):
    """One rank: join the group, run fn, hand the result back, then leave the group in step."""
    try:
        torch.set_num_threads(threads)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          RANK=str(rank), WORLD_SIZE=str(world_size))
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except BaseException:  # report every failure, also KeyboardInterrupt / SystemExit
        _send(results, (rank, "error", traceback.format_exc()))
        return
    ok = False
    try:
        message = (rank, "ok", _to_bytes(fn(rank, world_size, *args, **kwargs)))
        ok = True
    except BaseException:
        message = (rank, "error", traceback.format_exc())
    _send(results, message)  # the answer is in the pipe before anything is torn down
    try:  # (fn may have destroyed the group itself: then there is nothing left to leave)
        if ok and dist.is_initialized():  # nobody leaves while a peer is still inside fn or
            dist.barrier()                # one of its collectives
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()  # every rank's gloo work is done: the barrier came last


def _send(results, message):
    """Put `message` and wait until the queue's feeder thread has written it to the pipe."""
    results.put(message)
    results.close()
    results.join_thread()


def launch(fn, world_size, *args, timeout_s=60.0, start_method=None, threads=1,
           preload=("torch._dynamo",), **kwargs):
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` gloo ranks; return the list
    [result of rank 0, result of rank 1, ...].

    `preload`: modules imported in the parent before forking (pass () when `fn` builds no
    optimizer and no torch DDP). Raises RuntimeError with the failing rank's traceback (or when
    a rank that returned its result then crashed while leaving the group), or TimeoutError after
    `timeout_s` (no result, or a rank that never exits).
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    if start_method is None:
        start_method = "fork" if sys.platform.startswith("linux") else "spawn"
    if start_method == "fork":
        # torch.optim.Optimizer and torch's DDP import torch._dynamo on first use (5-15 s on a
        # busy 2-core machine). Imported once here, every forked rank inherits it for free.
        for name in preload:
            importlib.import_module(name)
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    store_dir = tempfile.mkdtemp(prefix="minitrain_launch_")  # the rendezvous: a FileStore
    store_path = os.path.join(store_dir, "store")
    port = free_port()  # only exported as MASTER_PORT, for code that reads torchrun's variables
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(r, world_size, port, store_path, timeout_s, fn, args, kwargs,
                               results, threads))
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    out = [None] * world_size
    received = 0
    ok = False
    try:
        while received < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"launch: {world_size - received} rank(s) gave no result "
                                   f"within timeout_s={timeout_s}")
            try:
                rank, status, payload = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    time.sleep(0.2)  # a crashed rank may still be flushing its message
                    if results.empty():
                        raise RuntimeError(f"rank(s) {dead} died with exit codes "
                                           f"{[procs[r].exitcode for r in dead]}")
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            out[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            received += 1
        ok = True
    finally:
        # Success: let every rank leave the group on its own (barrier, destroy, exit) -- killing
        # one mid-teardown is what tears its peers' connections down under them. Failure: the
        # job is lost, stop every rank now.
        grace_end = max(deadline, time.monotonic() + 10.0) if ok else time.monotonic()
        for p in procs:
            p.join(timeout=max(0.0, grace_end - time.monotonic()))
        stuck = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        shutil.rmtree(store_dir, ignore_errors=True)
    if stuck:
        raise TimeoutError(f"launch: rank(s) {stuck} returned their result but did not exit "
                           f"within timeout_s={timeout_s} (stuck leaving the process group)")
    crashed = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode != 0}
    if crashed:
        raise RuntimeError(f"launch: rank(s) {sorted(crashed)} returned their result, then "
                           f"exited with codes {list(crashed.values())} while leaving the "
                           "process group (a crash in teardown: see the ranks' stderr)")
    return out
