"""Pipeline benchmark: minitrain's GPipe / 1F1B vs torch's ScheduleGPipe / Schedule1F1B.

    python benchmarks/bench_pipeline.py          # writes outputs/bench/pipeline.md + .json
    python benchmarks/bench_pipeline.py --quick  # a 2-layer width-32 GPT, 3 steps: a smoke test

The tiny GPT (n_layer 4, n_embd 128, B=16, T=64) split over 2 gloo ranks (one thread each), for
n_micro = 4 and 8. Every variant is first validated: after one step its gradients must equal the
single-process gradients on the whole batch (and ours torch's); only then is it timed, steps
round-robin between ours and torch's with a barrier before each (a noisy machine hits both
alike). A step ends when its slowest rank does. Next to each: the bubble measured from our
per-stage busy time and the formula (p - 1) / (m + p - 1).
Target (same-run ratio): each of ours within 1.3x of torch's step time. Exit status non-zero when
a validation fails (a wrong result never gets a time); a missed target is reported, not hidden.

`traced_steps` (a launch target) is shared with lesson 20 and animations/pipeline_schedule.py.
"""
import argparse
import copy
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks.harness import run_metadata, write_report
from minitrain.bench import measure
from minitrain.distributed_utils import launch
from minitrain.model import GPT, GPTConfig
from minitrain.pipeline import PipelineStage, bubble_fraction, measured_bubble, run_schedule, \
    split_gpt
from minitrain.style import outputs_dir

GPT_SIZE = dict(n_layer=4, n_head=4, n_embd=128, batch=16, seq_len=64)
QUICK_SIZE = dict(n_layer=2, n_head=2, n_embd=32, batch=8, seq_len=16)
N_MICROS = (4, 8)


def loss_fn(logits, targets):
    """Mean cross-entropy over one micro-batch (what torch's pipelining expects too)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def make_model_and_batch(*, n_layer, n_head, n_embd, batch, seq_len, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=256, block_size=seq_len, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd))
    idx = torch.randint(0, 256, (batch, seq_len + 1), generator=torch.Generator().manual_seed(seed))
    return model, idx[:, :-1], idx[:, 1:]  # (B, T) inputs and targets


def _max_diff(module, ref_module):
    ref = dict(ref_module.named_parameters())
    return max((p.grad - ref[n].grad).abs().max().item() for n, p in module.named_parameters())


def traced_steps(rank, world, *, runs, size, warmup=2, iters=5, seed=0, count_bytes=False):
    """Launch target. For each (schedule, n_micro) in `runs`: validate one step against the
    single-process gradients, then time `iters` steps with minitrain.bench.measure (a barrier
    before each). Returns per run: times_s, events (this stage's, one list per timed step),
    peak_held, peak_held_bytes (from one more, untimed, step when count_bytes), max_diff."""
    model, x, y = make_model_and_batch(**size, seed=seed)
    single = copy.deepcopy(model)
    single(x, y)[1].backward()
    ref = split_gpt(single, world)[rank]
    first, last = rank == 0, rank == world - 1
    out = []
    for schedule, m in runs:
        stage = PipelineStage(split_gpt(copy.deepcopy(model), world)[rank], rank, world)
        traces = []

        def step(stage=stage, schedule=schedule, m=m, traces=traces):
            for p in stage.module.parameters():
                p.grad = None
            run_schedule(stage, inputs=x if first else None, targets=y if last else None,
                         n_micro=m, schedule=schedule, loss_fn=loss_fn)
            traces.append(stage.events)

        def counted_step(stage=stage, schedule=schedule, m=m):  # untimed: the hook is slow
            run_schedule(stage, inputs=x if first else None, targets=y if last else None,
                         n_micro=m, schedule=schedule, loss_fn=loss_fn, count_bytes=True)
            return stage.peak_held_bytes

        step()
        diff = _max_diff(stage.module, ref)
        held_bytes = counted_step() if count_bytes else None
        timing = measure(step, tokens_per_step=x.numel(), warmup=warmup, iters=iters,
                         before_each=dist.barrier)
        out.append({"schedule": schedule, "n_micro": m, "times_s": timing["times_s"],
                    "events": traces[-iters:], "peak_held": stage.peak_held,
                    "peak_held_bytes": held_bytes, "max_diff": diff})
    return out


def _vs_torch(rank, world, *, n_micros, size, warmup, iters, seed=0):
    from torch.distributed.pipelining import PipelineStage as TorchPipelineStage
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    model, x, y = make_model_and_batch(**size, seed=seed)
    single = copy.deepcopy(model)
    single(x, y)[1].backward()
    ref = split_gpt(single, world)[rank]
    first, last = rank == 0, rank == world - 1
    variants = {}
    for m in n_micros:
        for schedule, torch_cls in (("gpipe", ScheduleGPipe), ("1f1b", Schedule1F1B)):
            ours = PipelineStage(split_gpt(copy.deepcopy(model), world)[rank], rank, world)
            module = split_gpt(copy.deepcopy(model), world)[rank]
            theirs = torch_cls(TorchPipelineStage(module, rank, world, torch.device("cpu")),
                               n_microbatches=m, loss_fn=loss_fn)
            tie = PipelineStage(module, rank, world)  # torch leaves the tie to the user

            def ours_step(stage=ours, schedule=schedule, m=m):
                for p in stage.module.parameters():
                    p.grad = None
                run_schedule(stage, inputs=x if first else None, targets=y if last else None,
                             n_micro=m, schedule=schedule, loss_fn=loss_fn)
                return stage.events

            def torch_step(sched=theirs, module=module, tie=tie):
                for p in module.parameters():
                    p.grad = None
                sched.step(*([x] if first else []), **({"target": y} if last else {}),
                           return_outputs=False)
                tie.finish_tied_gradients()

            variants[(schedule, m, "minitrain")] = {"step": ours_step, "module": ours.module}
            variants[(schedule, m, "torch")] = {"step": torch_step, "module": module}
    for v in variants.values():  # validate first: one step each, against one process
        v["step"]()
        v["max_diff"] = _max_diff(v["module"], ref)
        v["times_s"], v["events"] = [], []
    for i in range(warmup + iters):  # round-robin: machine noise hits every variant alike
        for key, v in variants.items():
            dist.barrier()
            t0 = time.perf_counter()
            events = v["step"]()
            if i >= warmup:
                v["times_s"].append(time.perf_counter() - t0)
                if events is not None:
                    v["events"].append(events)
    return {key: {k: v[k] for k in ("max_diff", "times_s", "events")}
            for key, v in variants.items()}


def bench(size, n_micros, warmup, iters):
    ranks = launch(_vs_torch, 2, n_micros=n_micros, size=size, warmup=warmup, iters=iters,
                   timeout_s=500, preload=())
    rows = []
    for key in ranks[0]:
        schedule, m, impl = key
        diff = max(r[key]["max_diff"] for r in ranks)
        if not diff < 1e-5:
            raise SystemExit(f"VALIDATION FAILED: {impl} {schedule} m={m}: max |grad - one "
                             f"process| = {diff}")
        times = [max(r[key]["times_s"][j] for r in ranks) for j in range(iters)]
        row = {"schedule": schedule, "n_micro": m, "impl": impl, "max_diff": diff,
               "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
               "max_ms": 1e3 * max(times), "formula_bubble": bubble_fraction(2, m)}
        if impl == "minitrain":
            idle = [measured_bubble([r[key]["events"][j] for r in ranks])[1] for j in range(iters)]
            row["measured_bubble"] = [statistics.median(s[k] for s in idle) for k in range(2)]
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a 2-layer width-32 GPT, 3 steps: checks the pipeline, not targets")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one thread per rank: the two stages share the machine's cores
    size = QUICK_SIZE if args.quick else GPT_SIZE
    warmup, iters = (1, 3) if args.quick else (3, 15)
    t0 = time.perf_counter()
    rows = bench(size, N_MICROS, warmup, iters)
    by = {(r["schedule"], r["n_micro"], r["impl"]): r for r in rows}
    targets = [(f"minitrain {s} / torch {'ScheduleGPipe' if s == 'gpipe' else 'Schedule1F1B'},"
                f" m={m}", by[(s, m, "minitrain")]["median_ms"] / by[(s, m, "torch")]["median_ms"],
                1.3) for s in ("gpipe", "1f1b") for m in N_MICROS]
    meta = run_metadata(t0)
    commit = meta["commit"]
    lines = ["# Pipeline benchmark (2 gloo ranks, CPU)", "",
             f"Machine: {meta['cpu']} ({meta['cpu_count']} cores, shared), torch {meta['torch']},"
             f" 1 thread per rank; commit {commit}; tiny GPT {size}; {iters} timed steps after "
             f"{warmup} warm-up, round-robin.", "Every variant's gradients were checked against "
             "one process on the whole batch before timing. Compare ratios within this run.", "",
             "| schedule | m | impl | median ms | min-max ms | bubble measured (stage 0, 1) |"
             " bubble formula | max abs grad diff |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bub = ("{:.2f}, {:.2f}".format(*r["measured_bubble"]) if "measured_bubble" in r
               else "-")
        lines.append(f"| {r['schedule']} | {r['n_micro']} | {r['impl']} | {r['median_ms']:.1f} |"
                     f" {r['min_ms']:.1f}-{r['max_ms']:.1f} | {bub} | {r['formula_bubble']:.2f} |"
                     f" {r['max_diff']:.1e} |")
    lines += ["", "## Targets", "", "| target | ratio | <= 1.3 |", "|---|---|---|"]
    lines += [f"| {n} | {v:.2f} | {'yes' if v <= lim else 'NO'} |" for n, v, lim in targets]
    lines += ["", "The measured bubble counts everything that is not compute (waiting, gloo's "
              "copies through localhost TCP, other processes holding the cores) and the stages "
              "are not equal (the last one has the head and the loss), so it sits above the "
              "formula, which assumes equal stages and free messages.",
              "", f"Wall time {meta['wall_s']:.0f} s." + (" QUICK smoke run: not a measurement."
                                                          if args.quick else "")]
    report = "\n".join(lines) + "\n"
    write_report(outputs_dir("bench"), "pipeline", report, {
        "meta": meta, "quick": args.quick, "size": size, "rows": rows,
        "targets": [{"name": n, "value": v, "limit": lim, "met": v <= lim}
                    for n, v, lim in targets]})
    print(report)


if __name__ == "__main__":
    main()
