"""Small shared pieces of the trainer tests: a tiny, fast TrainConfig and a metrics reader."""
import pathlib

from minitrain.files import read_jsonl
from minitrain.train import TrainConfig


def tiny_config(data_bin, out_dir, **overrides):
    """A 1-layer, 32-wide GPT on a small token file: a few steps take well under a second."""
    cfg = dict(steps=7, batch_size=4, seq_len=32, n_layer=1, n_head=2, n_embd=32, warmup_steps=2,
               eval_every=3, eval_iters=2, checkpoint_every=3, log_every=0, data=data_bin,
               out_dir=str(out_dir))
    cfg.update(overrides)
    return TrainConfig(**cfg)


def read_metrics(out_dir):
    """metrics.jsonl as a list of dicts, one per optimizer step (any bad line is an error)."""
    return read_jsonl(pathlib.Path(out_dir) / "metrics.jsonl", on_bad_line="raise")
