"""Launch a function on N CPU processes that form one torch.distributed group (gloo).

What: `launch(fn, world_size, *args, timeout_s=60)` starts `world_size` processes, joins them into
one gloo process group, calls `fn(rank, world_size, *args, **kwargs)` in each, and returns the list of the
ranks' return values (index = rank). Tests, lessons and benchmarks all use it, so none of them
copies the set-up code.

Why: torch.distributed code needs several processes. In production `torchrun` starts them and sets
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; here one Python call does the same for a lesson or
a test. The pieces that make it safe:
- a rendezvous nobody else uses (a free TCP port on 127.0.0.1, found by binding port 0);
- a timeout on the rendezvous, on every collective and on the whole launch, so a bug that leaves
  one rank waiting for a message that never comes fails loudly instead of hanging the test suite;
- results sent back as bytes (`torch.save`), so tensors survive the child process exiting;
- an exception in any rank is re-raised in the parent with that rank's traceback.

Start method: "fork" (Linux default here) starts a rank in ~0.1 s because the parent's imported
modules are reused; "spawn" starts a fresh interpreter (seconds: it re-imports torch) and needs
`fn` to be importable (defined at module level). Fork is safe here because the parent never
initialises a process group and runs torch with one thread.

Common bug: starting a distributed script with plain `python` runs a single process with
WORLD_SIZE unset; use `torchrun --nproc_per_node N` (or this helper) instead.
"""
import datetime
import io
import os
import queue
import socket
import sys
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


def _worker(rank, world_size, port, timeout_s, fn, args, kwargs, results, threads):
    try:
        torch.set_num_threads(threads)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          RANK=str(rank), WORLD_SIZE=str(world_size))
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            out = fn(rank, world_size, *args, **kwargs)
            results.put((rank, "ok", _to_bytes(out)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report every failure, also KeyboardInterrupt / SystemExit
        results.put((rank, "error", traceback.format_exc()))


def launch(fn, world_size, *args, timeout_s=60.0, start_method=None, threads=1, **kwargs):
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` gloo ranks; return [result_rank0, ...].

    Raises RuntimeError with the failing rank's traceback, or TimeoutError after `timeout_s`.
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
        import torch._dynamo  # noqa: F401
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(r, world_size, port, timeout_s, fn, args, kwargs, results, threads))
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    out = [None] * world_size
    received = 0
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
    finally:
        for p in procs:
            p.join(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return out
