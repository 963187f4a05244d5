"""Where a training step's time goes: named phases, a Chrome trace, a one-page report.

What: `StepProfiler(device)` times named phases of each step,
    profiler = StepProfiler(device, enabled=True)
    with profiler.phase("data"): x, y = get_batch(...)
    with profiler.phase("forward"): loss = model(x, y)[1]
    with profiler.phase("backward"): loss.backward()     # phases nest: "backward/comm"
    profiler.step()                                       # closes the step (like prof.step())
    print(profiler.table())
Each phase is also a `torch.profiler.record_function`, so it appears by name in a trace that
`export_chrome_trace(step_fn, path, steps)` writes (open it in chrome://tracing or
https://ui.perfetto.dev). `top_operators(prof)` lists the ATen ops by self time;
`write_profile_report(path, ...)` writes the phase table, the top ops, FLOP/s, MFU and the
roofline position as markdown.

Why: "the step takes 80 ms" does not say what to fix. A phase table shows the data loader
starving the model, a clip that syncs, an optimizer costing as much as the backward; the
trace shows the same per operator and per thread, with gaps where nothing runs.

Formula: fraction(phase) = sum of its time over the recorded steps / sum of the step times.
Top-level phases add up to (about) the step; whatever they do not cover is "(other)".

When it helps: before any optimization (measure, then fix the biggest phase), and to check
that overlap really overlaps (communication hidden inside "backward" on the trace).

Common bug: timing GPU phases with perf_counter. Kernels launch asynchronously: the forward
"takes" 1 ms to launch and the time lands in whichever later phase synchronizes (often
`loss.item()` in "logging"). On CUDA this profiler records CUDA events on the stream instead,
read only at `step()`; on CPU every op is synchronous, so perf_counter is exact.
"""
import contextlib
import json
import os
import pathlib
import time

import torch

from minitrain.files import write_atomic


class StepProfiler:
    """Per-step times of named (nestable) phases; a no-op when enabled=False."""

    def __init__(self, device="cpu", *, enabled=True):
        self.device = torch.device(device)
        self.enabled = enabled
        self.cuda = self.device.type == "cuda"
        self.steps = []  # one dict per closed step: {"step_s": s, "phases": {name: s}}
        self._stack = []  # names of the phases open right now (outer first)
        self._pending = []  # (name, start, end) of the current step; floats or CUDA events
        self._order = {}  # every phase name, in the order phases were first OPENED
        self._step_start = self._now()

    def _now(self):
        if not (self.enabled and self.cuda):
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _seconds(self, start, end):
        if isinstance(start, float):
            return end - start
        return start.elapsed_time(end) / 1e3  # CUDA events: ms -> s

    @contextlib.contextmanager
    def phase(self, name):
        """Time the block under `name` (inside another phase: "outer/name")."""
        if not self.enabled:
            yield
            return
        if not name or "/" in name:
            raise ValueError(f"phase name must be non-empty without '/', got {name!r}")
        full = "/".join([*self._stack, name])
        self._order.setdefault(full, len(self._order))  # a parent opens before its children
        self._stack.append(name)
        try:
            with torch.profiler.record_function(full):
                start = self._now()
                yield
                self._pending.append((full, start, self._now()))
        finally:
            self._stack.pop()

    def step(self):
        """Close the current step (the time since the previous step() or construction)."""
        if not self.enabled:
            return
        if self._stack:
            raise ValueError(f"step() called inside phase {'/'.join(self._stack)!r}: close it first")
        end = self._now()
        if self.cuda:
            end.synchronize()  # the only sync: every event of this step is now timestamped
        phases = {}
        for name, start, stop in self._pending:
            phases[name] = phases.get(name, 0.0) + self._seconds(start, stop)
        self.steps.append({"step_s": self._seconds(self._step_start, end), "phases": phases})
        self._pending = []
        self._step_start = self._now()

    def reset(self):
        """Forget the recorded steps (e.g. after warm-up) and start a new step now."""
        self.steps, self._pending = [], []
        self._step_start = self._now()

    def summary(self, *, skip=0):
        """{name: {"total_s", "per_step_s", "fraction", "calls"}} over the steps after `skip`,
        plus "(step)" (the step time) and "(other)" (step time no top-level phase covers)."""
        steps = self.steps[skip:]
        if not steps:
            raise ValueError("no recorded steps: call profiler.step() at the end of each step")
        total = sum(s["step_s"] for s in steps)
        names = sorted({n for s in steps for n in s["phases"]}, key=self._order.get)
        out = {}
        for name in names:
            t = sum(s["phases"].get(name, 0.0) for s in steps)
            out[name] = {"total_s": t, "per_step_s": t / len(steps), "fraction": t / total,
                         "calls": sum(name in s["phases"] for s in steps)}
        covered = sum(v["total_s"] for n, v in out.items() if "/" not in n)
        other = max(total - covered, 0.0)
        out["(other)"] = {"total_s": other, "per_step_s": other / len(steps),
                          "fraction": other / total, "calls": len(steps)}
        out["(step)"] = {"total_s": total, "per_step_s": total / len(steps), "fraction": 1.0,
                         "calls": len(steps)}
        return out

    def table(self, *, skip=0):
        """The summary as a markdown table (nested phases indented under their parent)."""
        rows = ["| phase | ms / step | share of step |", "|---|---:|---:|"]
        for name, v in self.summary(skip=skip).items():
            label = "&nbsp;&nbsp;" * name.count("/") + name.rsplit("/", 1)[-1]
            rows.append(f"| {label} | {v['per_step_s'] * 1e3:.2f} | {v['fraction']:.1%} |")
        return "\n".join(rows)


def export_chrome_trace(step_fn, path, steps, *, warmup=1, device="cpu", record_shapes=True):
    """Run `step_fn()` `warmup` times untraced, then `steps` times under torch.profiler, and
    write the Chrome trace JSON to `path` (atomically). Returns the torch profiler object
    (use top_operators(prof)). Phases of a StepProfiler inside step_fn show up by name."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for _ in range(warmup):
        step_fn()
    with torch.profiler.profile(activities=activities, record_shapes=record_shapes) as prof:
        for _ in range(steps):
            step_fn()
            prof.step()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        prof.export_chrome_trace(str(tmp))
        os.replace(tmp, path)  # a reader sees the old trace or the whole new one
    finally:
        tmp.unlink(missing_ok=True)
    return prof


class ProfileWindow:
    """Profile steps [start, start + steps) of a training loop that is not a function (the
    trainer): call `begin(step)` first thing in each step and `end(step)` last thing. Step
    start - 1 runs under a FlopCounter (bytes and FLOPs for the roofline position), the window
    under torch.profiler; at its end out_dir/trace.json and out_dir/profile.md are written and
    `done` becomes True. `report` holds the numbers of write_profile_report."""

    def __init__(self, out_dir, profiler, *, start, steps, tokens_per_step, flops_per_token,
                 peak_flops=None, peak_bandwidth=None):
        if steps < 1 or start < 1:
            raise ValueError(f"profile steps must be >= 1 after >= 1 warm-up step, got "
                             f"steps={steps}, start={start}")
        self.out_dir, self.profiler = pathlib.Path(out_dir), profiler
        self.start, self.stop = start, start + steps
        self.kw = dict(tokens_per_step=tokens_per_step, flops_per_token=flops_per_token,
                       peak_flops=peak_flops, peak_bandwidth=peak_bandwidth)
        self.counter = self.prof = self.report = None
        self.bytes_per_step, self.done = None, False

    def begin(self, step):
        if step == self.start - 1:
            from minitrain.profile import FlopCounter
            self.counter = FlopCounter()
            self.counter.__enter__()
        elif step == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.profiler.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
            self.prof.__enter__()
            self.profiler.reset()  # the report covers the window's steps only

    def end(self, step):
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.bytes_per_step, self.counter = self.counter.total_bytes, None
        if self.prof is None or step != self.stop - 1:
            return
        self.prof.__exit__(None, None, None)
        trace = self.out_dir / "trace.json"
        tmp = trace.with_name(f"trace.json.{os.getpid()}.tmp")
        self.prof.export_chrome_trace(str(tmp))
        os.replace(tmp, trace)
        phases = {n.rsplit("/", 1)[-1] for s in self.profiler.steps for n in s["phases"]}
        phases |= {n for s in self.profiler.steps for n in s["phases"]}
        self.report = write_profile_report(
            self.out_dir / "profile.md", self.profiler, trace_path=trace,
            top_ops=top_operators(self.prof, 10, exclude=phases),
            bytes_per_step=self.bytes_per_step, **self.kw)
        self.prof, self.done = None, True

    def close(self):
        """Leave any mode still entered (a run that stopped inside the window)."""
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
        self.counter = self.prof = None


def top_operators(prof, n=10, *, exclude=()):
    """The `n` ATen ops with the largest self time: [{"name", "self_s", "calls", "share"}].
    Self time = time in the op minus its children; names in `exclude` (e.g. phase names)
    and the profiler's own "ProfilerStep#" markers are skipped."""
    averages = [e for e in prof.key_averages()
                if not e.key.startswith("ProfilerStep") and e.key not in exclude]
    cuda = any(getattr(e, "self_device_time_total", 0) for e in averages)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in averages) or 1.0
    ranked = sorted(averages, key=lambda e: getattr(e, attr), reverse=True)[:n]
    return [{"name": e.key, "self_s": getattr(e, attr) / 1e6, "calls": e.count,
             "share": getattr(e, attr) / total} for e in ranked]


def trace_names(path):
    """The set of event names in a Chrome trace JSON (a quick check of what it recorded)."""
    data = json.loads(pathlib.Path(path).read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    return {e.get("name") for e in events if isinstance(e, dict)}


def write_profile_report(path, profiler, *, top_ops=(), tokens_per_step=None,
                         flops_per_token=None, peak_flops=None, peak_bandwidth=None,
                         bytes_per_step=None, trace_path=None, skip=0):
    """Write a markdown report: time per phase, top operators, achieved FLOP/s, MFU against the
    measured peak and the step's roofline position (if bytes_per_step is given). Returns the
    dict of numbers it wrote."""
    from minitrain.profile import mfu, ridge_point

    summary = profiler.summary(skip=skip)
    step_s = summary["(step)"]["per_step_s"]
    lines = ["# Profile of the training step", "",
             f"{len(profiler.steps) - skip} steps recorded; {step_s * 1e3:.2f} ms per step.", "",
             "## Time per phase", "", profiler.table(skip=skip), ""]
    numbers = {"step_s": step_s, "phases": summary}
    if top_ops:
        lines += ["## Top operators by self time", "", "| operator | self ms | calls | share |",
                  "|---|---:|---:|---:|"]
        lines += [f"| `{o['name']}` | {o['self_s'] * 1e3:.2f} | {o['calls']} | {o['share']:.1%} |"
                  for o in top_ops]
        lines.append("")
        numbers["top_ops"] = list(top_ops)
    if tokens_per_step and flops_per_token:
        achieved = tokens_per_step * flops_per_token / step_s
        numbers.update(tokens_per_s=tokens_per_step / step_s, achieved_flops=achieved)
        lines += ["## Utilization", "", f"- tokens/s: {tokens_per_step / step_s:,.0f}",
                  f"- achieved: {achieved / 1e9:.2f} GFLOP/s ({flops_per_token:,} FLOPs/token)"]
        if peak_flops:
            numbers["mfu"] = mfu(tokens_per_step / step_s, flops_per_token, peak_flops)
            lines.append(f"- MFU: {numbers['mfu']:.1%} of the measured peak "
                         f"{peak_flops / 1e9:.1f} GFLOP/s")
        if bytes_per_step and peak_flops and peak_bandwidth:
            intensity = tokens_per_step * flops_per_token / bytes_per_step
            ridge = ridge_point(peak_flops, peak_bandwidth)
            numbers.update(intensity=intensity, ridge=ridge)
            bound = "memory-bound" if intensity < ridge else "compute-bound"
            lines.append(f"- roofline: {intensity:.2f} FLOP/byte (bytes touched by every op) vs "
                         f"ridge {ridge:.2f} FLOP/byte: {bound} as a whole")
        lines.append("")
    if trace_path:
        lines += [f"Trace: `{trace_path}`: open it in chrome://tracing or https://ui.perfetto.dev;"
                  " each row is a thread, each bar an op, the phase names are the outer bars.", ""]
    write_atomic(path, "\n".join(lines))
    return numbers
