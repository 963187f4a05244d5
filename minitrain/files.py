"""Files that survive a kill: atomic writes and JSON-lines logs, the one place they are written.

What. `write_atomic(path, data)` writes bytes or text so that a reader (or a restarted run)
sees either the old file or the whole new one, never half of it; `append_jsonl(path, record)`
adds one JSON line and makes it durable; `read_jsonl(path)` reads such a log back, tolerating
the torn last line of a process killed mid-write.

Why. Training runs are killed (SIGKILL, OOM, preemption, Ctrl-C). A checkpoint written in place
and interrupted half-way is worse than no checkpoint: `--resume` would load garbage. Writing to a
temporary file in the same folder, `fsync`-ing it and then `os.replace`-ing it over the target is
atomic on POSIX (the rename either happened or it did not).

Formula (the write protocol):
    tmp = mkstemp(dir=path.parent)   # same filesystem, or the rename is not atomic
    write(tmp); flush; fsync(tmp)    # the bytes are on disk before the name points at them
    os.replace(tmp, path)            # atomic switch

When it helps: every file a run or a benchmark writes (checkpoints, token caches, tables).

Common bug: writing the temp file to /tmp and renaming it into place. /tmp is often another
filesystem, where `os.replace` fails or silently degrades to copy + delete, which is not atomic.
"""
import json
import os
import pathlib
import tempfile


def write_atomic(path, data=None, *, write_fn=None):
    """Write `data` (bytes or str) -- or call `write_fn(binary_file)` -- to `path` atomically.

    Creates the parent folders. The temp file is `<name>.<random>.tmp` beside `path`; on any
    error (including KeyboardInterrupt) it is removed and the old `path` is left untouched."""
    if (data is None) == (write_fn is None):
        raise ValueError("write_atomic: pass exactly one of data or write_fn")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if write_fn is not None:
                write_fn(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else bytes(data))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0o600; these are ordinary data files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temp_files(directory, name):
    """Delete `<name>.*.tmp` that a process killed inside `write_atomic` left behind."""
    for stale in pathlib.Path(directory).glob(f"{name}.*.tmp"):
        stale.unlink(missing_ok=True)


def append_jsonl(path_or_file, record, *, fsync=False):
    """Append `record` as one JSON line (NaN/inf refused: JSON has none; use None).

    `path_or_file` is a path (opened, appended, closed) or an open text file (kept open: the
    trainer writes one line per step). `fsync=True` makes the line survive a power cut, not only
    a killed process (the OS cache already survives a kill)."""
    line = json.dumps(record, allow_nan=False) + "\n"
    if hasattr(path_or_file, "write"):
        path_or_file.write(line)
        path_or_file.flush()
        if fsync:
            os.fsync(path_or_file.fileno())
        return
    with open(path_or_file, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def read_jsonl(path, *, on_bad_line="skip"):
    """The records of a JSON-lines file, in order ([] when the file does not exist).

    A torn last line (no trailing newline: the writer was killed) is always ignored. Any other
    line that is not JSON is skipped (`on_bad_line="skip"`) or raises ValueError naming the file
    and line number (`on_bad_line="raise"`)."""
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    lines = lines[:-1]  # the part after the last newline is empty, or a torn write: drop it
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if on_bad_line == "raise":
                raise ValueError(f"{path}:{number} is not a JSON line") from None
    return records
