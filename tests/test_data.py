"""Properties of the data pipeline (minitrain.data): tokenizer, pretokenize/load, split, batches."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minitrain import data
from minitrain.data import (ByteTokenizer, default_corpus, get_batch_loop, load_tokens,
                            pretokenize, split_tokens)
from tests.implementation import under_test
from tests.strategies import seeds

get_batch = under_test("minitrain.data", "get_batch")

pytestmark = pytest.mark.lesson02

token_arrays = st.builds(
    lambda seed, n: np.random.default_rng(seed).integers(0, 256, size=n).astype(np.uint16),
    seeds, st.integers(2, 300))


@given(st.text())
def test_tokenizer_roundtrip(text):
    """decode(encode(s)) == s for every str; ids are the UTF-8 bytes, each in [0, 256)."""
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.vocab_size == 256


def test_decode_invalid_utf8_is_replaced():
    """A cut through a multi-byte character decodes to U+FFFD instead of raising."""
    ids = ByteTokenizer().encode("é")[:1]  # first byte of a 2-byte character
    assert ByteTokenizer().decode(ids) == "\ufffd"
    with pytest.raises(ValueError, match="ids"):
        ByteTokenizer().decode([256])


@given(text=st.text(min_size=1), mode=st.sampled_from(["ram", "memmap"]))
def test_pretokenize_load_roundtrip(tmp_path_factory, text, mode):
    """pretokenize then load_tokens gives back exactly the encoded ids, in both modes."""
    path = tmp_path_factory.mktemp("tok") / "t.bin"
    n = pretokenize(text, path)
    ids = load_tokens(path, mode=mode)
    assert n == len(text.encode("utf-8")) == len(ids)
    assert ids.dtype == np.uint16
    assert ByteTokenizer().decode(ids.tolist()) == text
    assert path.stat().st_size == 2 * n
    assert list(path.parent.glob("*.tmp")) == []  # the atomic write left no temp file


@given(arr=token_arrays, seed=seeds, batch_size=st.integers(1, 9), seq_len=st.integers(1, 40))
def test_memmap_equals_ram_and_loop_equals_vectorized(tmp_path_factory, arr, seed, batch_size,
                                                      seq_len):
    """For one rng state, get_batch on RAM == on memmap == get_batch_loop, and the rng ends in
    the same state: the four ways return the same batch."""
    if len(arr) <= seq_len:
        seq_len = len(arr) - 1
    path = tmp_path_factory.mktemp("tok") / "t.bin"
    arr.tofile(path)
    ram, mm = load_tokens(path, mode="ram"), load_tokens(path, mode="memmap")
    assert isinstance(mm, np.memmap) and np.array_equal(ram, mm)
    outs, states = [], []
    for fn in (get_batch, get_batch_loop):
        for d in (ram, mm):
            rng = np.random.default_rng(seed)
            outs.append(fn(d, batch_size, seq_len, rng=rng))
            states.append(rng.bit_generator.state)
    for x, y in outs:
        assert x.dtype == y.dtype == torch.int64
        assert x.shape == y.shape == (batch_size, seq_len)
        assert torch.equal(x, outs[0][0]) and torch.equal(y, outs[0][1])
    assert all(s == states[0] for s in states)


@given(arr=token_arrays, seed=seeds, batch_size=st.integers(1, 9), seq_len=st.integers(1, 40))
def test_batch_formula(arr, seed, batch_size, seq_len):
    """starts = rng.integers(0, len - T, B); x[i] = data[s:s+T], y[i] = data[s+1:s+T+1]."""
    if len(arr) <= seq_len:
        seq_len = len(arr) - 1
    x, y = get_batch(arr, batch_size, seq_len, rng=np.random.default_rng(seed))
    starts = np.random.default_rng(seed).integers(0, len(arr) - seq_len, size=batch_size)
    for i, s in enumerate(starts):
        assert x[i].tolist() == arr[s:s + seq_len].tolist()
        assert y[i].tolist() == arr[s + 1:s + seq_len + 1].tolist()
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted left by one


@given(n=st.integers(2, 10_000), frac=st.floats(0.01, 0.99))
def test_split_is_contiguous_tail(n, frac):
    """split_tokens: train + val == the stream; val is the last max(1, int(n*frac)) tokens."""
    tokens = np.arange(n)
    n_val = max(1, int(n * frac))
    if n_val >= n:
        with pytest.raises(ValueError, match="val_fraction"):
            split_tokens(tokens, frac)
        return
    train, val = split_tokens(tokens, frac)
    assert len(val) == n_val
    assert np.array_equal(np.concatenate([train, val]), tokens)


def test_batch_errors(tmp_path):
    """ValueError names the problem: short data, batch_size < 1, seq_len < 1, not a Generator."""
    arr = np.arange(10, dtype=np.uint16)
    rng = np.random.default_rng(0)
    for fn in (get_batch, get_batch_loop):
        with pytest.raises(ValueError, match="seq_len"):
            fn(arr, 2, 10, rng=rng)  # needs 11 tokens
        with pytest.raises(ValueError, match="batch_size"):
            fn(arr, 0, 3, rng=rng)
        with pytest.raises(ValueError, match="seq_len"):
            fn(arr, 2, 0, rng=rng)
        with pytest.raises(ValueError, match="rng"):
            fn(arr, 2, 3, rng=np.random.RandomState(0))
    fn(arr, 2, 9, rng=rng)  # 10 tokens are enough for seq_len 9


def test_load_errors(tmp_path):
    """A missing file, a file not a whole number of uint16 tokens, a bad mode: ValueError."""
    with pytest.raises(ValueError, match="does not exist"):
        load_tokens(tmp_path / "missing.bin")
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"abc")
    for mode in ("ram", "memmap"):
        with pytest.raises(ValueError, match="whole number"):
            load_tokens(odd, mode=mode)
    with pytest.raises(ValueError, match="mode"):
        load_tokens(odd, mode="disk")


def test_default_corpus_is_deterministic_and_bounded():
    """default_corpus is stdlib Python source, the same on every call, and max_bytes bounds it
    while cutting only on a character boundary (a prefix of the full text)."""
    small = default_corpus(max_bytes=50_000)
    assert 0 < len(small.encode("utf-8")) <= 50_000
    assert small == default_corpus(max_bytes=50_000)
    assert "def " in small or "import " in small
    bigger = default_corpus(max_bytes=120_000)
    assert bigger.startswith(small)
    with pytest.raises(ValueError, match="max_bytes"):
        default_corpus(max_bytes=-1)


def test_corpus_cache_written_once(tmp_path):
    """corpus_cache_path pretokenizes once; the second call reuses the file (same mtime)."""
    p1 = data.corpus_cache_path(tmp_path, max_bytes=20_000)
    mtime = p1.stat().st_mtime_ns
    p2 = data.corpus_cache_path(tmp_path, max_bytes=20_000)
    assert p1 == p2 and p2.stat().st_mtime_ns == mtime
    assert ByteTokenizer().decode(load_tokens(p1).tolist()) == default_corpus(max_bytes=20_000)


def test_load_dataset_text_and_bin(tmp_path):
    """load_dataset accepts a UTF-8 text file (pretokenized into the cache) or a token .bin."""
    text = "hello, tokens! " * 20
    (tmp_path / "t.txt").write_text(text)
    ids = data.load_dataset(str(tmp_path / "t.txt"), cache_dir=tmp_path / "c")
    assert ByteTokenizer().decode(ids.tolist()) == text
    pretokenize(text, tmp_path / "t.bin")
    mm = data.load_dataset(str(tmp_path / "t.bin"), mode="memmap")
    assert np.array_equal(mm, ids)


def test_truncated_cache_is_rebuilt_never_used(tmp_path):
    """A token cache cut short (even length, so it still loads as uint16) or missing its length
    record is rebuilt on the next call: the tokens are the whole corpus again, never a prefix."""
    full = load_tokens(data.corpus_cache_path(tmp_path, max_bytes=20_000))
    path = data.corpus_cache_path(tmp_path, max_bytes=20_000)
    path.write_bytes(path.read_bytes()[: len(full)])  # half the tokens (2 bytes each)
    assert np.array_equal(load_tokens(data.corpus_cache_path(tmp_path, max_bytes=20_000)), full)
    path.with_name(path.name + ".json").unlink()
    path.write_bytes(path.read_bytes()[:100])
    assert np.array_equal(load_tokens(data.corpus_cache_path(tmp_path, max_bytes=20_000)), full)
    text = tmp_path / "t.txt"
    text.write_text("abc" * 300)
    ids = data.load_dataset(str(text), cache_dir=tmp_path / "c")
    cached = next((tmp_path / "c").glob("text-*.bin"))
    cached.write_bytes(cached.read_bytes()[:300])
    assert np.array_equal(data.load_dataset(str(text), cache_dir=tmp_path / "c"), ids)


def test_token_data_errors_name_the_fix(tmp_path):
    """A .bin holding ids > 255 (a text file named .bin) is refused with one ValueError; the
    fingerprint changes when a token changes and not when nothing does."""
    fake = tmp_path / "text.bin"
    fake.write_text("this is text, not uint16 token")  # even length: loads, ids are huge
    with pytest.raises(ValueError, match="ids up to"):
        data.load_dataset(str(fake))
    arr = np.arange(5000, dtype=np.uint16) % 256
    before = data.fingerprint(arr)
    assert data.fingerprint(arr.copy()) == before
    arr[4999] ^= 1  # the last token is always sampled
    assert data.fingerprint(arr) != before
    assert data.fingerprint(arr[:-1])["tokens"] == 4999
