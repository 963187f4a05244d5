"""Exercises: the property tests that prove minitrain grade a learner's own implementation.

The loop (README, "Exercises"):
    make exercises              # the table: every exercise, its lesson, what to write, your status
    make exercise NAME=clip     # exercises/clip.py: minitrain's names, signatures and docstrings,
                                # every body `raise NotImplementedError("exercise clip: write ...")`
    make check NAME=clip        # the SAME property tests that prove minitrain, run on your file
    make hint NAME=clip         # the next of 2-3 hints, taken from the module's "common bug" notes
    make solution NAME=clip     # where minitrain's own solution lives

What: this file is the registry (one `Exercise` per technique, in lesson order) and the command
line; tests/exercise_kit.py generates stubs, runs the checks and writes the report;
tests/implementation.py is the one switch in the test files (minitrain, or your file).

Why: a learner who writes their own clip_grad_norm or ring all-reduce needs more than a fixed
example: Hypothesis searches for an input where their code and the PyTorch built-in disagree and
shrinks it to a minimal one.

Common bug: an exercise whose tests never call the learner's code passes for free; that is why
tests/test_exercises.py proves, for every available exercise, that the untouched stub fails every
property and that minitrain's own module passes them all.
"""
import argparse
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Exercise:
    name: str          # make exercise NAME=<name>; the workspace file is exercises/<name>.py
    lesson: int        # the lesson it belongs to (pytest marker lessonNN)
    module: str        # minitrain's solution
    names: tuple       # what the learner writes (functions and classes of `module`)
    tests: tuple       # pytest node ids (a file, or file::test) of the properties that grade it
    hints: tuple = ()  # phrases picking the module's common-bug notes, most general first
    also: tuple = ()   # private names the tests call ("Class._method"), stubbed too
    distributed: bool = False  # 2 gloo ranks (lesson's world sizes of 3 are deselected)


T = "tests/"
EXERCISES = [
    Exercise("batching", 2, "minitrain.data", ("get_batch",),
             (T + "test_data.py::test_batch_formula",
              T + "test_data.py::test_memmap_equals_ram_and_loop_equals_vectorized",
              T + "test_data.py::test_batch_errors"),
             hints=("targets not shifted", "`randint(0, len(data))`")),
    Exercise("schedule", 3, "minitrain.schedule", ("warmup_cosine", "set_lr", "WarmupCosine"),
             (T + "test_schedule.py",),
             hints=("An lr of 0 on the first step", "A second cosine cycle", "One-step shifts")),
    Exercise("clip", 4, "minitrain.clip", ("grad_norm", "clip_grad_norm", "clip_grad_value"),
             (T + "test_clip.py",),
             hints=("Clipping each parameter separately", "Logging the norm *after*",
                    "A non-finite norm")),
    Exercise("grad_scaler", 5, "minitrain.grad_scaler", ("GradScaler",),
             (T + "test_grad_scaler.py",), also=("GradScaler._get_growth_tracker",),
             hints=("Per-optimizer state", "Misuse raises the built-in's errors", "`unscale_` twice")),
    Exercise("accumulation", 6, "minitrain.accumulate", ("accumulate_gradients",),
             (T + "test_accumulate.py",),
             hints=("forgetting the 1/K", "zeroing the gradients inside", "stepping the optimizer every")),
    Exercise("naive_attention", 8, "minitrain.attention", ("causal_mask", "naive_attention"),
             (T + "test_attention.py::test_naive_equals_sdpa",
              T + "test_attention.py::test_naive_with_mask_equals_sdpa",
              T + "test_attention.py::test_naive_empty_sequences_give_zeros_like_sdpa",
              T + "test_attention.py::test_naive_bad_arguments_raise_value_error"),
             hints=("exp(-inf - -inf)", "bottom-right")),
    Exercise("flash_attention", 8, "minitrain.attention",
             ("FlashAttentionFunction", "flash_attention", "flash_attention_traced"),
             (T + "test_attention.py::test_flash_equals_sdpa",
              T + "test_attention.py::test_flash_empty_sequences_give_zeros_like_sdpa",
              T + "test_attention.py::test_flash_reduced_precision_close_to_float32_sdpa",
              T + "test_attention.py::test_flash_never_allocates_a_score_matrix",
              T + "test_attention.py::test_causal_skips_tiles_above_the_diagonal",
              T + "test_attention.py::test_trace_reports_the_final_log_sum_exp",
              T + "test_attention.py::test_flash_bad_arguments_raise_value_error",
              T + "test_attention.py::test_causal_backward_skips_tiles_above_the_diagonal"),
             hints=("rescale acc AND l", "exp(-inf - -inf)", "saving P")),
    Exercise("ring_collectives", 12, "minitrain.collectives",
             ("chunk_sizes", "ring_all_reduce", "ring_reduce_scatter", "ring_all_gather"),
             (T + "test_collectives.py",), distributed=True,
             hints=("Chunking (for any numel)", "blocking `send`", "Integers are summed exactly")),
    Exercise("ddp", 13, "minitrain.ddp", ("DDP",), (T + "test_ddp.py",), distributed=True,
             hints=("(The hook receives the PARAMETER", "collectives are launched in the same order", "forgetting `finish_gradient_synchronization()`")),
    Exercise("zero", 14, "minitrain.zero", ("ZeroOptimizer", "partition_parameters"),
             (T + "test_zero.py::test_zero_stage1_and_stage2_equal_adamw_and_torch_zero",
              T + "test_zero.py::test_zero_equals_adamw_for_generated_hyperparameters",
              T + "test_zero.py::test_partition_is_sorted_greedy",
              T + "test_zero.py::test_zero_rejects_bad_stage"), distributed=True,
             hints=("sorted-greedy", "AdamW is elementwise", "giving stage 1 gradients")),
    Exercise("z_loss", 16, "minitrain.stability", ("z_loss",),
             (T + "test_stability.py::test_z_loss_and_its_gradient_equal_the_formula",
              T + "test_stability.py::test_z_loss_with_every_target_ignored_is_zero_with_zero_gradient",
              T + "test_stability.py::test_ignored_inf_logits_do_not_poison_the_gradient",
              T + "test_stability.py::test_z_loss_upcasts_half_logits",
              T + "test_stability.py::test_z_loss_bad_arguments"),
             hints=("averaging the z-loss over ignored", "computing logsumexp in fp16")),
    Exercise("flop_counter", 17, "minitrain.profile", ("FlopCounter", "count_flops"),
             (T + "test_profile.py::test_count_flops_equals_flop_counter_mode_on_naive_gpt",
              T + "test_profile.py::test_sdpa_counted_at_least_naive_while_builtin_undercounts",
              T + "test_profile.py::test_matmul_forms_counted_including_in_place"),
             hints=("`count_flops(fn)` counts", "trusting `torch.utils.flop_counter.FlopCounterMode`")),
    Exercise("tensor_parallel", 19, "minitrain.tensor_parallel",
             ("copy_to_parallel", "reduce_from_parallel", "ColumnParallelLinear", "RowParallelLinear"),
             (T + "test_tensor_parallel.py::test_column_row_mlp_equals_unsharded_and_torch",),
             distributed=True,
             hints=("x is used by all N shards", "adding the row layer's bias")),
    Exercise("distributed_sampler", 21, "minitrain.sampler", ("DistributedSampler",),
             (T + "test_sampler.py::test_sampler_yields_exactly_torchs_indices",
              T + "test_sampler.py::test_ranks_together_cover_every_index_with_at_most_replicas_minus_one_repeats",
              T + "test_sampler.py::test_forgetting_set_epoch_repeats_the_same_shuffle",
              T + "test_sampler.py::test_bad_sampler_arguments_name_the_argument"),
             hints=("forgetting `sampler.set_epoch(epoch)`", "giving ranks different seeds")),
    Exercise("recompute", 23, "minitrain.recompute", ("CheckpointFunction", "checkpoint"),
             (T + "test_recompute.py",),
             hints=("forgetting the RNG state", "reentrant", "torch.autograd.backward")),
    Exercise("lars_lamb", 26, "minitrain.large_batch", ("LARS", "LAMB"),
             (T + "test_large_batch.py::test_lars_without_trust_ratio_is_torch_sgd_bit_for_bit",
              T + "test_large_batch.py::test_lamb_without_trust_ratio_is_torch_adamw_bit_for_bit",
              T + "test_large_batch.py::test_lamb_first_step_scales_each_layer_by_its_own_trust_ratio",
              T + "test_large_batch.py::test_lars_trust_ratio_matches_its_formula_per_layer",
              T + "test_large_batch.py::test_zero_weights_or_zero_gradients_never_divide_by_zero"),
             hints=("applying the trust ratio to the whole model", "dividing by a zero norm")),
]
BY_NAME = {e.name: e for e in EXERCISES}


def _exercise(name):
    if name not in BY_NAME:
        raise SystemExit(f"no exercise named {name!r}: pass NAME=<one of> {', '.join(BY_NAME)} "
                         "(make exercises lists them)")
    return BY_NAME[name]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["list", "new", "check", "hint", "solution"])
    parser.add_argument("names", nargs="*", help="exercise name(s), e.g. clip")
    parser.add_argument("--workspace", default=None, help="default: <repo>/exercises")
    parser.add_argument("--json", default=None, help="check: also write the results here")
    parser.add_argument("--timeout", type=float, default=900.0, help="check: seconds for pytest")
    args = parser.parse_args(argv)
    # imported here, not at the top: implementation.py imports this registry inside pytest
    import exercise_check as checker
    import exercise_kit as kit

    ws = kit.workspace_dir(args.workspace)
    if args.command == "list":
        print(checker.table(EXERCISES, ws))
        return 0
    if not args.names:
        raise SystemExit(f"{args.command} needs NAME, e.g. make {args.command} NAME=clip; "
                         f"exercises: {', '.join(BY_NAME)}")
    exercises = [_exercise(n) for n in args.names]
    if args.command == "check":
        return checker.check(exercises, ws, json_path=args.json, timeout_s=args.timeout)
    for ex in exercises:
        if not kit.available(ex)[0]:
            raise SystemExit(f"exercise {ex.name}: not available yet ({kit.available(ex)[1]})")
        if args.command == "new":
            print(kit.create_stub(ex, ws))
        elif args.command == "hint":
            print(kit.next_hint(ex, ws))
        else:
            print(kit.solution_location(ex))
    return 0


if __name__ == "__main__":
    sys.exit(main())
