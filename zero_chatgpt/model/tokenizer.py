"""The tokenizer: byte-level BPE trained on the corpus, ChatML, saved in Hugging Face format.

Training uses `rustbpe` (a parallel Rust BPE trainer); encoding uses `tiktoken`
(a fast Rust BPE encoder). Both run the same pre-tokenization regex. The result is
exported to a Hugging Face `tokenizer.json` (ByteLevel BPE behind a Split
pre-tokenizer with the same regex, merges derived from the ranks) so that
`transformers.AutoTokenizer.from_pretrained(RUN_DIR/tokenizer)` gives the same ids;
tests/model/test_tokenizer.py holds the identity test. `tokenizer.json` is the single
source of truth: `load_tokenizer` rebuilds the tiktoken encoder from it.

Two bugs of the original project we do not repeat (seed/NOTES.md): role names
(`system`, `user`, `assistant`) are ordinary text, not special tokens (it made them
special, so "username" became [user, n, ame]); and the regex used at run time is the
one used in training (it differed, so digits split differently).

Vocabulary layout: ids [0, n_learned) are the 256 byte tokens and the learned merges;
then the special tokens <|endoftext|>, <|im_start|>, <|im_end|>, <|pad|> and
`reserved_tokens` spare slots (for later tools/roles without resizing the model).
`tokenizer.vocab_size` (config) counts all of them: the model's embedding rows.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import rustbpe
import tiktoken
import xxhash
import zstandard
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.io import atomic_write_json, atomic_write_text, corpus_shards, iter_jsonl

# The pre-tokenization regex (Llama 3's, which is GPT-4's with possessive quantifiers
# removed so that Oniguruma, fancy-regex and rustbpe all read it the same way).
# `[^\r\n\p{L}\p{N}]?\p{L}+` keeps a run of Chinese characters together with one
# leading punctuation mark ("，中国"), so BPE can learn multi-character words and
# punctuation+word tokens. Splitting Han runs from other letters measured worse
# (1.249 vs 1.291 chars/token on the demo val split at 4k vocab).
# Digits: groups of at most 3. On the demo corpus groups of 1/2/3/4 gave 1.2866 / 1.2912 /
# 1.2914 / 1.2919 chars/token at 4k vocab: 2, 3 and 4 are equal within 0.05%, single digits
# (Qwen2) 0.4% worse. Of the equals, 3 bounds the digit tokens BPE may spend vocabulary on
# at 1,110 (4 allows 11,110, which a 32k vocabulary trained on number-heavy web text would
# start to fill), keeps every group of a number written with thousands separators
# ("1,000,000") whole, and is GPT-4's and Llama 3's choice.
DEFAULT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

EOT, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
META_FILE = "zero_chatgpt.json"   # our own record beside the HF files (pattern, specials, system prompt)


def special_tokens(n_reserved: int) -> list[str]:
    return [EOT, IM_START, IM_END, PAD] + [f"<|reserved_{i}|>" for i in range(n_reserved)]


# ---------------------------------------------------------------------------------------
# Byte-level alphabet (GPT-2): every byte maps to one printable character, so a byte
# sequence is a string HF's ByteLevel BPE can store in its vocab and merges.

def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _to_str(token: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in token)


def _to_bytes(s: str) -> bytes:
    return bytes(CHAR_TO_BYTE[c] for c in s)


def _split_pair(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The two tokens whose merge made `token`: run BPE on its bytes with the lower ranks only.

    This is the split tiktoken's encoder reaches, so merges derived this way make HF's BPE
    produce the same ids (the same derivation as transformers' TikTokenConverter).
    """
    rank = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while True:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
    return parts[0], parts[1]


# ---------------------------------------------------------------------------------------
# ChatML. The Jinja template below and Tokenizer.render_chat are the same function; the
# parity test holds them together.

def chat_template(default_system_prompt: str = "") -> str:
    lines = ["{%- for message in messages -%}"]
    if default_system_prompt:
        # JSON escapes are valid Jinja string-literal escapes.
        lit = json.dumps(default_system_prompt, ensure_ascii=True)
        lines += ["{%- if loop.first and message['role'] != 'system' -%}",
                  "{{- '<|im_start|>system\\n' + " + lit + " + '<|im_end|>\\n' -}}",
                  "{%- endif -%}"]
    lines += ["{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}",
              "{%- endfor -%}",
              "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"]
    return "\n".join(lines)


class Tokenizer:
    """Byte-level BPE with ChatML. Plain text never yields special tokens."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str, specials: Sequence[str],
                 default_system_prompt: str = "", num_threads: int = 0):
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        self.n_learned = len(mergeable_ranks)
        self.special_tokens = {tok: self.n_learned + i for i, tok in enumerate(specials)}
        for need in (EOT, IM_START, IM_END, PAD):
            if need not in self.special_tokens:
                raise UserError(f"tokenizer lacks the special token {need}")
        self.enc = tiktoken.Encoding("zero-chatgpt", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.vocab_size = self.n_learned + len(specials)
        self.eot_id = self.special_tokens[EOT]
        self.im_start_id = self.special_tokens[IM_START]
        self.im_end_id = self.special_tokens[IM_END]
        self.pad_id = self.special_tokens[PAD]
        self.stop_ids = (self.im_end_id, self.eot_id)
        self.default_system_prompt = default_system_prompt
        self.num_threads = num_threads or (os.cpu_count() or 1)

    # -- plain text -------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode on all cores: tiktoken releases the GIL, so threads run in parallel. Texts go
        to a persistent pool in chunks (a future per text costs more than encoding a short one)."""
        texts = list(texts)
        if self.num_threads == 1 or len(texts) < 2 * self.num_threads:
            return [self.enc.encode_ordinary(t) for t in texts]
        size = max(1, min(256, len(texts) // (4 * self.num_threads)))
        chunks = [texts[i:i + size] for i in range(0, len(texts), size)]
        encode = self.enc.encode_ordinary
        return [ids for part in self._pool.map(lambda ch: [encode(t) for t in ch], chunks) for ids in part]

    @cached_property
    def _pool(self):
        return ThreadPoolExecutor(self.num_threads, thread_name_prefix="tokenizer")

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i < self.n_learned]
        return self.enc.decode(ids, errors="replace")

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """Bytes of every id (special tokens as their text), e.g. for streaming decode."""
        out = [b""] * self.vocab_size
        for b, r in self.mergeable_ranks.items():
            out[r] = b
        for tok, i in self.special_tokens.items():
            out[i] = tok.encode()
        return out

    # -- chat ---------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The ChatML text; equal to HF `apply_chat_template(messages, tokenize=False)`."""
        out = []
        for i, m in enumerate(messages):
            if i == 0 and self.default_system_prompt and m["role"] != "system":
                out.append(f"{IM_START}system\n{self.default_system_prompt}{IM_END}\n")
            out.append(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n")
        if add_generation_prompt:
            out.append(f"{IM_START}assistant\n")
        return "".join(out)

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[int]]:
        """(ids, assistant_mask): mask is 1 on each assistant message's content tokens and its
        closing <|im_end|>, the tokens SFT learns to produce; 0 elsewhere.

        The ids are those of HF `apply_chat_template(tokenize=True)`: the text between two
        special tokens is encoded as one piece, exactly as HF splits on added tokens. (Unlike
        HF, a message whose content spells a special token keeps it as plain text.)
        """
        msgs = list(messages)
        if msgs and self.default_system_prompt and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": self.default_system_prompt})
        ids: list[int] = []
        mask: list[int] = []
        nl = self.encode("\n")
        for m in msgs:
            head = f"{m['role']}\n"
            body = self.encode(head + m["content"])
            ids.append(self.im_start_id)
            mask.append(0)
            ids.extend(body)
            if m["role"] == "assistant":
                # A token belongs to the answer when it holds any byte after "assistant\n".
                start, end = len(head.encode()), 0
                for t in body:
                    end += len(self.token_bytes[t])
                    mask.append(1 if end > start else 0)
                ids.append(self.im_end_id)
                mask.append(1)
            else:
                mask.extend([0] * len(body))
                ids.append(self.im_end_id)
                mask.append(0)
            ids.extend(nl)
            mask.extend([0] * len(nl))
        if add_generation_prompt:
            gen = [self.im_start_id] + self.encode("assistant\n")
            ids.extend(gen)
            mask.extend([0] * len(gen))
        return ids, mask

    # -- Hugging Face export -------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json,
        chat_template.jinja and our meta file into `path`."""

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        ranks = self.mergeable_ranks
        by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
        vocab = {_to_str(b): r for b, r in by_rank}
        merges = [tuple(_to_str(p) for p in _split_pair(ranks, b)) for b, r in by_rank if len(b) > 1]
        # ignore_merges: a pre-token that is itself in the vocabulary is one token, as in
        # tiktoken (which looks the whole piece up before merging).
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, byte_fallback=False))
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(self.pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        specials = sorted(self.special_tokens, key=self.special_tokens.get)
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        for t in specials:
            assert hf.token_to_id(t) == self.special_tokens[t], t
        tmp = path / "tokenizer.json.tmp"
        hf.save(str(tmp))
        os.replace(tmp, path / "tokenizer.json")

        template = chat_template(self.default_system_prompt)
        special_map = {"eos_token": IM_END, "pad_token": PAD,
                       "additional_special_tokens": [t for t in specials if t not in (IM_END, PAD)]}
        atomic_write_json(path / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None, "unk_token": None, "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": 1 << 20,
            "chat_template": template, **special_map,
        })
        atomic_write_json(path / "special_tokens_map.json", special_map)
        atomic_write_text(path / "chat_template.jinja", template)
        atomic_write_json(path / META_FILE, {"format": 1, "pattern": self.pattern, "special_tokens": specials,
                                             "default_system_prompt": self.default_system_prompt})
        return path


def load_tokenizer(path: str | os.PathLike, num_threads: int = 0) -> Tokenizer:
    """Load RUN_DIR/tokenizer (or any folder we saved) for encoding, decoding and chat."""
    path = Path(path)
    file = path / "tokenizer.json"
    if not file.exists():
        raise UserError(f"no tokenizer at {path} (missing tokenizer.json); run `zero-chatgpt tokenizer` first")
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        ranks = {_to_bytes(s): i for s, i in spec["model"]["vocab"].items()}
        pattern = spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
        added = sorted(spec["added_tokens"], key=lambda t: t["id"])
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not a zero-chatgpt tokenizer folder ({e!r}); rerun `zero-chatgpt tokenizer --force`")
    if meta.get("pattern") != pattern:
        raise UserError(f"{file}: its pre-tokenizer regex differs from the one the tokenizer was trained with "
                        f"({path / META_FILE}); rerun `zero-chatgpt tokenizer --force`")
    specials = [t["content"] for t in added]
    if [t["id"] for t in added] != list(range(len(ranks), len(ranks) + len(added))):
        raise UserError(f"{file}: special token ids do not follow the learned vocabulary")
    return Tokenizer(ranks, pattern, specials, meta.get("default_system_prompt", ""), num_threads)


# ---------------------------------------------------------------------------------------
# Training

def train_bpe(texts: Iterable[str], vocab_size: int, pattern: str = DEFAULT_PATTERN, n_reserved: int = 4,
              default_system_prompt: str = "") -> Tokenizer:
    """Train a byte-level BPE whose total size (bytes + merges + specials) is `vocab_size`."""
    specials = special_tokens(n_reserved)
    n_learned = vocab_size - len(specials)
    if n_learned < 256:
        raise UserError(f"tokenizer.vocab_size={vocab_size} is too small: it needs 256 byte tokens "
                        f"+ {len(specials)} special tokens")
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts), n_learned, pattern=pattern)
    ranks = {bytes(b): r for b, r in bpe.get_mergeable_ranks()}
    return Tokenizer(ranks, pattern, specials, default_system_prompt)


def shard_texts(path: Path) -> Iterator[str]:
    """The "text" of every document of a corpus shard; a damaged shard is a UserError naming it."""
    n = 0
    try:
        for n, rec in enumerate(iter_jsonl(path), 1):
            yield rec["text"]
    except (zstandard.ZstdError, EOFError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: unreadable corpus shard at document {n + 1} ({type(e).__name__}: {e}); "
                        f"rerun `zero-chatgpt data --force`") from None


class CorpusSample:
    """About `max_chars` characters drawn evenly from the corpus shards, each document cut to
    `max_doc_chars` (BPE training memory grows with the number of distinct pre-tokens, and
    Chinese pre-tokens are long and mostly unique: the caps bound it). Iterate for the texts.

    Documents are kept with probability p = budget / estimated corpus size, decided by a
    hash of the text (deterministic); the corpus size comes from data/stats.json, else from
    the compressed shard sizes and the ratio measured on the smallest shard.
    """

    def __init__(self, data_dir: Path, split: str, max_chars: int, max_doc_chars: int):
        self.shards = corpus_shards(data_dir, split)
        if not self.shards:
            raise UserError(f"no {split} corpus shards in {data_dir}; run `zero-chatgpt data` first")
        sizes = {p: p.stat().st_size for p in self.shards}
        probe = min(self.shards, key=sizes.get)
        lens = [len(t) for t in shard_texts(probe)]
        capped = sum(min(n, max_doc_chars) for n in lens)
        est = capped / max(sizes[probe], 1) * sum(sizes.values())
        # The data stage's stats.json counts the characters it wrote: exact where present.
        try:
            st = json.loads((Path(data_dir) / "stats.json").read_text())
            est = st["chars_out"] * st[f"{split}_docs"] / st["docs_out"] * capped / max(sum(lens), 1)
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
            pass
        keep = min(1.0, max_chars / max(est, 1))
        self.threshold = int(keep * (1 << 64)) if keep < 1 else None
        self.max_chars, self.max_doc_chars = max_chars, max_doc_chars
        self.expected_chars = int(min(max_chars, est))

    def __iter__(self) -> Iterator[str]:
        budget = self.max_chars
        for p in self.shards:
            for text in shard_texts(p):
                if self.threshold is not None and \
                        xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass")) >= self.threshold:
                    continue
                text = text[:self.max_doc_chars]
                yield text
                budget -= len(text)
                if budget <= 0:
                    return


def sample_texts(data_dir: Path, split: str, max_chars: int, max_doc_chars: int) -> CorpusSample:
    return CorpusSample(Path(data_dir), split, max_chars, max_doc_chars)
