"""Pipeline parallelism (GPipe, 1F1B) gives the gradients of one process on the whole batch and
of torch.distributed.pipelining's ScheduleGPipe / Schedule1F1B on the same stages.

References: the unsplit minitrain GPT's backward on the whole batch (one process), and torch's
`PipelineStage` + `ScheduleGPipe` / `Schedule1F1B` (gloo, CPU) on copies of the same stages. One
launch per world size runs every case, so the file stays fast.
"""
import copy
import time

import hypothesis.strategies as st
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import Phase, given, settings
from torch.distributed.pipelining import PipelineStage as TorchPipelineStage
from torch.distributed.pipelining import Schedule1F1B as TorchSchedule1F1B
from torch.distributed.pipelining import ScheduleGPipe as TorchScheduleGPipe

from minitrain.distributed_utils import launch
from minitrain.model import GPT, GPTConfig
from minitrain.pipeline import (PipelineStage, bubble_fraction, run_schedule, schedule_order,
                                split_gpt)

pytestmark = pytest.mark.lesson20
TORCH_SCHEDULES = {"gpipe": TorchScheduleGPipe, "1f1b": TorchSchedule1F1B}
SEQ = 8


def _loss_fn(logits, targets):  # mean over one micro-batch, as torch's pipelining expects
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def _model(n_layer, seed):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=SEQ, n_layer=n_layer, n_head=2, n_embd=16))


def _batch(batch, seed):
    idx = torch.randint(0, 64, (batch, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return idx[:, :-1], idx[:, 1:]  # (B, T) inputs, (B, T) targets


def _simulate(schedule, p, m, t_f=1.0, t_b=2.0):
    """Run every stage's schedule_order with fixed forward/backward times and the pipeline's
    dependencies (F_i after F_i upstream, B_i after B_i downstream); return each stage's idle
    share of the step. Raises if the orders deadlock."""
    orders = [schedule_order(schedule, s, p, m) for s in range(p)]
    done, pos, free = {}, [0] * p, [0.0] * p
    while any(pos[s] < len(orders[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if pos[s] == len(orders[s]):
                continue
            kind, i = orders[s][pos[s]]
            dep = (("F", s - 1, i) if s > 0 else None) if kind == "F" else (
                ("B", s + 1, i) if s < p - 1 else ("F", s, i))
            if dep is not None and dep not in done:
                continue
            start = max(free[s], done[dep] if dep else 0.0)
            free[s] = done[(kind, s, i)] = start + (t_f if kind == "F" else t_b)
            pos[s], progressed = pos[s] + 1, True
        assert progressed, f"{schedule} deadlocks for p={p}, m={m}"
    step = max(free)
    return [1 - m * (t_f + t_b) / step for _ in range(p)]


@given(p=st.integers(1, 6), m=st.integers(1, 12), schedule=st.sampled_from(["gpipe", "1f1b"]))
def test_schedules_idle_exactly_the_bubble_fraction(p, m, schedule):
    """Executing either schedule's order with the pipeline's dependencies never deadlocks and
    leaves every stage idle exactly (p - 1) / (m + p - 1) of the step."""
    for idle in _simulate(schedule, p, m):
        assert abs(idle - bubble_fraction(p, m)) < 1e-12
    assert bubble_fraction(p, m) == (p - 1) / (m + p - 1)


@given(p=st.integers(1, 6), m=st.integers(1, 12))
def test_orders_hold_m_for_gpipe_and_at_most_p_for_1f1b(p, m):
    """Each micro-batch is run forward once, then backward once, on every stage; counting the
    micro-batches between their F and their B, GPipe holds m and 1F1B min(p - s, m) <= p."""
    for s in range(p):
        for schedule, expected in (("gpipe", m), ("1f1b", min(p - s, m))):
            order, held, peak = schedule_order(schedule, s, p, m), set(), 0
            assert sorted(order) == sorted([("F", i) for i in range(m)] +
                                           [("B", i) for i in range(m)])
            for kind, i in order:
                if kind == "F":
                    held.add(i)
                else:
                    held.remove(i)  # KeyError if B came before its F
                peak = max(peak, len(held))
            assert peak == expected, (schedule, s, p, m)


def test_bad_arguments_are_refused_with_one_clear_error():
    """Wrong sizes, schedules and placements raise ValueError naming the argument."""
    for args in ((0, 4), (2, 0), (True, 2), (2.0, 4)):
        with pytest.raises(ValueError, match="num_stages|n_micro"):
            bubble_fraction(*args)
    model = _model(2, 0)
    with pytest.raises(ValueError, match="num_stages"):
        split_gpt(model, 3)  # more stages than blocks
    with pytest.raises(ValueError, match="model"):
        split_gpt(torch.nn.Linear(2, 2), 1)
    with pytest.raises(ValueError, match="schedule"):
        schedule_order("zb", 0, 2, 4)
    with pytest.raises(ValueError, match="stage_index"):
        PipelineStage(model, 2, 2)
    stage = PipelineStage(split_gpt(model, 1)[0], 0, 1)
    x, y = _batch(6, 0)
    with pytest.raises(ValueError, match="n_micro"):
        run_schedule(stage, inputs=x, targets=y, n_micro=0, loss_fn=_loss_fn)
    with pytest.raises(ValueError, match="divisible by n_micro=4"):
        run_schedule(stage, inputs=x, targets=y, n_micro=4, loss_fn=_loss_fn)  # 6 = 4 + 2
    with pytest.raises(ValueError, match="schedule"):
        run_schedule(stage, inputs=x, targets=y, n_micro=2, schedule="GPipe", loss_fn=_loss_fn)


@settings(max_examples=10)
@given(n_layer=st.integers(1, 4), data=st.data())
def test_split_stages_chained_are_the_model(n_layer, data):
    """Running the stages of split_gpt one after another gives the model's logits bit for bit;
    every block lands in exactly one stage; the first and last share the tied matrix."""
    p = data.draw(st.integers(1, n_layer))
    model = _model(n_layer, data.draw(st.integers(0, 99)))
    stages, (x, _) = split_gpt(model, p), _batch(3, 1)
    out = x
    for stage in stages:
        out = stage(out)
    assert torch.equal(out, model(x)[0])
    sizes = [len(stage.h) for stage in stages]
    assert sum(sizes) == n_layer and max(sizes) - min(sizes) <= 1  # balanced, nothing twice
    assert sizes == sorted(sizes, reverse=True)  # the extra blocks go to the first stages
    assert stages[0].tied_weight() is stages[-1].tied_weight() is model.lm_head.weight


@settings(max_examples=8)
@given(m=st.sampled_from([1, 2, 3, 6]), schedule=st.sampled_from(["gpipe", "1f1b"]),
       recompute=st.booleans())
def test_one_stage_pipeline_equals_whole_batch_backward(m, schedule, recompute):
    """With p = 1, run_schedule over m micro-batches leaves the gradients and loss of one
    backward of the mean loss over the whole batch (the 1/m loss scaling is right), also with
    the model's activation checkpointing on."""
    model, ref = _model(2, 3), _model(2, 3)
    model.config.activation_checkpointing = ref.config.activation_checkpointing = recompute
    x, y = _batch(6, 2)
    loss = run_schedule(PipelineStage(split_gpt(model, 1)[0], 0, 1), inputs=x, targets=y,
                        n_micro=m, schedule=schedule, loss_fn=_loss_fn)
    ref_loss = ref(x, y)[1]
    ref_loss.backward()
    assert abs(loss - ref_loss.item()) < 1e-5
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()}


def _pipeline_cases(rank, world, n_layer, cases, seed=11):
    """For each (schedule, n_micro, batch): minitrain's grads and loss on this rank's stage, the
    single-process reference, torch's schedule on a copy of the stage, the recorded events."""
    out = []
    for schedule, m, batch in cases:
        model = _model(n_layer, seed)
        theirs, single = copy.deepcopy(model), copy.deepcopy(model)
        x, y = _batch(batch, seed + 1)
        first, last = rank == 0, rank == world - 1
        stage = PipelineStage(split_gpt(model, world)[rank], rank, world)
        try:
            loss = run_schedule(stage, inputs=x if first else None, targets=y if last else None,
                                n_micro=m, schedule=schedule, loss_fn=_loss_fn,
                                count_bytes=True)
        except ValueError as e:
            out.append({"refused": str(e)})
            continue
        ref_loss = single(x, y)[1]
        ref_loss.backward()
        res = {"loss": loss, "ref_loss": ref_loss.item(), "ours": _grads(stage.module),
               "single": _grads(split_gpt(single, world)[rank]), "events": stage.events,
               "peak_held_bytes": stage.peak_held_bytes,
               "tied": None if stage.module.tied_weight() is None else
               stage.module.tied_weight().grad.clone()}
        if schedule == "gpipe" or m >= world:  # torch's 1F1B refuses m < p; ours runs it
            module = split_gpt(theirs, world)[rank]
            sched = TORCH_SCHEDULES[schedule](
                TorchPipelineStage(module, rank, world, torch.device("cpu")),
                n_microbatches=m, loss_fn=_loss_fn)
            sched.step(*([x] if first else []), **({"target": y} if last else {}))
            PipelineStage(module, rank, world).finish_tied_gradients()  # torch leaves the tie
            res["torch"] = _grads(module)
        out.append(res)
    return out


def _check_pipeline_results(results, cases, world):
    for c, (schedule, m, batch) in enumerate(cases):
        if batch % m:  # the first and the last stage refuse an uneven split
            assert "divisible by n_micro" in results[0][c]["refused"]
            assert "divisible by n_micro" in results[-1][c]["refused"]
            continue
        last = results[-1][c]
        assert abs(last["loss"] - last["ref_loss"]) < 1e-5, (schedule, m, last)
        for rank in range(world):
            r = results[rank][c]
            for name, g in r["ours"].items():
                torch.testing.assert_close(g, r["single"][name], msg=f"{schedule} m={m} {name}")
                if "torch" in r:
                    torch.testing.assert_close(g, r["torch"][name], msg=f"torch {schedule} {name}")
            held = max(e["held"] for e in r["events"])
            assert held == (m if schedule == "gpipe" else min(world - rank, m)), (schedule, m)
            assert [e["kind"] for e in r["events"]] == [
                k for k, _ in schedule_order(schedule, rank, world, m)]
        assert torch.equal(results[0][c]["tied"], results[-1][c]["tied"])  # one tied gradient


PP2_CASES = [("gpipe", 1, 4), ("gpipe", 2, 4), ("gpipe", 4, 4), ("gpipe", 3, 6),
             ("1f1b", 1, 4), ("1f1b", 2, 4), ("1f1b", 4, 4), ("1f1b", 3, 6), ("1f1b", 4, 6)]


@pytest.mark.distributed
def test_two_stages_equal_one_process_and_torch_pipelining():
    """On 2 gloo ranks, GPipe and 1F1B with m = 1, 2, 3, 4 give the single-process gradients and
    loss and torch's ScheduleGPipe / Schedule1F1B gradients; both copies of the tied matrix get
    the same full gradient; the recorded events follow the schedule and hold m (GPipe) or at
    most p (1F1B) micro-batches; a batch of 6 in 4 micro-batches is refused on both stages."""
    results = launch(_pipeline_cases, 2, 2, PP2_CASES, timeout_s=120, preload=())
    _check_pipeline_results(results, PP2_CASES, 2)
    gpipe, one_f = results[0][2], results[0][6]  # stage 0, m = 4: GPipe keeps 4, 1F1B 2
    assert one_f["peak_held_bytes"] < 0.75 * gpipe["peak_held_bytes"]


@pytest.mark.distributed
@settings(max_examples=3, phases=(Phase.explicit, Phase.reuse, Phase.generate))  # no shrinking:
@given(schedule=st.sampled_from(["gpipe", "1f1b"]), m=st.sampled_from([2, 3, 6]),  # 3 s a try
       seed=st.integers(0, 10_000))
def test_two_stages_equal_one_process_for_generated_weights(schedule, m, seed):
    """The two-stage equalities hold for generated weights, batches and n_micro (batch 6)."""
    cases = [(schedule, m, 6)]
    _check_pipeline_results(launch(_pipeline_cases, 2, 2, cases, seed, timeout_s=120,
                                   preload=()), cases, 2)


@pytest.mark.distributed
def test_three_stages_equal_one_process_and_torch_pipelining():
    """The same equalities on 3 ranks (one block per stage), where stage 1 is a middle stage
    that neither embeds nor has the head, and the tie spans ranks 0 and 2."""
    cases = [("gpipe", 3, 6), ("1f1b", 3, 6), ("1f1b", 6, 6), ("1f1b", 2, 6)]
    results = launch(_pipeline_cases, 3, 3, cases, timeout_s=120, preload=())
    _check_pipeline_results(results, cases, 3)
    assert results[1][0]["tied"] is None


def _train(rank, world, schedule, steps):
    model = _model(2, 21)
    single = copy.deepcopy(model)
    stage = PipelineStage(split_gpt(model, world)[rank], rank, world)
    # SGD, not AdamW: Adam divides by sqrt(v), which turns the exactly-zero gradient of the key
    # bias (softmax ignores a shift) into rounding noise of size lr in both runs.
    opt = torch.optim.SGD(stage.module.parameters(), lr=0.5, momentum=0.9)
    opt_single = torch.optim.SGD(single.parameters(), lr=0.5, momentum=0.9)
    losses, (x, y) = [], _batch(4, 100)  # one batch, learnt by heart: the loss must fall
    for _ in range(steps):
        opt.zero_grad()
        loss = run_schedule(stage, inputs=x if rank == 0 else None,
                            targets=y if rank == world - 1 else None, n_micro=2,
                            schedule=schedule, loss_fn=_loss_fn)
        opt.step()
        opt_single.zero_grad()
        ref = single(x, y)[1]
        ref.backward()
        opt_single.step()
        losses.append((loss, ref.item()))
    ref_stage = split_gpt(single, world)[rank]
    return {"losses": losses, "tied": stage.module.tied_weight().detach().clone(),
            "params": {n: p.detach().clone() for n, p in stage.module.named_parameters()},
            "ref": {n: p.detach().clone() for n, p in ref_stage.named_parameters()}}


@pytest.mark.distributed
def test_pp2_training_tracks_one_process_and_keeps_the_tie():
    """Four SGD-momentum steps of PP=2 1F1B training give the single-process loss at every step
    and its parameters at the end; the embedding copy (stage 0) and the head copy (stage 1) stay
    bit-equal."""
    results = launch(_train, 2, "1f1b", 4, timeout_s=120)
    for pp_loss, ref_loss in results[-1]["losses"]:
        assert abs(pp_loss - ref_loss) < 1e-5, results[-1]["losses"]
    assert results[-1]["losses"][-1][1] < results[-1]["losses"][0][1]  # it did train
    for r in results:
        for name, p in r["params"].items():
            torch.testing.assert_close(p, r["ref"][name], msg=name)
    assert torch.equal(results[0]["tied"], results[1]["tied"])


def _stuck_peer(rank, world, flag):
    # The pipeline gets its own group: the timeout breaks that group's link (gloo closes it),
    # while the world group stays healthy for launch's closing barrier.
    group = dist.new_group(ranks=[0, 1], backend="gloo")
    stage = PipelineStage(split_gpt(_model(2, 0), 2)[rank], rank, 2, group=group, timeout_s=1.0)
    if rank == 1:  # never sends a gradient back; stays alive until stage 0 gave up (or 15 s)
        deadline = time.monotonic() + 15
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return None
    start = time.perf_counter()
    try:
        run_schedule(stage, inputs=_batch(2, 0)[0], n_micro=2, loss_fn=_loss_fn)
    except RuntimeError as e:
        result = time.perf_counter() - start, str(e)
    flag.touch()  # not through the group: after a timeout gloo has closed that link
    return result


@pytest.mark.distributed
def test_a_silent_peer_ends_with_a_clear_error_not_a_hang(tmp_path):
    """If the next stage never answers, the waiting stage raises a RuntimeError naming the
    stage, the missing message and the peer after its timeout (1 s here, the process group's is
    20 s), instead of hanging."""
    waited, message = launch(_stuck_peer, 2, tmp_path / "gave_up", timeout_s=20, preload=())[0]
    assert waited < 10
    assert "pipeline stage 0: no gradient of micro-batch 0 from stage 1" in message
