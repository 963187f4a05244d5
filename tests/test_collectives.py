"""Ring collectives (point-to-point sends and receives only) equal torch.distributed's
built-ins on 2 and 3 gloo ranks.

Each launch runs a whole list of cases inside one process group and returns one record per case,
so the cost of starting processes is paid once per list, not once per case.
"""
import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch.distributed import all_gather_into_tensor as torch_all_gather_into_tensor
from torch.distributed import all_reduce as torch_all_reduce
from torch.distributed import reduce_scatter_tensor as torch_reduce_scatter_tensor

from minitrain.distributed_utils import launch
from tests.implementation import selected_exercises, under_test

chunk_sizes, ring_all_gather, ring_all_reduce, ring_reduce_scatter = under_test(
    "minitrain.collectives", "chunk_sizes", "ring_all_gather", "ring_all_reduce", "ring_reduce_scatter")

pytestmark = [pytest.mark.distributed, pytest.mark.lesson12]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64,
          "int32": torch.int32}
# Graded as an exercise (make check NAME=ring_collectives): 2 ranks, and a deadlock fails in
# 30 s with a message; proving minitrain: 2 and 3 ranks.
EXERCISE = bool(selected_exercises())
WORLDS = [2] if EXERCISE else [2, 3]
TIMEOUT_S = 30 if EXERCISE else 60
_timed_out = []  # after one deadlock, later launches fail at once (Hypothesis would retry each)


def _launch_cases(world, cases):
    if _timed_out:
        raise TimeoutError(f"not run: an earlier launch already timed out ({_timed_out[0]})")
    try:
        return launch(_run_cases, world, cases, timeout_s=TIMEOUT_S)
    except TimeoutError as exc:
        _timed_out.append(str(exc))
        raise TimeoutError(f"{exc}. The ranks waited for each other and never finished: a "
                           "deadlock? (e.g. a blocking send on every rank before any recv, or "
                           "ranks that disagree on how many messages a chunk needs)") from None


def _rank_tensor(rank, numel, dtype_name, seed, noncontiguous):
    """This rank's input: different on every rank; optionally a transposed (non-contiguous) view."""
    gen = torch.Generator().manual_seed(seed * 101 + rank)
    dtype = DTYPES[dtype_name]
    if dtype.is_floating_point:
        flat = torch.randn(numel, generator=gen, dtype=torch.float64).to(dtype) * 10
    else:
        flat = torch.randint(-1000, 1000, (numel,), generator=gen, dtype=dtype)
    if noncontiguous and numel >= 4 and numel % 2 == 0:
        return flat.view(2, numel // 2).t()  # (numel//2, 2) non-contiguous
    return flat


def _agree(a, b, world, magnitude=None):
    """Equal as the docstring of minitrain.collectives promises.

    Integers, and floats on 2 ranks: bit for bit (with two ranks the only sum is x0 + x1, and
    x0 + x1 == x1 + x0 exactly). Floats on 3+ ranks: the ring adds in another order than gloo;
    each order is within (world - 1) * eps * sum_r |x_r| of the exact sum (the error bound of
    recursive summation), so the two differ by at most twice that, elementwise. `magnitude` is
    sum_r |x_r|; None (a gather, no arithmetic): bit for bit.
    """
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.dtype.is_floating_point or world == 2 or magnitude is None:
        return bool(torch.equal(a, b))
    bound = 2 * (world - 1) * torch.finfo(a.dtype).eps * magnitude.reshape(a.shape)
    return bool(((a.double() - b.double()).abs() <= bound).all())


def _mismatch(ok, ours, ref):
    """'' when ok, else both results side by side (the first elements that differ)."""
    if ok:
        return ""
    if ours.shape != ref.shape or ours.dtype != ref.dtype:
        return f"yours {tuple(ours.shape)} {ours.dtype}, built-in {tuple(ref.shape)} {ref.dtype}"
    a, b = ours.reshape(-1), ref.reshape(-1)
    bad = (a != b).nonzero().reshape(-1)[:4].tolist()
    return (f"{int((a != b).sum())} of {a.numel()} elements differ; at flat index {bad}: "
            f"yours {a[bad].tolist()}, built-in {b[bad].tolist()}")


def _abs_sum(x):
    """sum over ranks of |x| (float64), the scale of a sum's rounding error."""
    total = x.detach().abs().double().contiguous()
    torch_all_reduce(total)
    return total


def _run_cases(rank, world, cases):
    """In every rank: each case against the built-in; returns [(case, all_reduce, reduce_scatter,
    all_gather)], each '' when equal, else what differs."""
    records = []
    for numel, dtype_name, seed, noncontiguous in cases:
        x = _rank_tensor(rank, numel, dtype_name, seed, noncontiguous)
        before = x.clone()
        ours = x  # in place, also through a non-contiguous view
        ring_all_reduce(ours)
        ref = before.clone()
        torch_all_reduce(ref)
        ar_ok = _agree(ours, ref, world, _abs_sum(before) if before.is_floating_point() else None)
        ar_err = _mismatch(ar_ok, ours, ref)
        # reduce-scatter / all-gather: the built-ins' contract is input = world * output elements
        k = numel // world
        big = _rank_tensor(rank, k * world, dtype_name, seed + 1, noncontiguous)
        big_copy = big.clone()
        out, ref_out = torch.empty(k, dtype=big.dtype), torch.empty(k, dtype=big.dtype)
        ring_reduce_scatter(out, big)
        torch_reduce_scatter_tensor(ref_out, big.contiguous().view(-1))
        rs_mag = _abs_sum(big).reshape(world, k)[rank] if big.is_floating_point() else None
        rs_err = _mismatch(_agree(out, ref_out, world, rs_mag), out, ref_out)
        if not torch.equal(big, big_copy):
            rs_err += " the input was modified (it must be left untouched)"
        small = _rank_tensor(rank, numel, dtype_name, seed + 2, False)
        gathered = torch.empty(numel * world, dtype=small.dtype)
        ref_gathered = torch.empty(numel * world, dtype=small.dtype)
        ring_all_gather(gathered, small)
        torch_all_gather_into_tensor(ref_gathered, small)
        ag_err = _mismatch(_agree(gathered, ref_gathered, world), gathered, ref_gathered)
        records.append(((numel, dtype_name, seed, noncontiguous), ar_err, rs_err, ag_err))
    errors = []  # wrong shapes must give a clear ValueError, on every rank
    for bad in (lambda: ring_reduce_scatter(torch.empty(3), torch.empty(3 * world + 1)),
                lambda: ring_all_gather(torch.empty(3 * world + 1), torch.empty(3)),
                lambda: ring_all_gather(torch.empty(3 * world), torch.empty(3, dtype=torch.int64))):
        try:
            bad()
            errors.append("no error")
        except ValueError as e:
            errors.append(str(e))
    return records, errors


def _edge_cases(world):
    """0, 1, fewer than ranks, not divisible, divisible, big; floats and ints; non-contiguous."""
    sizes = [0, 1, world - 1, world, world + 1, 2 * world + 1, 64, 1001, 4096]
    cases = [(n, d, n + 7, False) for n in sizes for d in ("float32", "int64")]
    cases += [(12, "float64", 3, True), (30, "int32", 4, True), (5, "int32", 5, False)]
    return cases


def _check(results, world):
    for rank, (records, errors) in enumerate(results):
        for case, ar_err, rs_err, ag_err in records:
            where = f"{world} ranks, rank {rank}, case (numel, dtype, seed, noncontiguous) = {case}"
            assert not ar_err, f"ring_all_reduce != dist.all_reduce, {where}: {ar_err}"
            assert not rs_err, f"ring_reduce_scatter != reduce_scatter_tensor, {where}: {rs_err}"
            assert not ag_err, f"ring_all_gather != all_gather_into_tensor, {where}: {ag_err}"
        assert errors[0].startswith("ring_reduce_scatter") and "input" in errors[0], errors
        assert errors[1].startswith("ring_all_gather") and "output" in errors[1], errors
        assert "dtype" in errors[2], errors


@pytest.mark.parametrize("world", WORLDS)
def test_ring_collectives_equal_builtins_on_edge_sizes(world):
    """For numel 0, 1, < N, = N, not divisible by N and large, float and int dtypes, contiguous or
    not: ring all-reduce = dist.all_reduce (bit for bit for ints and on 2 ranks; within the
    summation error bound on 3), ring reduce-scatter =
    reduce_scatter_tensor, ring all-gather = all_gather_into_tensor; bad shapes -> ValueError."""
    _check(_launch_cases(world, _edge_cases(world)), world)


case_lists = st.lists(st.tuples(st.integers(0, 300), st.sampled_from(sorted(DTYPES)),
                                st.integers(0, 10_000), st.booleans()), min_size=1, max_size=8)


@settings(max_examples=4)
@given(world=st.sampled_from(WORLDS), cases=case_lists)
def test_ring_collectives_equal_builtins_on_generated_sizes(world, cases):
    """The same equalities for Hypothesis-generated lists of sizes and dtypes, each list run in
    one freshly launched process group."""
    _check(_launch_cases(world, cases), world)


def test_chunk_sizes_cover_every_element_once():
    """Ring chunks are like torch.tensor_split: they sum to numel and differ by at most one."""
    for numel in range(0, 40):
        for world in range(1, 6):
            sizes = chunk_sizes(numel, world)
            assert sum(sizes) == numel and len(sizes) == world
            assert max(sizes) - min(sizes) <= 1
            assert sizes == [len(c) for c in torch.tensor_split(torch.arange(numel), world)]
