"""benchmarks.ddp_stage: the speed ladder's DDP stage trains exactly like one process, then times."""
import pathlib

import pytest
from hypothesis import given, settings, strategies as st

from benchmarks import ladder_runner as runner
from benchmarks.ddp_stage import check_same_losses, measure_scaling, stage_configs
from minitrain import ladder


@given(batch=st.integers(1, 64), world=st.integers(2, 4), seq_len=st.integers(1, 2048))
def test_stage_configs_keep_the_global_batch(batch, world, seq_len):
    """The 1-process config takes world x B rows per step, each rank's config B rows, and every
    other setting is identical (the same work split, nothing else changed); tf32 is dropped."""
    config = dict(ladder.default_base(batch_size=batch, seq_len=seq_len), tf32=True)
    one, rank = stage_configs(config, world=world)
    assert one["batch_size"] == world * rank["batch_size"] == world * batch
    assert {k: v for k, v in one.items() if k != "batch_size"} == \
        {k: v for k, v in rank.items() if k != "batch_size"}
    assert "tf32" not in one


def test_check_same_losses_rejects_a_drift():
    """A run whose loss drifts beyond the tolerance at any step is refused (no speed shown)."""
    one = [{"step": i, "loss": 5.0 - 0.1 * i} for i in range(4)]
    drift = [dict(r) for r in one]
    drift[3]["loss"] *= 1.001
    assert check_same_losses(one, one, tolerance=1e-4) == 0
    with pytest.raises(ValueError, match="VALIDATION FAILED"):
        check_same_losses(one, drift, tolerance=1e-4)


@pytest.mark.distributed
def test_two_ddp_processes_train_like_one_and_efficiency_is_its_formula(tmp_path):
    """On the same global batch, 2 gloo processes (B each) log the same losses as 1 process
    (2B), so measure_scaling returns speeds, and efficiency = T_2 / (2 T_1) from them."""
    data = runner.prepare_data(tmp_path / "tokens.bin", max_bytes=50_000)
    base = ladder.default_base(steps=3, batch_size=2, seq_len=32, n_layer=1, n_head=2,
                               n_embd=32, data=data)
    s = measure_scaling(ladder.rung_overrides("4", base), out_dir=tmp_path / "s", warmup=1,
                        timeout_s=120)
    assert s["max_rel_loss_diff"] <= 1e-4
    assert (s["global_batch"], s["per_rank_batch"]) == (4, 2)
    assert s["efficiency"] == pytest.approx(s["tokens_per_s_n"] / (2 * s["tokens_per_s_1"]))
