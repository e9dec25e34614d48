"""Normalization, quality filters and PII masking for Chinese text, character-based.

No word segmenter: every statistic is computed on characters (datatrove's Chinese
filters re-run jieba in each filter and run at ~120-150 docs/s; character n-grams
need none). The repetition statistics are computed with numpy on code points: one
rolling hash per n-gram size, one stable argsort per size, so a 1,000-character
document costs a few hundred microseconds in all (bench/clean.py measures it).

Rules and thresholds (each is a key of [data] in presets/defaults.toml):
- normalize: Unicode NFKC (full-width digits and letters → ASCII) keeping Chinese
  full-width punctuation (，。！？：；（）), which NFKC would turn into ASCII; optional
  traditional → simplified with OpenCC `t2s`; the seed's removal of `[n]` / `[n-m]`
  citation marks and repeated 。！？; whitespace collapsed, blank lines removed.
- filters: minimum characters and CJK characters (the seed dropped Baike texts under 30
  CJK characters), CJK ratio (ChineseWebText / MNBVC use 0.30 for web text), share of lines
  ending in terminal punctuation (C4, adapted to Chinese punctuation), duplicate-line
  fraction (FineWeb-2 `cmn_Hani`: 0.287), the share of characters in the most frequent
  character 2/3/4-gram and in repeated 5/7/10/13-grams (Gopher, Rae et al. 2021). FineWeb-2's
  `cmn_Hani` thresholds are on words; on characters the same values drop 5-10 % of clean news
  (repeated names and terms), so ours sit at the 99.9th percentile of People's Daily 1998-01
  (dropping ~0.1 % of it) while still catching boilerplate and spam (ChineseWebText drops
  documents with > 50 % repeated 13-grams), and the seed's Baike section-title rule.
- PII: e-mail addresses, phone numbers, ID-card numbers and QQ numbers are masked.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

import numpy as np

# ── normalization ───────────────────────────────────────────────────────────────────────────────

# Chinese full-width punctuation is parked in the Private Use Area while NFKC runs, then put
# back: NFKC would rewrite ，！？：；（）～ as ASCII. The other full-width forms (digits, letters,
# ．％＋－／ …) become ASCII as NFKC intends (１２．５％ → 12.5%).
_FW_PUNCT = [ord(ch) for ch in "！，：；？（）～"]
_PROTECT = {c: 0xF000 + (c - 0xFF00) for c in _FW_PUNCT}
_PROTECT.update({c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F) if c not in _PROTECT})  # １Ａ％ → 1A%
_PROTECT[0x3000] = 0x20  # ideographic space
_UNPROTECT = {0xF000 + (c - 0xFF00): c for c in _FW_PUNCT}
_PUA = re.compile("[\uf001-\uf05e]")

_CITATION = re.compile(r"\[\d+(?:[-–]\d+)?\]")          # the seed: 黄河[1] / [2-3]
_REPEATED_END = re.compile(r"([。！？!?])\1+")            # the seed: 。。。 → 。
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u202f\u205f\ufeff]+")
_LINE_SPACES = re.compile(r" *\n[\s]*")                  # spaces around newlines, blank lines
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef]")
TERMINAL = tuple("。！？…”」』.!?；;：:）)")


def normalize(text: str, t2s=None, citations: bool = True, repeated_punct: bool = True) -> str:
    """NFKC keeping Chinese punctuation, optional t2s, the seed's citation / punctuation fixes,
    whitespace collapsed within lines and blank lines removed."""
    s = text.translate(_PROTECT)
    if not unicodedata.is_normalized("NFKC", s):
        s = unicodedata.normalize("NFKC", s)
    if _PUA.search(s):
        s = s.translate(_UNPROTECT)
    if t2s is not None:
        s = t2s.convert(s)
    if citations and "[" in s:
        s = _CITATION.sub("", s)
    if repeated_punct:
        s = _REPEATED_END.sub(r"\1", s)
    s = _SPACES.sub(" ", s)
    if "\n" in s or "\r" in s:
        s = _LINE_SPACES.sub("\n", s.replace("\r\n", "\n").replace("\r", "\n"))
    return s.strip()


# ── PII masking ─────────────────────────────────────────────────────────────────────────────────

PII_PATTERNS = {
    "email": (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"), "<EMAIL>"),
    # 18-digit resident ID (last digit may be X), birth date 18xx-20xx, month 01-12
    "id_card": (re.compile(r"(?<![0-9A-Za-z])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])\d{2}\d{3}[\dXx](?![0-9A-Za-z])"),
                "<ID>"),
    # mobile 1[3-9]xxxxxxxxx (optionally +86), landline 0xx(x)-xxxxxxx(x)
    "phone": (re.compile(r"(?<![0-9])(?:(?:\+?86)[- ]?)?1[3-9]\d(?:[- ]?\d{4}){2}(?![0-9])"
                         r"|(?<![0-9])0\d{2,3}-\d{7,8}(?![0-9])"), "<PHONE>"),
    # QQ numbers: 5-11 digits right after QQ / 扣扣 / Q号
    "qq": (re.compile(r"(?i)((?:qq|扣扣|q号)(?:号码|号)?\s*[:：是为]?\s*)[1-9]\d{4,10}(?![0-9])"), r"\1<QQ>"),
}


def mask_pii(text: str, counts: Counter | None = None) -> str:
    """Replace e-mail addresses, ID-card numbers, phone numbers and QQ numbers by placeholders."""
    if "@" in text:
        text, n = PII_PATTERNS["email"][0].subn(PII_PATTERNS["email"][1], text)
        if counts is not None and n:
            counts["email"] += n
    digits = sum(text.count(d) for d in "0123456789")
    if digits >= 5:
        for name in ("id_card", "phone", "qq"):
            pat, repl = PII_PATTERNS[name]
            text, n = pat.subn(repl, text)
            if counts is not None and n:
                counts[name] += n
    return text


# ── statistics ──────────────────────────────────────────────────────────────────────────────────

_MULT = np.uint64(0x9E3779B97F4A7C15)


def codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)


def ngram_stats(cps: np.ndarray, top_ns: tuple[int, ...], dup_ns: tuple[int, ...]) -> tuple[dict, dict]:
    """Character repetition statistics (Gopher's, on characters instead of words).

    top[n]: share of characters inside the most frequent n-gram (count × n / length).
    dup[n]: share of characters covered by n-grams that already occurred earlier in the text.
    """
    L = len(cps)
    top, dup = {}, {}
    sizes = sorted(set(top_ns) | set(dup_ns))
    if not sizes:
        return top, dup
    h = cps.copy()
    n_have = 1
    with np.errstate(over="ignore"):
        for n in sizes:
            while n_have < n:  # extend the rolling polynomial hash by one character
                h = h[:-1] * _MULT + cps[n_have:]
                n_have += 1
            m = len(h)
            if m < 2:
                top[n] = dup[n] = 0.0
                continue
            order = np.argsort(h, kind="stable")
            hs = h[order]
            same = hs[1:] == hs[:-1]  # order[i+1] repeats an earlier n-gram (stable: earlier index first)
            if n in top_ns:
                starts = np.flatnonzero(np.concatenate(([True], ~same, [True])))
                top[n] = min(1.0, float(np.diff(starts).max()) * n / L)
            if n in dup_ns:
                pos = order[1:][same]
                if len(pos) == 0:
                    dup[n] = 0.0
                else:
                    # +1 where a repeated n-gram starts, -1 where it ends: covered = cumsum > 0
                    cover = np.bincount(pos, minlength=L + 1) - np.bincount(pos + n, minlength=L + 1)
                    dup[n] = float(np.count_nonzero(np.cumsum(cover[:L]))) / L
    return top, dup


# ── the cleaner ─────────────────────────────────────────────────────────────────────────────────

@dataclass
class CleanConfig:
    """The cleaning keys of [data] (see presets/defaults.toml for what each does)."""
    nfkc: bool = True
    t2s: bool = False
    remove_citations: bool = True
    collapse_punct: bool = True
    mask_pii: bool = True
    min_chars: int = 30
    min_cjk_chars: int = 30
    min_cjk_ratio: float = 0.3
    min_line_punct_ratio: float = 0.12
    max_dup_line_frac: float = 0.287
    top_ngram_n: tuple = (2, 3, 4)
    top_ngram_max: tuple = (0.25, 0.22, 0.21)
    dup_ngram_n: tuple = (5, 7, 10, 13)
    dup_ngram_max: tuple = (0.42, 0.34, 0.28, 0.25)
    drop_section_titles: tuple = ("重要参数", "项目简介", "产品简介", "个人资料", "个人简介")

    @classmethod
    def from_cfg(cls, data_cfg: dict) -> "CleanConfig":
        kw = {}
        for k, default in cls.__dataclass_fields__.items():
            if k in data_cfg:
                v = data_cfg[k]
                kw[k] = tuple(v) if isinstance(v, list) else v
        cfg = cls(**kw)
        if len(cfg.top_ngram_n) != len(cfg.top_ngram_max) or len(cfg.dup_ngram_n) != len(cfg.dup_ngram_max):
            from zero_chatgpt.console import UserError
            raise UserError("data.top_ngram_n / top_ngram_max (and dup_ngram_n / dup_ngram_max) must have "
                            "the same length")
        return cfg


REASONS = ("baike_section", "too_short", "few_cjk", "cjk_ratio", "line_punct", "dup_lines", "top_ngram",
           "dup_ngram")


class Cleaner:
    """`clean(record) -> (text, None)` for a kept document, `(None, reason)` for a dropped one."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self._t2s = None
        if cfg.t2s:
            import opencc
            self._t2s = opencc.OpenCC("t2s")
        self.pii = Counter()

    def normalize(self, text: str) -> str:
        c = self.cfg
        if not c.nfkc:
            s = text if self._t2s is None else self._t2s.convert(text)
            s = _CITATION.sub("", s) if c.remove_citations else s
            s = _REPEATED_END.sub(r"\1", s) if c.collapse_punct else s
            s = _SPACES.sub(" ", s)
            return _LINE_SPACES.sub("\n", s).strip()
        return normalize(text, self._t2s, c.remove_citations, c.collapse_punct)

    def check(self, text: str, meta: dict | None = None) -> str | None:
        """The reason `text` (already normalized) is dropped, or None to keep it."""
        c = self.cfg
        titles = (meta or {}).get("section_titles")
        if titles and c.drop_section_titles:
            if any(bad in t for t in titles for bad in c.drop_section_titles):
                return "baike_section"
        L = len(text)
        if L < c.min_chars:
            return "too_short"
        n_cjk = len(_CJK.findall(text))
        if n_cjk < c.min_cjk_chars:
            return "few_cjk"
        if n_cjk < c.min_cjk_ratio * L:
            return "cjk_ratio"
        if "\n" in text:  # line rules apply to documents of several lines
            lines = text.split("\n")
            ended = sum(1 for ln in lines if ln.endswith(TERMINAL))
            if ended < c.min_line_punct_ratio * len(lines):
                return "line_punct"
            if len(lines) - len(set(lines)) > c.max_dup_line_frac * len(lines):
                return "dup_lines"
        top, dup = ngram_stats(codepoints(text), c.top_ngram_n, c.dup_ngram_n)
        for n, limit in zip(c.top_ngram_n, c.top_ngram_max):
            if top[n] > limit:
                return "top_ngram"
        for n, limit in zip(c.dup_ngram_n, c.dup_ngram_max):
            if dup[n] > limit:
                return "dup_ngram"
        return None

    def clean(self, record: dict) -> tuple[str | None, str | None]:
        text = self.normalize(record["text"])
        reason = self.check(text, record.get("meta"))
        if reason is not None:
            return None, reason
        if self.cfg.mask_pii:
            text = mask_pii(text, self.pii)
        return text, None
