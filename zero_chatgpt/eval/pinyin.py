"""Scoring pinyin answers: the normalized spelling (`pinyin_key`, `pinyin_exact`) and the syllables
(`pinyin_syllables`, `pinyin_syllable_acc`).

Normalization (pinyin_key): NFKC (full-width letters folded), lowercase; "v" and "u:" are "ü" (how pinyin
is typed); everything that is not a letter or a combining mark (spaces, apostrophes, hyphens, punctuation)
is dropped, so "xī'ān", "xī ān" and "xīān" are one spelling; a numbered syllable ("lv3", "jian4") gets its
tone mark by the standard placement rule (a or e, else the o of "ou", else the last vowel; 5/0 = neutral),
so "yi1 jian4 qing1 xin1" equals "yī jiàn qīng xīn". Tones kept: the key keeps the four tone marks
(macron, acute, caron, grave) where they stand; tones ignored: they are removed, the ü's diaeresis is not
(lü and lu are different syllables). Any other letter (a Chinese character) stays, so an answer with
words around the pinyin is not an exact match.

Syllables (pinyin_syllables): the same normalization, but the pieces between separators are kept apart
and a piece written without separators ("yījiànqīngxīn") is cut into syllables of Mandarin's inventory
(`SYLLABLES`). pinyin_exact is all or nothing; pinyin_syllable_acc gives the partial credit of an answer
that has three of four syllables right, or one tone wrong — what a small model learns first.
"""
from __future__ import annotations

import unicodedata

TONE_MARKS = {"\u0304": "1", "\u0301": "2", "\u030c": "3", "\u0300": "4"}     # ā á ǎ à, decomposed
_MARK_OF = {v: k for k, v in TONE_MARKS.items()}


def _mark_syllable(base: str, tone: str) -> str:
    """A numbered syllable (decomposed letters, e.g. "lu\\u0308" + "3") written with its tone mark."""
    if tone not in _MARK_OF or not base:
        return base                                   # 5 / 0: the neutral tone has no mark
    vowels = [i for i, ch in enumerate(base) if ch in "aeiou"]
    if "a" in base:
        pos = base.index("a")
    elif "e" in base:
        pos = base.index("e")
    elif "ou" in base:
        pos = base.index("o")
    elif vowels:
        pos = vowels[-1]
    else:
        pos = 0                                       # ḿ, ń, ňg: the mark sits on the consonant
    end = pos + 1
    if base[end:end + 1] == "\u0308":                 # ü: the tone mark goes after the diaeresis
        end += 1
    return base[:end] + _MARK_OF[tone] + base[end:]


def _pieces(text: str) -> list[str]:
    """The normalized text (decomposed, NFD) as the pieces between separators: letter runs (a numbered
    syllable closed and marked by its digit) and stray digits."""
    s = unicodedata.normalize("NFKC", text or "").lower().replace("u:", "ü").replace("v", "ü")
    s = unicodedata.normalize("NFD", s)
    out: list[str] = []
    run = ""
    for ch in s:
        cat = unicodedata.category(ch)
        if cat.startswith("L") or (cat == "Mn" and run):
            run += ch
        elif ch in "012345" and run:                  # a tone number closes a numbered syllable
            out.append(_mark_syllable(run, ch))
            run = ""
        else:                                         # a separator; a digit that closes nothing is content
            if run:
                out.append(run)
                run = ""
            if ch.isdigit():
                out.append(ch)
    if run:
        out.append(run)
    return out


def _untoned(s: str) -> str:
    return "".join(ch for ch in s if ch not in TONE_MARKS)


def pinyin_key(text: str, tones: bool = True) -> str:
    """The normalized spelling of a pinyin answer (see above), for exact comparison."""
    key = "".join(_pieces(text))
    return unicodedata.normalize("NFC", key if tones else _untoned(key))


def pinyin_exact(answer: str, reference: str, tones: bool = True) -> bool:
    """The answer spells the reference pinyin (after `pinyin_key` normalization, tones kept or not)."""
    ref = pinyin_key(reference, tones)
    return bool(ref) and pinyin_key(answer, tones) == ref


# ---------------------------------------------------------------- syllables

# Mandarin's syllables without tones (the standard table, interjections included), ü written ü.
SYLLABLES = frozenset("""
a ai an ang ao ba bai ban bang bao bei ben beng bi bian biao bie bin bing bo bu ca cai can cang cao ce cei cen
ceng cha chai chan chang chao che chen cheng chi chong chou chu chua chuai chuan chuang chui chun chuo ci cong
cou cu cuan cui cun cuo da dai dan dang dao de dei den deng di dia dian diao die ding diu dong dou du duan dui
dun duo e ê ei en eng er fa fan fang fei fen feng fo fou fu ga gai gan gang gao ge gei gen geng gong gou gu gua
guai guan guang gui gun guo ha hai han hang hao he hei hen heng hm hng hong hou hu hua huai huan huang hui hun
huo ji jia jian jiang jiao jie jin jing jiong jiu ju juan jue jun ka kai kan kang kao ke kei ken keng kong kou
ku kua kuai kuan kuang kui kun kuo la lai lan lang lao le lei leng li lia lian liang liao lie lin ling liu lo
long lou lu luan lun luo lü lüe m ma mai man mang mao me mei men meng mi mian miao mie min ming miu mo mou mu
n na nai nan nang nao ne nei nen neng ng ni nian niang niao nie nin ning niu nong nou nu nuan nun nuo nü nüe o
ou pa pai pan pang pao pei pen peng pi pian piao pie pin ping po pou pu qi qia qian qiang qiao qie qin qing
qiong qiu qu quan que qun ran rang rao re ren reng ri rong rou ru rua ruan rui run ruo sa sai san sang sao se
sen seng sha shai shan shang shao she shei shen sheng shi shou shu shua shuai shuan shuang shui shun shuo si
song sou su suan sui sun suo ta tai tan tang tao te teng ti tian tiao tie ting tong tou tu tuan tui tun tuo wa
wai wan wang wei wen weng wo wu xi xia xian xiang xiao xie xin xing xiong xiu xu xuan xue xun ya yan yang yao
ye yi yin ying yo yong you yu yuan yue yun za zai zan zang zao ze zei zen zeng zha zhai zhan zhang zhao zhe
zhei zhen zheng zhi zhong zhou zhu zhua zhuai zhuan zhuang zhui zhun zhuo zi zong zou zu zuan zui zun zuo
""".split())
_LONGEST = max(map(len, SYLLABLES))


def _segment(letters: list[str]) -> list[str] | None:
    """Cut a run of pinyin letters (each a base letter with its marks, NFD) into syllables of SYLLABLES, or
    None when it cannot be. Each syllable carries at most one tone mark (so "xīān" is xī + ān, never xian);
    among the cuts left, the one with the fewest syllables that begin with a vowel after another wins, then
    the fewest syllables: written pinyin puts an apostrophe before such a syllable (xī'ān), so without one
    "fangan" reads fan gan and "xian" one syllable (the standard orthography's rule)."""
    base = [unicodedata.normalize("NFC", _untoned(u)) for u in letters]
    marks = [int(any(ch in TONE_MARKS for ch in u)) for u in letters]
    n = len(letters)
    best: list[tuple | None] = [None] * (n + 1)         # best[i]: (cost, cuts) of letters[:i]
    best[0] = ((0, 0), [])
    for i in range(n):
        if best[i] is None:
            continue
        (vowel_starts, count), cuts = best[i]
        for j in range(i + 1, min(n, i + _LONGEST) + 1):
            if "".join(base[i:j]) not in SYLLABLES or sum(marks[i:j]) > 1:
                continue
            cost = (vowel_starts + int(i > 0 and base[i] in "aoeê"), count + 1)
            if best[j] is None or cost < best[j][0]:
                best[j] = (cost, cuts + [j])
    if best[n] is None:
        return None
    cuts = [0] + best[n][1]
    return ["".join(letters[a:b]) for a, b in zip(cuts, cuts[1:])]


def _letters(run: str) -> list[str]:
    """A decomposed run as letters, each with the combining marks that follow it."""
    out: list[str] = []
    for ch in run:
        if unicodedata.category(ch) == "Mn" and out:
            out[-1] += ch
        else:
            out.append(ch)
    return out


def pinyin_syllables(text: str, tones: bool = True, cut: bool = True) -> list[str]:
    """The syllables of a pinyin answer, normalized as pinyin_key (NFC). Within a piece, each stretch of
    Latin letters is cut into syllables (`_segment`; one that cannot be stays one token, so it counts as
    one wrong syllable; cut=False keeps every stretch whole, as written) and every other letter (a Chinese
    character) is a token of its own; a stray digit is a token. Joined, the tokens are pinyin_key(text, tones)."""
    out: list[str] = []
    for piece in _pieces(text):
        stretch: list[str] = []

        def flush() -> None:
            if stretch:
                out.extend((_segment(stretch) if cut else None) or ["".join(stretch)])
                stretch.clear()
        for u in _letters(piece):
            if "a" <= u[0] <= "z":
                stretch.append(u)
            else:
                flush()
                out.append(u)
        flush()
    return [unicodedata.normalize("NFC", s if tones else _untoned(s)) for s in out]


def pinyin_syllable_acc(answer: str, reference: str, tones: bool = True) -> float | None:
    """The share of syllables right, position by position, tones included: matches / max(len(reference),
    len(answer)), so a missing syllable and an extra one both count against; None for an empty reference.

    An answer that spells the reference (pinyin_exact) scores 1 even where its unseparated run would be cut
    otherwise than the reference's spaces cut it ("fāngàn" is read fān gàn, the reference may say fāng àn):
    the reference's own separators say which reading was meant. Otherwise 1 only for an exact match."""
    # the reference is the dictionary's pinyin, one syllable between two spaces: taken as written, so its few
    # misspelt syllables ("yiě" for yě) stay one syllable each instead of being cut into two
    ref = pinyin_syllables(reference, tones, cut=False)
    if not ref:
        return None
    if pinyin_exact(answer, reference, tones):
        return 1.0
    ans = pinyin_syllables(answer, tones)
    return sum(a == r for a, r in zip(ans, ref)) / max(len(ref), len(ans))
