"""GGUF export on a tiny run: the file read back with gguf's own reader (every key, the vocabulary, the
tensors), a NumPy forward of llama.cpp's layout on its tensors giving our logits (which proves the q/k
permutation), the refusal to overwrite what export did not write, the command end to end; and, where
llama-cpp-python is installed, llama.cpp itself: its tokenizer, logits and greedy continuations."""
from __future__ import annotations

import json
import os
import random

import gguf
import numpy as np
import pytest
import torch
from test_sft import make_tokenizer

from runs import record_stage, skip_unless_ci, zc
from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.settings import ChatSection
from zero_chatgpt.export.gguf import export_gguf, permute_qk, tensor_names
from zero_chatgpt.model.generate import generate
from zero_chatgpt.model.tokenizer import BYTE_TO_CHAR, DEFAULT_PATTERN, Tokenizer, chat_template, load_tokenizer
from zero_chatgpt.model.transformer import ModelConfig, Transformer

# Llama 3's split regex as llama.cpp's llama-vocab.cpp quotes it for LLAMA_VOCAB_PRE_TYPE_LLAMA3 (the
# pre-tokenizer "llama-bpe"): "original regex from tokenizer.json".
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
EXTRA_ROWS = 3   # the sft model has embedding rows beyond the tokenizer (as after init_from a larger model)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory with a tokenizer, a tied pretrain model and an untied grouped-query sft model
    (its own rope theta, spare vocabulary rows); random weights, larger than the init so that logits
    lie far apart and an argmax is never decided by rounding."""
    root = tmp_path_factory.mktemp("gguf_run")
    make_tokenizer().save(root / "tokenizer")
    tok = load_tokenizer(root / "tokenizer")
    record_stage(root, "tokenizer")
    for stage, tied, theta, extra in (("pretrain", True, 10000.0, 0), ("sft", False, 50000.0, EXTRA_ROWS)):
        torch.manual_seed(len(stage))
        cfg = ModelConfig(vocab_size=tok.vocab_size + extra, hidden_size=64, intermediate_size=160,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=128, rope_theta=theta, tie_word_embeddings=tied)
        m = Transformer(cfg)
        with torch.no_grad():
            for p in m.parameters():
                p.uniform_(0.5, 1.5) if p.dim() == 1 else p.normal_(0.0, 0.15)
        ckpt.save_checkpoint(root / stage, "final", model_state=m.state_dict(), cfg=cfg)
        record_stage(root, stage, reads=("tokenizer",))
    return root, tok


def _export(root, stage, out, gguf_type="f32"):
    return export_gguf(root / stage / "final", root / "tokenizer", out, name=f"zero-chatgpt test {stage}",
                       gguf_type=gguf_type, sampling=ChatSection(temperature=0.5, top_k=20))


@pytest.fixture(scope="module")
def files(run, tmp_path_factory):
    root, _ = run
    d = tmp_path_factory.mktemp("gguf_files")
    out = {}
    for stage in ("pretrain", "sft"):
        for kind in ("f32", "f16"):
            out[stage, kind] = d / f"{stage}-{kind}.gguf"
            _export(root, stage, out[stage, kind], kind)
    return out


def _kv(reader, key):
    return reader.fields[key].contents()


def _weights(stage_dir):
    m = ckpt.load_model(stage_dir)
    return m, {k: v.detach().numpy() for k, v in m.state_dict().items()}


def test_pattern_is_llama_cpps_llama_bpe():
    assert DEFAULT_PATTERN == LLAMA3_REGEX


def test_every_key_present_and_right(run, files):
    root, tok = run
    r = gguf.GGUFReader(files["sft", "f32"])
    cfg = ckpt.read_model_config(root / "sft" / "final")
    want = {"general.architecture": "llama", "general.name": "zero-chatgpt test sft", "general.file_type": 0,
            "llama.context_length": 128, "llama.embedding_length": 64, "llama.block_count": 2,
            "llama.feed_forward_length": 160, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
            "llama.rope.dimension_count": 16, "llama.vocab_size": cfg.vocab_size,
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
            "tokenizer.ggml.bos_token_id": tok.eot_id, "tokenizer.ggml.eos_token_id": tok.im_end_id,
            "tokenizer.ggml.eot_token_id": tok.im_end_id, "tokenizer.ggml.padding_token_id": tok.pad_id,
            "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False,
            "general.sampling.top_k": 20, "general.sampling.penalty_last_n": -1}
    for k, v in want.items():
        assert _kv(r, k) == v, k
    approx = {"llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 50000.0,
              "general.sampling.temp": 0.5, "general.sampling.top_p": 0.9, "general.sampling.penalty_repeat": 1.1}
    for k, v in approx.items():
        assert _kv(r, k) == pytest.approx(v, rel=1e-6), k
    # the template the HF export ships, byte for byte
    hf_cfg = json.loads((root / "tokenizer" / "tokenizer_config.json").read_text())
    assert _kv(r, "tokenizer.chat_template") == hf_cfg["chat_template"] == chat_template(tok.default_system_prompt)
    assert _kv(gguf.GGUFReader(files["sft", "f16"]), "general.file_type") == 1


def test_vocabulary_is_the_tokenizers(run, files):
    root, tok = run
    r = gguf.GGUFReader(files["sft", "f32"])
    tokens, types, merges = (_kv(r, f"tokenizer.ggml.{k}") for k in ("tokens", "token_type", "merges"))
    n = tok.vocab_size
    assert len(tokens) == len(types) == n + EXTRA_ROWS
    assert tokens[:tok.n_learned] == ["".join(BYTE_TO_CHAR[b] for b in tok.token_bytes[i]) for i in range(tok.n_learned)]
    assert tokens[tok.n_learned:n] == sorted(tok.special_tokens, key=tok.special_tokens.get)
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + EXTRA_ROWS)]
    assert types == [1] * tok.n_learned + [3] * len(tok.special_tokens) + [5] * EXTRA_ROWS
    spec = json.loads((root / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))
    assert merges == [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    # and, independently of tokenizer.json: merge i joins two tokens into token 256 + i
    byte_of = {c: b for b, c in BYTE_TO_CHAR.items()}
    for i, m in enumerate(merges):
        a, b = m.split(" ")
        assert bytes(byte_of[c] for c in a + b) == tok.token_bytes[256 + i]
    assert len(merges) == tok.n_learned - 256


@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_tensors_round_trip(run, files, kind):
    root, _ = run
    for stage in ("pretrain", "sft"):
        m, w = _weights(root / stage / "final")
        cfg = m.config
        r = gguf.GGUFReader(files[stage, kind])
        got = {t.name: t for t in r.tensors}
        names = tensor_names(cfg.num_hidden_layers)
        if cfg.tie_word_embeddings:
            del names["lm_head.weight"]
        assert sorted(got) == sorted(names.values())
        # the names are llama.cpp's own (its converter's map)
        ref = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
        assert all(ref.get_name(k, try_suffixes=(".weight",)) == v for k, v in names.items())
        for ours, theirs in names.items():
            t = got[theirs]
            a = np.asarray(t.data)
            want_type = gguf.GGMLQuantizationType.F32 if kind == "f32" or a.ndim == 1 else gguf.GGMLQuantizationType.F16
            assert t.tensor_type == want_type, theirs
            if ours.endswith(("q_proj.weight", "k_proj.weight")):
                a = _unpermute(a, cfg.num_attention_heads if "q_proj" in ours else cfg.num_key_value_heads)
            expect = w[ours] if a.ndim == 1 or kind == "f32" else w[ours].astype(np.float16)
            assert a.shape == expect.shape and np.array_equal(a, expect), theirs


def _unpermute(a, heads):
    return a.reshape(heads, a.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(a.shape)


def test_permutation_pairs_rotate_half_partners():
    """Within each head, row i goes to 2i and row i + D/2 to 2i+1: transformers' rotation partners
    become llama.cpp's adjacent pairs."""
    heads, D = 3, 8
    rows = np.arange(heads * D, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    p = permute_qk(rows, heads)[:, 0].reshape(heads, D)
    for h in range(heads):
        for i in range(D // 2):
            assert p[h, 2 * i] == h * D + i and p[h, 2 * i + 1] == h * D + i + D // 2
    assert np.array_equal(_unpermute(permute_qk(rows, heads), heads), rows)


def llama_cpp_forward(reader, ids, permuted=True):
    """Logits (T, vocab) of llama.cpp's Llama graph in NumPy (float64), from the GGUF alone: interleaved
    RoPE (LLAMA_ROPE_TYPE_NORM rotates dimensions 2i and 2i+1), kv head h // (heads / kv_heads) for query
    head h, output.weight or else token_embd. `permuted=False` first undoes the export's q/k permutation:
    the negative control, a file written without it."""
    kv = {k: _kv(reader, k) for k in ("llama.block_count", "llama.attention.head_count",
                                      "llama.attention.head_count_kv", "llama.rope.freq_base",
                                      "llama.attention.layer_norm_rms_epsilon")}
    W = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
    L, H, Hk = kv["llama.block_count"], kv["llama.attention.head_count"], kv["llama.attention.head_count_kv"]
    eps, base = kv["llama.attention.layer_norm_rms_epsilon"], kv["llama.rope.freq_base"]
    x = W["token_embd.weight"][ids]
    T, D = len(ids), x.shape[1] // H
    ang = np.arange(T)[:, None] * base ** (-np.arange(0, D, 2) / D)[None, :]    # (T, D/2)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def norm(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * w

    def rope(v):          # (T, heads, D), pairs (2i, 2i+1)
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(L):
        p = f"blk.{i}."
        wq, wk = W[p + "attn_q.weight"], W[p + "attn_k.weight"]
        if not permuted:
            wq, wk = _unpermute(wq, H), _unpermute(wk, Hk)
        h = norm(x, W[p + "attn_norm.weight"])
        q = rope((h @ wq.T).reshape(T, H, D))
        k = rope((h @ wk.T).reshape(T, Hk, D))
        v = (h @ W[p + "attn_v.weight"].T).reshape(T, Hk, D)
        k, v = np.repeat(k, H // Hk, axis=1), np.repeat(v, H // Hk, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(D) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", s, v).reshape(T, H * D) @ W[p + "attn_output.weight"].T
        h = norm(x, W[p + "ffn_norm.weight"])
        g = h @ W[p + "ffn_gate.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ W[p + "ffn_up.weight"].T)) @ W[p + "ffn_down.weight"].T
    x = norm(x, W["output_norm.weight"])
    return x @ W.get("output.weight", W["token_embd.weight"]).T


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_llama_cpp_layout_forward_gives_our_logits(run, files, stage):
    root, tok = run
    m, _ = _weights(root / stage / "final")
    ids = tok.encode("守株待兔：比喻死守狭隘经验，不知变通。Hello, world 2024!")
    with torch.no_grad():
        ours = m(torch.tensor([ids]))[0].double().numpy()
    r32 = gguf.GGUFReader(files[stage, "f32"])
    diff = np.abs(llama_cpp_forward(r32, ids) - ours).max()
    assert diff <= 1e-4, diff
    # without the permutation the same graph is far off: the test can tell
    assert np.abs(llama_cpp_forward(r32, ids, permuted=False) - ours).max() > 0.1
    # f16 weights: rounding only (relative 2^-11 per weight), far below what the permutation moves
    f16 = llama_cpp_forward(gguf.GGUFReader(files[stage, "f16"]), ids)
    assert np.abs(f16 - ours).max() <= 2e-2 * np.abs(ours).max()


def test_refuses_to_overwrite_what_export_did_not_write(run, tmp_path):
    root, _ = run
    mine = tmp_path / "model.gguf"
    mine.write_bytes(b"GGUF my own model")
    with pytest.raises(UserError, match="not written by `zero-chatgpt export`.*nothing was changed"):
        _export(root, "sft", mine)
    assert mine.read_bytes() == b"GGUF my own model"
    # an earlier export is replaced; one changed since is not
    out = tmp_path / "out.gguf"
    _export(root, "pretrain", out)
    _export(root, "sft", out)
    assert _kv(gguf.GGUFReader(out), "general.name") == "zero-chatgpt test sft"
    with open(out, "r+b") as fh:
        fh.seek(-1, 2)
        fh.write(b"\x01")
    before = out.read_bytes()
    with pytest.raises(UserError, match="changed since.*damaged"):
        _export(root, "sft", out)
    assert out.read_bytes() == before
    # a marker of another file does not vouch for this one; a folder is refused
    (tmp_path / "other.gguf").write_bytes(b"x")
    os.replace(tmp_path / ".out.gguf.zero-chatgpt-export.json", tmp_path / ".other.gguf.zero-chatgpt-export.json")
    with pytest.raises(UserError, match="not written by"):
        _export(root, "sft", tmp_path / "other.gguf")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        _export(root, "sft", tmp_path / "dir.gguf")
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


def test_refuses_what_llama_cpp_cannot_run(run, tmp_path):
    root, tok = run
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, head="score")
    m = Transformer(cfg)
    ckpt.save_checkpoint(tmp_path / "rm", "final", model_state=m.state_dict(), cfg=cfg)
    with pytest.raises(UserError, match="reward/value model.*causal LMs only"):
        export_gguf(tmp_path / "rm" / "final", root / "tokenizer", tmp_path / "rm.gguf", name="rm")
    specials = sorted(tok.special_tokens, key=tok.special_tokens.get)
    Tokenizer(tok.mergeable_ranks, r"\S+|\s+", specials).save(tmp_path / "tok")
    with pytest.raises(UserError, match="its own regex.*tokenizer.pattern"):
        export_gguf(root / "pretrain" / "final", tmp_path / "tok", tmp_path / "x.gguf", name="x")
    with pytest.raises(UserError, match="--gguf-type q4"):
        export_gguf(root / "pretrain" / "final", root / "tokenizer", tmp_path / "x.gguf", name="x", gguf_type="q4")
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.slow
def test_cli_end_to_end(run, tmp_path):
    root, _ = run
    out = tmp_path / "sub" / "model.gguf"
    r = zc("export", "--run-dir", root, "--format", "gguf", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "exported sft model to" in r.stderr and "gguf (llama, f16" in r.stderr and "llama-server -m" in r.stderr
    rd = gguf.GGUFReader(out)
    assert _kv(rd, "general.name") == f"zero-chatgpt {root.name} sft" and _kv(rd, "general.file_type") == 1
    (tmp_path / "notes.gguf").write_text("mine")
    r = zc("export", "--run-dir", root, "--format", "gguf", "--out", tmp_path / "notes.gguf")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not written by" in r.stderr


# ------------------------------------------------------------------ llama.cpp itself

def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("ZC_LLAMA_CPP") == "1":
            pytest.fail("ZC_LLAMA_CPP=1 but llama_cpp does not import: pip install llama-cpp-python")
        skip_unless_ci("pip install llama-cpp-python (builds llama.cpp from source, ~8 min)")   # CI=true: fails
    return llama_cpp


def mixed_strings(n=50, seed=0):
    """Chinese, ASCII, digits, punctuation, whitespace runs, emoji and special-token look-alikes."""
    rnd = random.Random(seed)
    pieces = ["守株待兔", "画蛇添足", "，", "。", "“是什么意思？”", "中国", "人民", "Hello", " world", "don't", "I'LL",
              "2024", "3.14159", "1,000,000", " ", "  ", "\n", "\n\n", "\t", "😀", "🇨🇳", "é", "<|im_end|>",
              "<|endoftext|>", "abc123", "（括号）", "——", "...", "?!", "'s", "ŉ", "\u3000"]
    fixed = ["", " ", "中国经济发展，人民生活水平不断提高。", "Hello, world!", "line one\nline two\r\n", "   leading",
             "数字1234567和字母ABC", "<|im_start|>user\n你好<|im_end|>"]
    return fixed + ["".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 12))) for _ in range(n - len(fixed))]


@pytest.fixture(scope="module")
def llamas(files):
    llama_cpp = _llama_cpp()
    out = {}
    for stage in ("pretrain", "sft"):
        # an f32 KV cache (llama.cpp's default is f16): the comparison is of the graph, not of a cache format
        out[stage] = llama_cpp.Llama(model_path=str(files[stage, "f32"]), n_ctx=128, n_batch=128, n_threads=1,
                                     logits_all=True, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                                     verbose=False)
    yield out
    for m in out.values():
        m.close()


def test_llama_cpp_tokenizes_as_we_do(run, llamas):
    _, tok = run
    llm = llamas["sft"]
    assert llm.metadata["tokenizer.ggml.pre"] == "llama-bpe"
    texts = mixed_strings()
    assert len(texts) == 50
    for t in texts:       # plain text: special-token look-alikes stay text, no BOS is added
        assert llm.tokenize(t.encode(), add_bos=True, special=False) == tok.encode(t), t
        assert llm.detokenize(tok.encode(t)).decode("utf-8", "replace") == tok.decode(tok.encode(t))
    msgs = [{"role": "user", "content": "“画蛇添足”是什么意思？"}]
    ids, _ = tok.encode_chat(msgs, add_generation_prompt=True)
    assert llm.tokenize(tok.render_chat(msgs, add_generation_prompt=True).encode(), add_bos=True, special=True) == ids
    assert llm.token_eos() == tok.im_end_id and llm.token_bos() == tok.eot_id
    # generation ends at either stop id, as `zero-chatgpt chat` stops (llama.cpp knows <|endoftext|> by name)
    llama_cpp = _llama_cpp()
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert [bool(llama_cpp.llama_vocab_is_eog(vocab, i)) for i in tok.stop_ids + (tok.pad_id, tok.im_start_id)] == \
        [True, True, False, False]


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_llama_cpp_logits_and_greedy_match_ours(run, llamas, stage):
    root, tok = run
    llm = llamas[stage]
    m = ckpt.load_model(root / stage / "final")
    ids = tok.encode("守株待兔：比喻死守狭隘经验，不知变通。Hello, world 2024!")
    llm.reset()
    llm.eval(ids)
    theirs = np.asarray(llm.scores[:len(ids)])
    with torch.no_grad():
        ours = m(torch.tensor([ids]))[0].numpy()
    assert theirs.shape == ours.shape
    diff = float(np.abs(theirs - ours).max())
    assert diff <= 1e-3 * max(1.0, float(np.abs(ours).max())), diff
    prompts = [tok.encode(p) for p in ["中国", "画蛇添足", "Hello", "人民生活"]]
    gens = generate(m, prompts, max_new_tokens=24, temperature=0)
    same = total = 0
    for p, g in zip(prompts, gens):
        llm.reset()
        llm.eval(p)
        mine = []
        for _ in range(24):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            mine.append(nxt)
            llm.eval([nxt])
        first_diff = next((i for i, (a, b) in enumerate(zip(mine, g.tokens)) if a != b), len(g.tokens))
        same += first_diff
        total += len(g.tokens)
    assert same >= 0.9 * total, (same, total)
