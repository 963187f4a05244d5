"""Launch a function on N CPU processes that form one torch.distributed group (gloo).

What: `launch(fn, world_size, *args, timeout_s=60)` starts `world_size` processes, joins them
into one gloo process group, calls `fn(rank, world_size, *args, **kwargs)` in each, and returns
the list of the ranks' return values (index = rank). Tests, lessons and benchmarks all use it, so none of them
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
import importlib
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


def launch(fn, world_size, *args, timeout_s=60.0, start_method=None, threads=1,
           preload=("torch._dynamo",), **kwargs):
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` gloo ranks; return the list
    [result of rank 0, result of rank 1, ...].

    `preload`: modules imported in the parent before forking (pass () when `fn` builds no
    optimizer and no torch DDP). Raises RuntimeError with the failing rank's traceback, or
    TimeoutError after `timeout_s`.
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


# ---- experiments shared by lessons 13-14, the animations and the benchmark -------------------
# Each is a launch target: `launch(train_with_stage, 2, stage)`. They live here (not in the
# algorithm modules) so those stay short and only teach the algorithm.
def train_with_stage(rank, world, stage, *, n_layer=2, n_embd=32, steps=2, seed=0, batch=2,
                     seq_len=32, lr=1e-3):
    """Train the tiny GPT `steps` AdamW steps with ZeRO `stage` (0 = DDP + AdamW) on this rank's
    slice of a seeded batch; return this rank's memory report and the last loss (all-reduced).
    Run it under `minitrain.distributed_utils.launch`. Lessons, animation and bench share it."""
    from minitrain.ddp import DDP
    from minitrain.model import GPT, GPTConfig
    from minitrain.zero import ZeroOptimizer, memory_report, shard_model

    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=256, block_size=seq_len, n_layer=n_layer, n_head=2,
                          n_embd=n_embd))
    num_params = sum(p.numel() for p in model.parameters())
    sync = None
    if stage in (0, 1):
        model = DDP(model)
        sync = model.finish_gradient_synchronization
    if stage == 3:
        shard_model(model)
    inner = model.module if stage in (0, 1) else model
    opt = (ZeroOptimizer(inner.parameters(), torch.optim.AdamW, stage=stage, lr=lr)
           if stage in (1, 2) else torch.optim.AdamW(inner.parameters(), lr=lr))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 256, (world * batch, seq_len + 1), generator=gen)
        mine = idx[rank * batch:(rank + 1) * batch]  # (batch, seq_len + 1)
        opt.zero_grad()
        loss = model(mine[:, :-1], mine[:, 1:])[1]
        loss.backward()
        if sync is not None:
            sync()
        opt.step()
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    return {"stage": stage, "rank": rank, "loss": loss.item() / world,
            **memory_report(inner, opt, stage=stage, num_params=num_params),
            "num_params": num_params}


VARIANTS = {  # label -> DDP keyword arguments (None = torch's DistributedDataParallel)
    "naive": dict(mode="naive", overlap=False),
    "overlap": dict(mode="overlap", overlap=True),
    "bucketed": dict(mode="bucketed", overlap=True),
    "bucketed_no_overlap": dict(mode="bucketed", overlap=False),
    "torch_ddp": None,
}


def compare_ddp_modes(rank, world, *, variants=tuple(VARIANTS), n_layer=2, n_head=2, n_embd=32,
                      batch=4, seq_len=64, check_steps=3, warmup=2, iters=10, seed=0,
                      bucket_cap_mb=25.0):
    """Run under `distributed_utils.launch`: for each variant, train the tiny GPT `check_steps`
    AdamW steps from the same weights (max |param - torch DDP's|), count the all-reduce calls of
    one step, then time steps round-robin over the variants (fair under a noisy machine).
    Returns {label: {"max_diff", "all_reduces_per_step", "times_s"}} for this rank."""
    import copy
    import time

    from torch.nn.parallel import DistributedDataParallel as TorchDDP

    from minitrain.ddp import DDP
    from minitrain.model import GPT, GPTConfig

    torch.manual_seed(seed)
    base = GPT(GPTConfig(vocab_size=256, block_size=seq_len, n_layer=n_layer, n_head=n_head,
                         n_embd=n_embd))
    calls = {"n": 0}
    original_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls["n"] += 1
        return original_all_reduce(*args, **kwargs)

    gen = torch.Generator().manual_seed(seed + 1)
    data = torch.randint(0, 256, (check_steps + 1, world * batch, seq_len + 1), generator=gen)
    runs = {}
    for label in ("torch_ddp",) + tuple(v for v in variants if v != "torch_ddp"):
        kwargs = VARIANTS[label]
        model = (TorchDDP(copy.deepcopy(base)) if kwargs is None
                 else DDP(copy.deepcopy(base), bucket_cap_mb=bucket_cap_mb, **kwargs))
        sync = getattr(model, "finish_gradient_synchronization", lambda: None)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(i, model=model, sync=sync, opt=opt):
            mine = data[i % len(data), rank * batch:(rank + 1) * batch]  # (batch, seq_len + 1)
            opt.zero_grad(set_to_none=True)
            model(mine[:, :-1], mine[:, 1:])[1].backward()
            sync()
            opt.step()

        for i in range(check_steps):
            step(i)
        dist.all_reduce = counting_all_reduce
        calls["n"] = 0
        step(check_steps)
        dist.all_reduce = original_all_reduce
        inner = model.module
        runs[label] = {"step": step, "params": [p.detach().clone() for p in inner.parameters()],
                       "all_reduces_per_step": calls["n"], "times_s": []}
    ref = runs["torch_ddp"]["params"]
    for run in runs.values():
        run["max_diff"] = max((a - b).abs().max().item() for a, b in zip(run["params"], ref))
    for i in range(warmup + iters):
        for run in runs.values():
            dist.barrier()
            t0 = time.perf_counter()
            run["step"](i)
            if i >= warmup:
                run["times_s"].append(time.perf_counter() - t0)
    return {label: {k: run[k] for k in ("max_diff", "all_reduces_per_step", "times_s")}
            for label, run in runs.items() if label in variants}
