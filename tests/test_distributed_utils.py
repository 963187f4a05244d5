"""minitrain.distributed_utils.launch: results come back in rank order, and the ranks leave the
process group in step -- no rank tears down while a peer is still working, a rank that crashes
or hangs while leaving is reported instead of being killed unseen."""
import faulthandler
import os
import time

import pytest
import torch
import torch.distributed as dist

from minitrain.distributed_utils import launch

pytestmark = pytest.mark.distributed


def _sum_of_ranks(rank, world):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.item()}


@pytest.mark.parametrize("world", [2, 3])
def test_results_come_back_in_rank_order(world):
    """Rank r's return value is element r; every rank saw the whole group (all_reduce of the
    ranks = 0 + 1 + ... + world-1)."""
    out = launch(_sum_of_ranks, world, timeout_s=60, preload=())
    assert [o["rank"] for o in out] == list(range(world))
    assert all(o["world"] == world and o["sum"] == sum(range(world)) for o in out)


def _record_teardown(rank, world, log_dir):
    """Rank 1 works 1.5 s longer than rank 0; each rank logs when it starts leaving the group."""
    original = dist.destroy_process_group

    def logged(*args, **kwargs):
        with open(os.path.join(log_dir, f"leave{rank}"), "w") as f:
            f.write(repr(time.time()))
        return original(*args, **kwargs)

    dist.destroy_process_group = logged  # this rank's (forked) module only
    if rank == 1:
        time.sleep(1.5)
    done = time.time()
    return done


def test_no_rank_leaves_the_group_before_every_rank_finished(tmp_path):
    """The fast rank starts destroy_process_group only after the slow rank's fn returned (the
    launcher's barrier): it cannot close its connections under a peer still at work."""
    done = launch(_record_teardown, 2, str(tmp_path), timeout_s=60, preload=())
    leave0 = float((tmp_path / "leave0").read_text())
    assert leave0 >= done[1], (leave0, done)


def _abort_while_leaving(rank, world):
    if rank == 1:
        faulthandler.disable()  # pytest's fault handler would print this intended abort's stack
        dist.destroy_process_group = os.abort  # SIGABRT in teardown, after the result is sent
    return rank


def test_a_crash_while_leaving_the_group_is_reported():
    """A rank that returned its result and then died (SIGABRT) in teardown makes launch raise,
    naming the rank and its exit code, instead of passing silently."""
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] returned their result.*-6"):
        launch(_abort_while_leaving, 2, timeout_s=60, preload=())


def _hang_while_leaving(rank, world):
    if rank == 1:
        dist.destroy_process_group = lambda *a, **k: time.sleep(600)
    return rank


def test_a_rank_stuck_while_leaving_is_a_timeout_not_a_hang():
    """A rank that never exits after returning ends the launch with TimeoutError after the
    grace period (timeout_s, at least 10 s), not a hung test."""
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[1\] returned their result but did not"):
        launch(_hang_while_leaving, 2, timeout_s=2, preload=())
    assert time.monotonic() - t0 < 30
