"""The token shard format: round trip, header/index validity, truncation and corruption errors."""
import numpy as np
import pytest

from zero_chatgpt.model.token_shards import ShardError, load_split, open_shard, write_shard


def _docs(rng, n=50, vocab=1000, eot=999):
    return [list(rng.integers(0, vocab - 1, rng.integers(1, 40))) + [eot] for _ in range(n)]


@pytest.mark.parametrize("vocab", [1000, 70000])
def test_round_trip(tmp_path, vocab):
    rng = np.random.default_rng(0)
    docs = _docs(rng, vocab=vocab, eot=vocab - 1)
    write_shard(tmp_path / "train-00000.bin", docs, vocab)
    sh = open_shard(tmp_path / "train-00000.bin", verify=True)
    assert sh.tokens.dtype.itemsize == (2 if vocab <= 65536 else 4)
    assert sh.n_docs == len(docs) and sh.n_tokens == sum(map(len, docs))
    for i, d in enumerate(docs):
        assert sh.doc(i).tolist() == d
    assert [s.path.name for s in load_split(tmp_path, "train")] == ["train-00000.bin"]


def test_truncated_and_corrupted_name_the_file(tmp_path):
    p = tmp_path / "val-00000.bin"
    write_shard(p, _docs(np.random.default_rng(1)), 1000)
    data = bytearray(p.read_bytes())
    p.write_bytes(data[:-5])
    with pytest.raises(ShardError, match="val-00000.bin.*truncated"):
        open_shard(p)
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="val-00000.bin.*corrupted"):
        open_shard(p, verify=True)
    p.write_bytes(b"garbage" * 20)
    with pytest.raises(ShardError, match="bad magic"):
        open_shard(p)
    p.write_bytes(b"x")
    with pytest.raises(ShardError, match="truncated"):
        open_shard(p)


def test_missing_split_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="run `zero-chatgpt tokenizer` first"):
        load_split(tmp_path, "train")


def test_the_batch_source_indexes_past_four_billion_tokens_without_overflow():
    """The seed's 10B tokens: block indexes, shard starts and offsets inside a shard all pass 2^32 without
    wrapping (int64 throughout; the shard format's counts and offsets are u64). Shards of 5.4G tokens each are
    stood in for by arrays that compute a token from its position, so nothing is written."""
    import numpy as np

    from zero_chatgpt.stages.pretrain import PackedBlocks

    class Positions:
        """tokens[i] = i mod 65521, of a shard `n` tokens long (what a memmap would hold)."""
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, sl):
            return np.arange(sl.start, min(sl.stop, self.n), dtype=np.int64) % 65521

    class Shard:
        def __init__(self, n):
            self.tokens, self.n_tokens = Positions(n), n

    n = 5 * 2 ** 30 + 12345                       # 5.4G tokens per shard, 16G in all
    src = PackedBlocks([Shard(n), Shard(n), Shard(n)], seq_len=1024, seed=0, micro_batch_size=2, grad_accum=1)
    per = (n - 1) // 1024
    assert src.n_blocks == 3 * per and src.n_blocks * 1024 > 2 ** 33
    last = src.block(src.n_blocks - 1)            # the last block of the third shard: offset past 2^32 inside it
    start = (per - 1) * 1024
    assert start > 2 ** 32 and last.tolist() == (np.arange(start, start + 1025) % 65521).tolist()
    assert src.block(per).tolist()[:3] == [0, 1, 2]      # the first block of the second shard starts at its token 0
