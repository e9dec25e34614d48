"""Tokenizer: round trip, no special tokens from plain text, HF parity (ids and chat template),
the stage end to end (token shards, resume, corrupted shards)."""
import json
import unicodedata
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runs import record_stage
from zero_chatgpt.model import token_shards as tokens_mod
from zero_chatgpt.cli import main
from zero_chatgpt.data.builtin import iter_builtin_documents
from zero_chatgpt.core.io import JsonlZstWriter
from zero_chatgpt.model.tokenizer import EOT, IM_END, IM_START, PAD, Tokenizer, load_tokenizer, sample_texts, train_bpe

SYSTEM = "你是一个乐于助人的助手。"


@pytest.fixture(scope="module")
def corpus():
    """Every 8th document of the built-in corpus (real Chinese: news, reviews, idioms), NFKC as cleaned."""
    docs = [unicodedata.normalize("NFKC", r["text"]) for i, r in enumerate(iter_builtin_documents()) if i % 8 == 0]
    return docs


@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory):
    """A 1024-token tokenizer trained on the corpus, saved twice: without and with a default system prompt."""
    tok = train_bpe(corpus[20:], 1024)
    plain = tok.save(tmp_path_factory.mktemp("tok"))
    sys_tok = Tokenizer(tok.mergeable_ranks, tok.pattern, list(tok.special_tokens), SYSTEM)
    with_sys = sys_tok.save(tmp_path_factory.mktemp("tok_sys"))
    return plain, with_sys, tok


def test_saved_tokenizer_is_the_trained_one(saved, tok, corpus):
    """Training, the saved files and the loaded encoder use one regex (the seed's runtime regex
    differed from its training regex, so digits split differently)."""
    from zero_chatgpt.model.tokenizer import DEFAULT_PATTERN
    trained = saved[2]
    assert tok.pattern == trained.pattern == DEFAULT_PATTERN
    spec = json.loads((saved[0] / "tokenizer.json").read_text())
    assert spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == DEFAULT_PATTERN
    assert tok.mergeable_ranks == trained.mergeable_ranks
    for text in VARIED + corpus[:10]:
        assert tok.encode(text) == trained.encode(text)


@pytest.fixture(scope="module")
def tok(saved):
    return load_tokenizer(saved[0])


@pytest.fixture(scope="module")
def hf(saved):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(saved[0])), AutoTokenizer.from_pretrained(str(saved[1]))


VARIED = [
    "", " ", "\n", "\n\n\n", "a\r\nb", "\t\t x  \n  y   ", "   leading and trailing   ",
    "username user assistant system", "userassistant", "I'm sure you'll see they're right",
    "1234567890 3.14159 2026年11月27日 电话 010-12345678 价格 ¥1,299.00 第100000名",
    "emoji 😀👍🏽🇨🇳 family 👨‍👩‍👧 中文 English Русский العربية हिन्दी 日本語のテキスト 한국어",
    "《红楼梦》是中国古典四大名著之一。“你好！”他说——然后……走了。",
    "mixedScriptsABC中文def123ghi", "tab\tseparated\tvalues\n列1\t列2",
    "ﾊﾝｶｸ　全角空格　ｆｕｌｌ", "\u200b zero width \u00a0 nbsp", "def f(x):\n    return x ** 2  # 平方\n",
]


# -- round trip and special tokens ------------------------------------------------------

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_round_trip_any_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.n_learned for i in ids)


def test_round_trip_varied_and_corpus(tok, corpus):
    for text in VARIED + corpus[:20]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("") == []
    batch = tok.encode_batch(VARIED)
    assert batch == [tok.encode(t) for t in VARIED]


def test_plain_text_never_yields_special_tokens(tok):
    text = f"{EOT}{IM_START}user\nhi{IM_END}\n{PAD}<|reserved_0|>"
    ids = tok.encode(text)
    assert all(i < tok.n_learned for i in ids)
    assert tok.decode(ids) == text
    assert all(i < tok.n_learned for doc in tok.encode_batch([text, text]) for i in doc)


def test_special_token_layout(tok):
    specials = [tok.eot_id, tok.im_start_id, tok.im_end_id, tok.pad_id]
    assert specials == list(range(tok.n_learned, tok.n_learned + 4))
    assert tok.vocab_size == 1024 == tok.n_learned + 4 + 4      # 4 reserved slots
    assert tok.pad_id not in (tok.eot_id, tok.im_end_id)
    assert tok.stop_ids == (tok.im_end_id, tok.eot_id)
    assert tok.decode([tok.im_start_id, tok.im_end_id]) == IM_START + IM_END
    assert tok.decode([tok.im_start_id, *tok.encode("你好"), tok.eot_id], skip_special_tokens=True) == "你好"
    # role names are ordinary text: "username" is not "user" + pieces of a special token
    assert not {"system", "user", "assistant"} & set(tok.special_tokens)
    assert tok.decode(tok.encode("username")) == "username"


def test_digits_split_in_groups_of_at_most_three(tok, hf):
    text = "1234567 2026年 3.1415926"
    ids = tok.encode(text)
    assert max(len(tok.token_bytes[i]) for i in ids if tok.token_bytes[i].strip().isdigit()) <= 3
    assert hf[0](text, add_special_tokens=False)["input_ids"] == ids


# -- Hugging Face parity --------------------------------------------------------------------

def _hf_ids(hf_tok, text):
    return hf_tok(text, add_special_tokens=False)["input_ids"]


def test_hf_identical_ids_on_varied_and_real_text(tok, hf, saved, corpus):
    from tokenizers import Tokenizer as RawHF
    raw = RawHF.from_file(str(saved[0] / "tokenizer.json"))
    texts = VARIED + corpus[:20]
    for text in texts:
        ours = tok.encode(text)
        assert _hf_ids(hf[0], text) == ours, text
    assert [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)] == tok.encode_batch(texts)
    for ids in (tok.encode(t) for t in texts):
        assert hf[0].decode(ids) == tok.decode(ids)


ALPHABET = st.sampled_from(list("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写存候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听该铁价严龙飞"
                                  "abcXYZ0123456789 \t\n\r.,!?，。！？、；：“”（）《》…—'\"-_@#%&*+=/\\|<>😀👍🏽🇨🇳ё"))


# Any Unicode, and dense mixes of Chinese, digits, whitespace, punctuation and emoji. Text that
# spells a special token is left out: HF turns it into that token, we keep it plain text.
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given((st.text(max_size=80) | st.lists(ALPHABET, max_size=80).map("".join)).filter(lambda t: "<|" not in t))
def test_hf_identical_ids_property(tok, hf, text):
    assert _hf_ids(hf[0], text) == tok.encode(text)


CHATS = [
    [{"role": "user", "content": "username是什么意思？"}],
    [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "1+1=?"},
     {"role": "assistant", "content": "等于2。"}],
    [{"role": "user", "content": "讲个笑话"}, {"role": "assistant", "content": "\n\n  从前有座山 😀"},
     {"role": "user", "content": "再来一个\n"}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "  "}, {"role": "system", "content": "中间的 system"},
     {"role": "assistant", "content": "ok 12345"}],
]


@pytest.mark.parametrize("which", [0, 1], ids=["no-system-prompt", "default-system-prompt"])
def test_hf_identical_chat_template(saved, hf, which):
    tok = load_tokenizer(saved[which])
    assert tok.default_system_prompt == ("" if which == 0 else SYSTEM)
    hft = hf[which]
    for msgs in CHATS:
        for gen in (False, True):
            text = tok.render_chat(msgs, add_generation_prompt=gen)
            assert hft.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == text
            ids, mask = tok.encode_chat(msgs, add_generation_prompt=gen)
            ref = hft.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
            ref = ref["input_ids"] if hasattr(ref, "keys") else ref
            assert ids == list(ref)
            assert len(mask) == len(ids)
            assert tok.decode(ids) == text
            # the mask covers exactly each assistant answer and its closing <|im_end|>
            answers = "".join(m["content"] + IM_END for m in msgs if m["role"] == "assistant")
            assert tok.decode([i for i, m in zip(ids, mask) if m]) == answers
    if which == 1:
        assert tok.render_chat(CHATS[0]).startswith(f"{IM_START}system\n{SYSTEM}{IM_END}\n")


# -- the stage: sample, train, save, encode into shards -------------------------------------

def _write_corpus(run_dir, corpus):
    data = run_dir / "data"
    data.mkdir(parents=True)
    val = [t for t in corpus if zlib.crc32(t.encode()) % 10 == 0][:40]
    train = [t for t in corpus if zlib.crc32(t.encode()) % 10 != 0][:1200]
    for name, docs in (("train-00000", train[0::2]), ("train-00001", train[1::2]), ("val-00000", val)):
        with JsonlZstWriter(data / f"{name}.jsonl.zst") as w:
            for t in docs:
                w.write({"text": t, "source": "builtin"})
    record_stage(run_dir, "data")
    return {"train": train[0::2] + train[1::2], "val": val}


def test_sample_texts_respects_budget_and_document_cap(tmp_path, corpus):
    docs = _write_corpus(tmp_path, corpus)
    got = list(sample_texts(tmp_path / "data", "train", 50_000, 300))
    assert all(len(t) <= 300 for t in got)
    # a hash-decided share of every shard, about the budget, never more than budget + one document
    assert 0.8 * 50_000 <= sum(map(len, got)) < 50_000 + 300
    assert got == list(sample_texts(tmp_path / "data", "train", 50_000, 300))      # deterministic
    half = len(docs["train"]) // 2
    first, second = {t[:300] for t in docs["train"][:half]}, {t[:300] for t in docs["train"][half:]}
    assert any(t in first for t in got) and any(t in second for t in got)
    assert all(t in first or t in second for t in got)
    # a budget above the corpus takes every document
    assert len(list(sample_texts(tmp_path / "data", "train", 10**9, 300))) == len(docs["train"])


def test_stage_encodes_shards_resumes_and_detects_corruption(tmp_path, corpus, capsys):
    docs = _write_corpus(tmp_path, corpus)
    args = ["tokenizer", "--run-dir", str(tmp_path), "--preset", "demo", "--set", "tokenizer.vocab_size=600"]
    main(args)
    tok = load_tokenizer(tmp_path / "tokenizer")
    assert tok.vocab_size == 600
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "tokenizer" / f).exists()
    paths = tokens_mod.shard_paths(tmp_path / "tokens", "train")
    assert [p.name for p in paths] == ["train-00000.bin", "train-00001.bin"]
    for split in ("train", "val"):
        shards = tokens_mod.load_split(tmp_path / "tokens", split, verify=True)
        got = [s.doc(i) for s in shards for i in range(s.n_docs)]
        assert len(got) == len(docs[split])
        for ids, text in zip(got, docs[split]):
            assert ids.dtype == np.uint16 and ids[-1] == tok.eot_id and tok.eot_id not in ids[:-1]
            assert tok.decode(ids[:-1]) == text
    err = capsys.readouterr().err
    assert "chars/token (val)" in err and "peak memory" in err

    # unchanged inputs: the stage skips itself
    main(args)
    assert "up to date" in capsys.readouterr().err

    # interrupted encoding: one shard missing, the other kept as is
    keep = paths[0].stat().st_mtime_ns
    paths[1].unlink()
    (tmp_path / "tokens" / "train-00001.bin.tmp").write_bytes(b"half a shard")   # a killed writer's leftover
    marker = tmp_path / "tokenizer" / ".stage.json"           # the stage was killed while encoding
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "state": "running"}))
    main(args)
    assert not (tmp_path / "tokens" / "train-00001.bin.tmp").exists()
    assert "2 of 3 shards already encoded" in capsys.readouterr().err
    assert paths[1].exists() and paths[0].stat().st_mtime_ns == keep

    # truncated and corrupted shards name the file
    size = paths[1].stat().st_size
    with open(paths[1], "r+b") as fh:
        fh.truncate(size - 3)
    with pytest.raises(tokens_mod.ShardError, match="train-00001.bin.*truncated"):
        tokens_mod.open_shard(paths[1])
    with open(paths[0], "r+b") as fh:
        fh.seek(100)
        b = fh.read(1)
        fh.seek(100)
        fh.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(tokens_mod.ShardError, match="train-00000.bin.*corrupted"):
        tokens_mod.open_shard(paths[0], verify=True)


def test_load_tokenizer_missing_folder_is_user_error(tmp_path):
    from zero_chatgpt.core.errors import UserError
    with pytest.raises(UserError, match="run `zero-chatgpt tokenizer`"):
        load_tokenizer(tmp_path)


def test_stage_without_corpus_says_what_to_do(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "--run-dir", str(tmp_path), "--preset", "demo"])
    assert e.value.code == 2
    assert f"run `zero-chatgpt data --run-dir {tmp_path}` first" in capsys.readouterr().err


def test_shards_from_worker_processes_equal_shards_from_threads(tmp_path, corpus, saved):
    """Many shards go to worker processes, few to a thread pool: the files must not differ."""
    from zero_chatgpt.model.shard_encoding import _NoBar, run_jobs
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        with JsonlZstWriter(data / f"train-{i:05d}.jsonl.zst") as w:
            for t in corpus[i * 25:(i + 1) * 25]:
                w.write({"text": t})
    srcs = sorted(data.glob("*.jsonl.zst"))
    outs = {}
    for name, threads in (("procs", 2), ("threads", 1)):
        out = tmp_path / name
        out.mkdir()
        tok = load_tokenizer(saved[0], num_threads=threads)
        jobs = [("train", s, out / (s.name.split(".")[0] + ".bin"), {}) for s in srcs]
        stats = {job[2].name: st for job, st in run_jobs(jobs, tok, saved[0], _NoBar())}
        assert sorted(stats) == [f"train-{i:05d}.bin" for i in range(4)]
        assert all(st["docs"] == 25 for st in stats.values())
        outs[name] = {p.name: p.read_bytes() for p in out.glob("*.bin")}
    assert outs["procs"] == outs["threads"]


def test_damaged_corpus_shard_is_named(tmp_path, corpus, capsys):
    _write_corpus(tmp_path, corpus)
    shard = tmp_path / "data" / "train-00001.jsonl.zst"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])     # truncated zstd stream
    with pytest.raises(SystemExit):
        main(["tokenizer", "--run-dir", str(tmp_path), "--preset", "demo", "--set", "tokenizer.vocab_size=600"])
    err = capsys.readouterr().err
    assert "train-00001.jsonl.zst: unreadable corpus shard" in err and "zero-chatgpt data --force" in err
