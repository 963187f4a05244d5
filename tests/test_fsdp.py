"""minitrain.fsdp.FSDP trains exactly like one process on the whole batch and like torch's own
FSDP2 (`torch.distributed.fsdp.fully_shard`), while each rank keeps 1/N of every weight.

Tolerances (fp32), from the noise measured on this CPU with 2 and 3 gloo ranks (small GPTs,
3 AdamW steps, lr 1e-3):
- gradients: the average of N per-rank gradients differs from the whole-batch gradient by
  up to 8.5 float32 eps of the tensor's largest entry (measured, 3 ranks; torch fully_shard is
  exactly as far from the single process); we allow GRAD_EPS = 16 eps.
- parameters after 3 AdamW steps: measured <= 6.2e-7 from the single process (AdamW turns a
  1-ulp gradient difference on a near-zero entry into a visible step); we allow PARAM_TOL = 2e-6.
  One AdamW step moves a parameter by ~lr = 1e-3, so a wrong shard or a missing rank is 500x
  over it. (A missing 1/N does not change AdamW's step: the gradient check catches that.)
- against fully_shard: bit-identical on 2 ranks (measured), <= 1.2e-7 on 3 (fully_shard divides
  by N inside the reduce-scatter, we after it); we allow FS_TOL = 5e-7.
- compute_dtype bf16/fp16 against one process with the same casts (weights cast from fp32 master
  weights, inputs in that dtype): per-tensor max |diff| / max |ref| of the gradient measured <= 6.2
  eps(dtype) over 16 cases; we allow MP_EPS = 16 eps(dtype). Only the FIRST step is compared
  with the single process: AdamW turns those eps-level gradient differences into ~lr parameter
  differences, so later steps start from different weights. Against fully_shard with the same
  MixedPrecisionPolicy: bit-identical at every step (measured), FS_TOL again.
"""
import copy
import gc
import weakref

import hypothesis.strategies as st
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from hypothesis import given, settings
from torch.distributed.fsdp import MixedPrecisionPolicy as TorchMixedPrecisionPolicy
from torch.distributed.fsdp import fully_shard as torch_fully_shard
from torch.func import functional_call

from minitrain.distributed_utils import launch
from minitrain.fsdp import FSDP, FSDPMode
from minitrain.grad_scaler import GradScaler
from minitrain.model import GPT, GPTConfig
from minitrain.train import param_groups

pytestmark = [pytest.mark.distributed, pytest.mark.lesson18]
STEPS, LOCAL_B, T, LR = 3, 2, 16, 1e-3
GRAD_EPS, PARAM_TOL, FS_TOL, MP_EPS = 16, 2e-6, 5e-7, 16
TIMEOUT = 120


def _gpt(seed, n_layer=2, n_embd=16):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=256, block_size=T, n_layer=n_layer, n_head=2, n_embd=n_embd))


def _batch(step, seed, world):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return torch.randint(0, 256, (world * LOCAL_B, T + 1), generator=gen)  # (N*B, T+1)


def _full_grad(p, like):
    """The full rank-averaged gradient from each rank's flat padded shard (a collective)."""
    k = p.grad.numel()
    full = torch.empty(dist.get_world_size() * k, dtype=p.grad.dtype)
    dist.all_gather_single(full, p.grad.contiguous())
    return full[:like.numel()].view(like.shape)


def _three_ways(rank, world, seed, compute_dtype=None, prefetch=True, n_layer=2):
    """Train the same GPT with FSDP, one process on the whole batch, and fully_shard; return
    per-step full gradients and the final full parameters of each (names -> tensors)."""
    base = _gpt(seed, n_layer)
    ref, ours, theirs = copy.deepcopy(base), FSDP(copy.deepcopy(base), compute_dtype=compute_dtype,
                                                  prefetch=prefetch), copy.deepcopy(base)
    policy = TorchMixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in theirs.transformer.h:
        torch_fully_shard(block, mp_policy=policy)
    torch_fully_shard(theirs, mp_policy=policy)
    opts = [torch.optim.AdamW(m.parameters(), lr=LR) for m in (ref, ours, theirs)]
    names = [n for n, _ in ref.named_parameters()]
    steps = []
    for step in range(STEPS):
        idx = _batch(step, seed, world)
        mine = idx[rank * LOCAL_B:(rank + 1) * LOCAL_B]  # (B, T+1)
        for opt in opts:
            opt.zero_grad()
        if compute_dtype is None:
            ref_loss = ref(idx[:, :-1], idx[:, 1:])[1]
        else:  # the same casts in one process: fp32 master weights, compute in compute_dtype
            cast = {n: p.to(compute_dtype) for n, p in ref.named_parameters()}
            ref_loss = functional_call(ref, cast, (idx[:, :-1], idx[:, 1:]), tie_weights=True)[1]
        ref_loss.backward()
        loss = ours(mine[:, :-1], mine[:, 1:])[1]
        loss.backward()
        ours.finish_gradient_synchronization()
        theirs(mine[:, :-1], mine[:, 1:])[1].backward()
        refp = dict(ref.named_parameters())
        steps.append({
            "ref": {n: refp[n].grad.clone() for n in names},
            "ours": {n: _full_grad(p, refp[n]) for n, p in ours.module.named_parameters()},
            "theirs": {n: p.grad.full_tensor() for n, p in theirs.named_parameters()},
            "loss_dtype": loss.dtype,
            "grad_dtypes": {p.grad.dtype for p in ours.parameters()},
        })
        for opt in opts:
            opt.step()
    state_dtypes = {v.dtype for s in opts[1].state.values() for v in s.values() if v.dim() > 0}
    return {"steps": steps, "state_dtypes": state_dtypes,
            "params": {"ref": {n: p.detach().clone() for n, p in ref.named_parameters()},
                       "ours": ours.full_state_dict(),
                       "theirs": {n: p.full_tensor() for n, p in theirs.named_parameters()}}}


def _max_rel(a, b):
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-30)).item() for n in b)


def _max_abs(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in b)


@pytest.mark.parametrize("world", [2, 3])
@settings(max_examples=2)
@given(seed=st.integers(0, 10_000), n_layer=st.integers(1, 3))
def test_fsdp_equals_one_process_and_fully_shard(world, seed, n_layer):
    """Property: for any seed and depth, N-rank FSDP training gives, at every step, the
    whole-batch gradient of one process (within GRAD_EPS float32 eps) and torch fully_shard's
    gradient, and after 3 AdamW steps the same parameters (PARAM_TOL / FS_TOL)."""
    out = launch(_three_ways, world, seed, n_layer=n_layer, timeout_s=TIMEOUT)[0]
    eps = torch.finfo(torch.float32).eps
    for s in out["steps"]:
        assert _max_rel(s["ours"], s["ref"]) <= GRAD_EPS * eps
        assert _max_abs(s["ours"], s["theirs"]) <= FS_TOL
        assert s["grad_dtypes"] == {torch.float32}
    p = out["params"]
    assert _max_abs(p["ours"], p["ref"]) <= PARAM_TOL
    assert _max_abs(p["ours"], p["theirs"]) <= FS_TOL


@pytest.mark.parametrize("world,dtype", [(2, torch.bfloat16), (3, torch.float16)])
def test_mixed_precision_equals_same_casts(world, dtype):
    """Property: with compute_dtype bf16/fp16 the loss is computed in that dtype, the first
    gradient equals one process computing with the same casts (within MP_EPS eps(dtype) of each
    tensor's max), every step's equals torch fully_shard with the same MixedPrecisionPolicy
    (FS_TOL), and
    gradients handed to the optimizer and its state stay float32 (master weights)."""
    out = launch(_three_ways, world, 7, compute_dtype=dtype, timeout_s=TIMEOUT)[0]
    first = out["steps"][0]  # later steps start from parameters that already differ (below)
    assert _max_rel(first["ours"], first["ref"]) <= MP_EPS * torch.finfo(dtype).eps
    for s in out["steps"]:
        assert s["loss_dtype"] == dtype
        assert _max_abs(s["ours"], s["theirs"]) <= FS_TOL
        assert s["grad_dtypes"] == {torch.float32}
    assert out["state_dtypes"] == {torch.float32}
    assert _max_abs(out["params"]["ours"], out["params"]["theirs"]) <= FS_TOL


def _prefetch_on_off(rank, world, seed):
    runs = {}
    for prefetch, reshard in ((True, True), (False, True), ("keep", False)):
        trace = []
        model = FSDP(_gpt(seed, n_layer=3), prefetch=bool(prefetch), trace=trace,
                     reshard_after_forward=reshard)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        losses = []
        for step in range(STEPS):
            idx = _batch(step, seed, world)[rank * LOCAL_B:(rank + 1) * LOCAL_B]
            opt.zero_grad()
            loss = model(idx[:, :-1], idx[:, 1:])[1]
            loss.backward()
            model.finish_gradient_synchronization()
            opt.step()
            losses.append(loss.detach())
        runs[prefetch] = {"losses": torch.stack(losses), "params": model.full_state_dict(),
                          "trace": trace, "gathered": model.stats["all_gather_bytes"]}
    return runs


def _overlapped(trace):
    """Units whose all-gather (in the last of the 3 steps) was started ahead of need: other
    events happened between its start and its use. Without prefetch, start is followed at once
    by "gathered" for the same unit (the caller waits)."""
    last = trace[len(trace) * 2 // 3:]
    early = set()
    for (_, unit, what), (_, nxt_unit, nxt) in zip(last, last[1:]):
        if what.startswith("all-gather start") and not (nxt_unit == unit
                                                        and nxt.startswith("gathered")):
            early.add(unit)
    return early


def test_prefetch_and_reshard_after_forward_change_no_number():
    """Property: prefetch only moves WHEN each all-gather starts: the losses and parameters of
    3 steps are bit-identical with and without it, and with it (from step 2 on, once the order
    is recorded) all-gathers really start while another unit is computing.
    reshard_after_forward=False (FSDP2's flag; ZeRO-2-like) keeps each unit's gathered weights
    from forward to backward: the same numbers bit for bit, exactly half the all-gather bytes."""
    runs = launch(_prefetch_on_off, 2, 3, timeout_s=TIMEOUT)[0]
    assert torch.equal(runs[True]["losses"], runs[False]["losses"])  # (True, True) vs (False, True)
    for name, value in runs[False]["params"].items():
        assert torch.equal(runs[True]["params"][name], value), name
    assert len(_overlapped(runs[True]["trace"])) >= 2
    assert _overlapped(runs[False]["trace"]) == set()
    assert torch.equal(runs["keep"]["losses"], runs[True]["losses"])
    for name, value in runs[True]["params"].items():
        assert torch.equal(runs["keep"]["params"][name], value), name
    assert 2 * runs["keep"]["gathered"] == runs[True]["gathered"]


class Odd(nn.Module):
    """The embedding reused as the head, a frozen parameter, an unused layer (.grad None) and
    sizes that do not divide the world size; with units=blocks, emb and head_bias are replicated."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(11, 7)
        self.blocks = nn.ModuleList([nn.Linear(7, 7), nn.Linear(7, 7)])
        self.blocks[1].bias.requires_grad_(False)  # frozen: never communicated, never changes
        self.unused = nn.Linear(3, 5)  # in no forward: .grad stays None
        self.head_bias = nn.Parameter(torch.randn(11) * 0.1)

    def forward(self, idx, targets):  # idx: (B, L)
        x = self.emb(idx)  # (B, L, 7)
        for blk in self.blocks:
            x = x + torch.tanh(blk(x))
        logits = x @ self.emb.weight.T + self.head_bias  # tied head: (B, L, 11)
        return nn.functional.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1))


def _odd_run(rank, world, seed, units):
    ref = Odd(seed)
    model = copy.deepcopy(ref)
    units = list(model.blocks) if units == "blocks" else None
    ours = FSDP(model, units=units)
    frozen_before = model.blocks[1].bias.detach().clone()
    opts = [torch.optim.SGD(ref.parameters(), lr=0.5), torch.optim.SGD(ours.parameters(), lr=0.5)]
    gen = torch.Generator().manual_seed(seed)
    out = {"grads": [], "replicated": []}
    for _ in range(STEPS):
        for opt in opts:
            opt.zero_grad()
        for _micro in range(2):  # gradient accumulation: two backwards, one synchronisation
            idx, tgt = torch.randint(0, 11, (2, world * 3, 5), generator=gen)
            ref(idx, tgt).backward()
            sl = slice(rank * 3, (rank + 1) * 3)
            ours(idx[sl], tgt[sl]).backward()
        ours.finish_gradient_synchronization()
        refp = dict(ref.named_parameters())
        grads = {}
        for n, p in model.named_parameters():
            if p.grad is None:
                grads[n] = None
            elif p.shape == refp[n].shape:  # replicated (or frozen): the full tensor
                grads[n] = p.grad.clone()
            else:
                grads[n] = _full_grad(p, refp[n])
        out["grads"].append({"ours": grads, "ref": {n: None if p.grad is None else p.grad.clone()
                                                    for n, p in refp.items()}})
        out["replicated"].append({n: g for n, g in grads.items() if g is not None
                                  and model.get_parameter(n).shape == refp[n].shape})
        for opt in opts:
            opt.step()
    out["params"] = {"ours": ours.full_state_dict(), "ref": dict(ref.state_dict())}
    out["frozen_kept"] = torch.equal(model.blocks[1].bias, frozen_before)
    return out


@pytest.mark.parametrize("world,units", [(2, "blocks"), (3, "default")])
def test_tied_frozen_unused_and_replicated(world, units):
    """Property: with a tied embedding/head, a frozen bias, an unused layer and (units=blocks) a
    replicated parameter, FSDP gives every trainable parameter one process's gradient (None
    where one process has None), also accumulated over two backwards before one
    finish_gradient_synchronization(); replicated gradients are equal on every rank, the frozen
    parameter never changes, and 3 SGD steps land on one process's parameters."""
    outs = launch(_odd_run, world, 5, units, timeout_s=TIMEOUT)
    out = outs[0]
    eps = torch.finfo(torch.float32).eps
    for g in out["grads"]:
        for n, ref in g["ref"].items():
            ours = g["ours"][n]
            assert (ours is None) == (ref is None), n
            if ref is not None:
                assert (ours - ref).abs().max() <= GRAD_EPS * eps * ref.abs().max(), n
    assert out["grads"][0]["ours"]["unused.weight"] is None
    for step, rep in enumerate(out["replicated"]):
        for other in outs[1:]:
            for n, g in rep.items():
                assert torch.equal(g, other["replicated"][step][n]), n
    if units == "blocks":
        assert "head_bias" in out["replicated"][0] and "emb.weight" in out["replicated"][0]
    assert out["frozen_kept"]
    for n, ref in out["params"]["ref"].items():
        assert (out["params"]["ours"][n] - ref).abs().max() <= PARAM_TOL, n


def _round_trip(rank, world, cases):
    outs = []
    for seed, n_embd in cases:
        model = FSDP(_gpt(seed, n_layer=2, n_embd=n_embd))
        first = model.full_state_dict()
        other = _gpt(seed + 1, n_layer=2, n_embd=n_embd).state_dict()
        model.load_full_state_dict(other)
        second = model.full_state_dict()
        _gpt(seed + 2, n_layer=2, n_embd=n_embd).load_state_dict(second)  # strict: all names
        outs.append({"first": first, "plain": _gpt(seed, n_layer=2, n_embd=n_embd).state_dict(),
                     "second": second, "other": other, "n_embd": n_embd,
                     "shard_numel": model.module.transformer.wpe.weight.numel()})
    return outs


@pytest.mark.parametrize("world", [2, 3])
@settings(max_examples=1)
@given(cases=st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from([6, 10, 16])),
                      min_size=3, max_size=3))
def test_full_state_dict_round_trips(world, cases):
    """Property: full_state_dict() returns exactly the unwrapped model's state dict (every name,
    tied ones included, fp32), although each rank holds a padded 1/N shard;
    load_full_state_dict(d) followed by full_state_dict() gives back d bit for bit. (Several
    drawn models per launch: starting ranks costs more than the check.)"""
    for out in launch(_round_trip, world, cases, timeout_s=TIMEOUT)[0]:
        assert out["first"].keys() == out["plain"].keys()
        for n, v in out["plain"].items():
            assert torch.equal(out["first"][n], v) and out["first"][n].dtype == torch.float32, n
        for n, v in out["other"].items():
            assert torch.equal(out["second"][n], v), n
        assert out["shard_numel"] == -(-T * out["n_embd"] // world)  # ceil(numel / N)


def _lifecycle(rank, world):
    model = FSDP(_gpt(0, n_layer=3), prefetch=False)
    calls = {"n": 0}
    for block in model.module.transformer.h:
        block.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    refs, original = [], FSDP._take_gathered

    def spy(self, unit, phase):
        flat = original(self, unit, phase)
        if phase == "forward":
            refs.append(weakref.ref(flat))
        return flat

    FSDP._take_gathered = spy
    try:
        idx = _batch(0, 0, world)[rank * LOCAL_B:(rank + 1) * LOCAL_B]
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        gc.collect()
        alive_after_forward = sum(r() is not None for r in refs)
        loss.backward()
        model.finish_gradient_synchronization()
    finally:
        FSDP._take_gathered = original
    try:
        model.module(idx[:, :-1], idx[:, 1:])
        direct = "no error"
    except ValueError as e:
        direct = str(e)
    full_bytes = 4 * sum(p.numel() for p in _gpt(0, n_layer=3).parameters())
    return {"alive": alive_after_forward, "gathered": len(refs), "block_forwards": calls["n"],
            "peak": model.stats["peak_gathered_bytes"], "full_bytes": full_bytes,
            "left": model.stats["gathered_bytes"], "direct": direct,
            "bad_units": _bad_units()}


def test_weights_are_not_saved_for_backward_and_nothing_is_recomputed():
    """Property: after the forward no gathered weight buffer is alive (autograd saved tags, not
    the weights), each block runs forward exactly once per step (no recomputation, unlike
    activation checkpointing), the gathered bytes never reach the full model's, all are freed
    after the step, and calling fsdp.module directly with grad on is refused."""
    out = launch(_lifecycle, 2, timeout_s=TIMEOUT)[0]
    assert out["gathered"] == 4  # root + 3 blocks
    assert out["alive"] == 0
    assert out["block_forwards"] == 3
    assert 0 < out["peak"] < out["full_bytes"] and out["left"] == 0
    assert "call the FSDP wrapper" in out["direct"]
    # bad units: a module outside the model; a tied weight whose uses are split across units
    assert "submodules of the wrapped module" in out["bad_units"][0]
    assert "tied weights across units" in out["bad_units"][1]


def test_bad_arguments_raise_value_error():
    """Bad input fails with one clear ValueError naming the argument (no process group here)."""
    with pytest.raises(ValueError, match="compute_dtype"):
        FSDP(nn.Linear(2, 2), compute_dtype=torch.int32)
    with pytest.raises(ValueError, match="reduce_dtype"):
        FSDP(nn.Linear(2, 2), reduce_dtype=None)
    with pytest.raises(ValueError, match="torchrun"):
        FSDP(nn.Linear(2, 2))


def _bad_units():
    errors = []
    model = _gpt(0)
    for units in ([nn.Linear(2, 2)], [model.transformer.wte]):  # not inside; tied across units
        try:
            FSDP(model, units=units)
            errors.append("no error")
        except ValueError as e:
            errors.append(str(e))
    return errors


def _mode_run(rank, world, state=None, steps=range(4), save_after=1):
    mode = FSDPMode(rank, world)
    model = mode.prepare_model(_gpt(0, n_layer=2))
    opt = mode.build_optimizer(param_groups(model, 0.1), lr=1e-2)
    if state is not None:
        mode.load_state_dict(model, opt, state)
    losses, saved = [], None
    for step in steps:
        idx = _batch(step, 0, world)[rank * LOCAL_B:(rank + 1) * LOCAL_B]
        opt.zero_grad()
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        loss.backward()
        mode.after_backward(opt)
        opt.step()
        losses.append(loss.detach())
        if step == save_after:
            saved = mode.state_dict(model, opt)
    return torch.stack(losses), saved, [len(g["params"]) for g in opt.param_groups]


def _mode_resume(rank, world):
    full, saved, groups = _mode_run(rank, world)
    resumed, _, _ = _mode_run(rank, world, state=copy.deepcopy(saved), steps=range(2, 4))
    plain = _gpt(1, n_layer=2)
    plain.load_state_dict(saved["model"])  # the checkpoint is a plain GPT's state dict
    # fp16: only rank 0 sees an inf in its shard; every rank's GradScaler must skip
    mode = FSDPMode(rank, world, precision="fp16")
    model = mode.prepare_model(_gpt(0, n_layer=1))
    opt = mode.build_optimizer(param_groups(model, 0.1), lr=1e-2)
    scaler = GradScaler(init_scale=1.0)  # no real overflow: only the planted inf
    idx = _batch(0, 0, world)[rank * LOCAL_B:(rank + 1) * LOCAL_B]
    scaler.scale(model(idx[:, :-1], idx[:, 1:])[1]).backward()
    model.finish_gradient_synchronization()
    finite_here = all(torch.isfinite(p.grad).all() for p in model.parameters())
    if rank == 0:
        next(model.parameters()).grad[0] = float("inf")
    mode.agree_on_found_inf(opt)
    scaler.unscale_(opt)
    scaler.step(opt)
    return {"full": full, "resumed": resumed, "groups": groups, "skipped": scaler.last_step_skipped,
            "finite_here": finite_here}


def test_fsdp_mode_checkpoint_resumes_exactly_and_fp16_skips_together():
    """Property: the trainer's FSDPMode checkpoint (full model + full AdamW state, a plain GPT's
    state dict) resumed after step 2 reproduces steps 3-4's losses bit for bit; AdamW groups
    split decay / no-decay by the parameters' FULL shapes (shards are all 1-D); with fp16, an
    inf in one rank's shard makes every rank's GradScaler skip the step."""
    outs = launch(_mode_resume, 2, timeout_s=TIMEOUT)
    n_matrices = sum(p.dim() >= 2 for p in _gpt(0, n_layer=2).parameters())
    n_params = len(list(_gpt(0, n_layer=2).parameters()))
    for out in outs:
        assert torch.equal(out["full"][2:], out["resumed"])
        assert out["groups"] == [n_matrices, n_params - n_matrices]
        assert out["finite_here"] and out["skipped"]  # rank 1 skips for rank 0's inf
