"""Evaluation metrics: character F1, ROUGE-L, eos rate, repetition rate, chaining validity."""
import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zero_chatgpt.eval import metrics, pinyin, prompts


def test_units_mix_cjk_chars_and_words():
    assert metrics.units("一见倾心，yī jiàn！ABC 12") == ["一", "见", "倾", "心", "yī", "jiàn", "abc", "12"]
    assert metrics.units("你好，世界。", keep_punct=True) == ["你", "好", ",", "世", "界", "。"]   # NFKC folds the full-width comma
    assert metrics.units("ＡＢ１") == ["ab1"]                      # full-width folded by NFKC


def test_char_f1_known_values():
    assert metrics.char_f1("比喻有所依托", "比喻有所依托。") == 1.0
    # pred 4 units, ref 2 units, overlap 2: P = .5, R = 1, F1 = 2/3
    assert metrics.char_f1("比喻事情", "比喻") == pytest.approx(2 / 3)
    assert metrics.char_f1("完全无关", "比喻") == 0.0
    assert metrics.char_f1("", "比喻") == 0.0 and metrics.char_f1("", "") == 1.0
    # bag of units: repeats count only as often as in the reference
    assert metrics.char_f1("好好好好", "好") == pytest.approx(2 * 0.25 * 1 / 1.25)
    # pinyin is scored by syllables
    assert metrics.char_f1("yī jiàn qīng xīn", "yī jiàn qīng xīn") == 1.0
    assert metrics.char_f1("yī jiàn", "yī jiàn qīng xīn") == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_rouge_l_known_values():
    assert metrics.rouge_l("甲乙丙丁", "甲乙丙丁") == 1.0
    # LCS("甲丙乙丁", "甲乙丙丁") = 3 → P = R = 3/4
    assert metrics.rouge_l("甲丙乙丁", "甲乙丙丁") == pytest.approx(0.75)
    # order matters for ROUGE-L, not for char F1
    assert metrics.rouge_l("丁丙乙甲", "甲乙丙丁") == pytest.approx(0.25)
    assert metrics.char_f1("丁丙乙甲", "甲乙丙丁") == 1.0


@functools.lru_cache(maxsize=None)
def _lcs_naive(a: str, b: str) -> int:
    if not a or not b:
        return 0
    if a[0] == b[0]:
        return 1 + _lcs_naive(a[1:], b[1:])
    return max(_lcs_naive(a[1:], b), _lcs_naive(a, b[1:]))


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="甲乙丙丁戊", max_size=9), st.text(alphabet="甲乙丙丁戊", max_size=9))
def test_lcs_matches_naive_recursion(a, b):
    assert metrics._lcs(list(a), list(b)) == _lcs_naive(a, b)
    f = metrics.rouge_l(a, b)
    assert 0.0 <= f <= 1.0 and f == pytest.approx(metrics.rouge_l(b, a))


def test_eos_rate():
    assert metrics.eos_rate(["stop", "stop", "length", "stop"]) == 0.75
    assert metrics.eos_rate([]) == 0.0


def test_repetition_rate():
    assert metrics.is_repetitive("我喜欢你我喜欢你我喜欢你")          # one 4-gram three times
    assert not metrics.is_repetitive("我喜欢你我喜欢你")              # twice is not enough
    assert metrics.is_repetitive("哈哈哈哈哈哈")                     # overlapping occurrences count
    assert not metrics.is_repetitive("比喻有所依托，事情就好办。")
    assert metrics.repetition_rate(["啊啊啊啊啊啊", "正常的回答。", "正常", "好的。"]) == 0.25


def test_chain_valid():
    idioms = {"心花怒放", "放虎归山", "一见倾心"}
    assert metrics.chain_valid("放虎归山。", "放", idioms, asked="心花怒放")
    assert not metrics.chain_valid("放虎归林", "放", idioms)            # not an idiom
    assert not metrics.chain_valid("一见倾心", "放", idioms)            # wrong first character
    assert not metrics.chain_valid("心花怒放", "心", idioms, asked="心花怒放")   # repeating the question


# ---------------------------------------------------------------- pinyin, refusals, paired differences, the split

_TONE_DIGIT = {"\u0304": "1", "\u0301": "2", "\u030c": "3", "\u0300": "4"}


def _numbered(spelled: str, v_for_u: bool = False) -> str:
    """'lǚ xíng' -> 'lu:3 xing2' (or 'lv3 xing2'): the tone as a digit after each syllable, written independently
    of eval/pinyin.py's placement rule."""
    import unicodedata
    out = []
    for syl in spelled.split():
        d = unicodedata.normalize("NFD", syl)
        tone = next((_TONE_DIGIT[c] for c in d if c in _TONE_DIGIT), "5")
        base = unicodedata.normalize("NFC", "".join(c for c in d if c not in _TONE_DIGIT))
        out.append(base.replace("ü", "v" if v_for_u else "u:") + tone)
    return " ".join(out)


def _toneless(spelled: str) -> str:
    import unicodedata
    d = unicodedata.normalize("NFD", spelled)
    return unicodedata.normalize("NFC", "".join(c for c in d if c not in _TONE_DIGIT))


@pytest.fixture(scope="module")
def dictionary():
    from zero_chatgpt.data.builtin import load_idioms
    return load_idioms()


def test_pinyin_exact_on_dictionary_pinyin(dictionary):
    with_u = [d for d in dictionary if "ü" in _toneless(d["pinyin"])]      # ü with and without tone marks
    sample = dictionary[::40] + with_u
    assert len(with_u) > 300 and any("ǚ" in d["pinyin"] or "ǜ" in d["pinyin"] for d in with_u)
    for d in sample:
        py = d["pinyin"]
        assert metrics.pinyin_exact(py, py)
        # tone numbers (ü as u: or v), separators, case and full width do not matter
        assert metrics.pinyin_exact(_numbered(py), py), (py, _numbered(py))
        assert metrics.pinyin_exact(_numbered(py, v_for_u=True), py), py
        assert metrics.pinyin_exact(py.replace(" ", ""), py) and metrics.pinyin_exact(" - ".join(py.split()) + "。", py)
        assert metrics.pinyin_exact(py.upper(), py)
        # without tone marks: only the toneless comparison holds (when there was a tone to lose)
        bare = _toneless(py)
        assert metrics.pinyin_exact(bare, py, tones=False)
        assert metrics.pinyin_exact(bare, py) == (bare == py)
        # words around the pinyin, or another idiom's pinyin, are not a match
        assert not metrics.pinyin_exact(f"{d['word']}的拼音是{py}", py)
    lv = next(d for d in with_u if "ǚ" in d["pinyin"])["pinyin"]
    assert metrics.pinyin_exact(lv.replace("ǚ", "v3"), lv) and metrics.pinyin_exact(lv.replace("ǚ", "u:3"), lv)
    assert metrics.pinyin_exact(lv.replace("ǚ", "ǔ"), lv, tones=False) is False     # ü is not u, tones or not
    assert pinyin.pinyin_key("yī jiàn qīng xīn") == pinyin.pinyin_key("yi1jian4 qing1 xin1") == "yījiànqīngxīn"
    assert pinyin.pinyin_key("lüè", tones=False) == pinyin.pinyin_key("lve4", tones=False) == "lüe"
    assert pinyin.pinyin_key("lve4") == pinyin.pinyin_key("lüè")                        # the mark goes on the e
    assert pinyin.pinyin_key("guì liù lǒu") == pinyin.pinyin_key("gui4 liu4 lou3")      # ui -> i, iu -> u, ou -> o
    assert not metrics.pinyin_exact("yí jiàn qīng xīn", "yī jiàn qīng xīn")          # one tone off
    assert metrics.pinyin_exact("yí jiàn qīng xīn", "yī jiàn qīng xīn", tones=False)
    assert not metrics.pinyin_exact("", "yī") and not metrics.pinyin_exact("yī", "")


REFUSALS = ["抱歉，我无法回答这个问题。", "对不起，我不知道这个成语。", "我不知道。", "不知道", "很抱歉，这超出了我的知识范围。",
            "作为一个AI语言模型，我无法提供这方面的信息。", "作为人工智能，我没有个人观点。", "我无法回答你的问题。",
            "这个问题我不清楚。", "我不太确定这个成语的出处。", "不好意思，我回答不了。", "“抱歉，我不能提供帮助。”",
            "我没有办法回答这个问题", "我是一个语言模型，不能回答这个问题。"]
ANSWERS = ["“百思不解”的意思是：百般思索也无法理解。", "我不能见利忘义，卖友求荣，变成利禄之小人！", "出自《论语·学而》。",
           "ā bí dì yù", "心花怒放", "他对此一无所知，不知所云。", "我是Zero-ChatGPT，一个从零开始训练的小型中文语言模型。",
           "“不知所云”的意思是：不知道说得是些什么。形容说话内容混乱，无法理解。", "对症下药", "你好！想了解哪个成语？"]


def test_refusal_detection(dictionary):
    from zero_chatgpt.data import chat_data
    for t in REFUSALS:
        assert metrics.is_refusal(t), t
    for t in ANSWERS:
        assert not metrics.is_refusal(t), t
    # no reference answer of the dictionary (first-person example sentences included) reads as a refusal
    refs = [chat_data.answer_text(k, d["word"], a) for d in dictionary[::7]
            for k, a in chat_data.idiom_answers(d).items()]
    assert len(refs) > 10000 and not [t for t in refs if metrics.is_refusal(t)]
    ident = [a for _, _, ans in chat_data.IDENTITY for a in ans]
    assert not [t for t in ident if metrics.is_refusal(t)]


def test_paired_bootstrap_interval():
    import numpy as np
    rng = np.random.default_rng(7)
    x = rng.normal(0.5, 0.2, 800)
    same = x + rng.normal(0.0, 0.05, 800) - 0.0          # no true difference
    same -= same.mean() - x.mean()                        # exactly none, in this sample
    d0 = metrics.paired_bootstrap(same, x, 2000, seed=3)
    assert d0["n"] == 800 and abs(d0["diff"]) < 1e-12 and d0["ci95"][0] < 0 < d0["ci95"][1]
    shifted = x + 0.02 + rng.normal(0.0, 0.05, 800)       # a clear shift: 0.02 against a 0.002 standard error
    d1 = metrics.paired_bootstrap(shifted, x, 2000, seed=3)
    assert 0 < d1["ci95"][0] < d1["diff"] < d1["ci95"][1] and d1["ci95"][0] > 0.01
    assert metrics.paired_bootstrap(shifted, x, 2000, seed=3) == d1            # the same seed, the same interval
    assert metrics.paired_bootstrap(shifted, x, 2000, seed=4)["ci95"] != d1["ci95"]
    # binary metrics: all pairs equal gives [0, 0]; no pairs gives None; 0 resamples gives no interval
    assert metrics.paired_bootstrap([1, 0, 1], [1, 0, 1], 500, seed=0)["ci95"] == [0.0, 0.0]
    assert metrics.paired_bootstrap([], [], 500, seed=0) is None
    assert "ci95" not in metrics.paired_bootstrap([1.0], [0.0], 0, seed=0)
    assert metrics.format_diff({"diff": 0.0123, "ci95": [-0.004, 0.027]}) == "+0.012 [\u22120.004, +0.027]"
    assert metrics.format_diff({"diff": 0.03, "ci95": [0.01, 0.05]}).endswith(" *")
    assert metrics.format_diff({"diff": 12.34, "ci95": [10.0, 14.5]}) == "+12.3 [+10.0, +14.5] *"


def test_gold_and_test_parts_are_disjoint_by_idiom_and_stable(dictionary):
    from zero_chatgpt.data import chat_data
    recs = chat_data.build_builtin(dictionary[:4000], seed=1).splits["eval"]
    gold, test = prompts.split_eval(recs, 0.2)
    g_idioms, t_idioms = {r["meta"]["idiom"] for r in gold}, {r["meta"]["idiom"] for r in test}
    assert not g_idioms & t_idioms and len(gold) + len(test) == len(recs)
    assert 0.12 < len(g_idioms) / len(g_idioms | t_idioms) < 0.28
    # stable: the order of the records, the seed of the data and other records do not move an idiom
    assert prompts.split_eval(recs[::-1], 0.2)[0] == gold[::-1]
    other = chat_data.build_builtin(dictionary[:4000], seed=2).splits["eval"]
    assert all(prompts.is_gold(r, 0.2) == (r["meta"]["idiom"] in g_idioms)
               for r in other if r["meta"]["idiom"] in g_idioms | t_idioms)
    # a larger gold part contains the smaller one; 0 keeps none back
    assert {r["meta"]["idiom"] for r in prompts.split_eval(recs, 0.1)[0]} <= g_idioms
    assert prompts.split_eval(recs, 0.0)[0] == []
    # records without an idiom (--source data) are split by their question
    chat = [{"messages": [{"role": "user", "content": f"问题{i}"}], "reference": "答", "meta": {"kind": "chat"}}
            for i in range(400)]
    g, t = prompts.split_eval(chat, 0.2)
    assert 40 < len(g) < 120 and prompts.split_eval(chat, 0.2) == (g, t)


# ---------------------------------------------------------------- syllable accuracy, restating the idiom

def test_pinyin_syllable_acc_known_values():
    ref = "yī jiàn qīng xīn"
    assert metrics.pinyin_syllable_acc(ref, ref) == 1.0
    assert metrics.pinyin_syllable_acc("yí jiàn qīng xīn", ref) == 0.75             # one tone off: one syllable wrong
    assert metrics.pinyin_syllable_acc("yí jiàn qīng xīn", ref, tones=False) == 1.0
    assert metrics.pinyin_syllable_acc("yī jiàn", ref) == 0.5                       # the missing ones count wrong
    assert metrics.pinyin_syllable_acc("yī jiàn qīng xīn xīn", ref) == 0.8          # an extra one counts against
    assert metrics.pinyin_syllable_acc("jiàn qīng xīn", ref) == 0.0                 # position by position: shifted
    assert metrics.pinyin_syllable_acc("", ref) == 0.0 and metrics.pinyin_syllable_acc("yī", "") is None
    # spellings pinyin_exact accepts are whole answers here too: numbered, unseparated, full width, upper case
    for a in ("yi1 jian4 qing1 xin1", "yījiànqīngxīn", "yi1jian4qing1xin1", "ＹĪ JIÀN QĪNG XĪN"):
        assert metrics.pinyin_syllable_acc(a, ref) == 1.0, a
    assert metrics.pinyin_syllable_acc("yijian4qing1xin1", ref) == 0.75             # yi without its tone
    # words around the pinyin shift every syllable: Chinese characters are tokens of their own
    assert pinyin.pinyin_syllables("一见倾心的拼音是yī jiàn") == ["一", "见", "倾", "心", "的", "拼", "音", "是", "yī", "jiàn"]
    assert metrics.pinyin_syllable_acc("拼音：yī jiàn qīng xīn", ref) == 0.0
    # a non-syllable is one wrong token; an unseparated run is cut by tone marks and the apostrophe rule
    assert pinyin.pinyin_syllables("hello nǐ hǎo") == ["hello", "nǐ", "hǎo"]
    assert pinyin.pinyin_syllables("xīān") == ["xī", "ān"] and pinyin.pinyin_syllables("xiān") == ["xiān"]
    assert pinyin.pinyin_syllables("fangan", tones=False) == ["fan", "gan"]
    assert metrics.pinyin_syllable_acc("fāngàn", "fāng àn") == 1.0                  # spells it: the reference's cut wins
    # 1 exactly where pinyin_exact holds, which ignores separators: fāng'àn spells fān gàn
    assert metrics.pinyin_syllable_acc("fāng'àn", "fān gàn") == 1.0 and metrics.pinyin_exact("fāng'àn", "fān gàn")


def test_pinyin_syllables_on_dictionary_pinyin(dictionary):
    from zero_chatgpt.eval.pinyin import SYLLABLES
    sample = dictionary[::40]
    sylls = [s for d in dictionary for s in pinyin.pinyin_syllables(d["pinyin"], tones=False, cut=False)]
    # the inventory holds the dictionary's syllables but for its few misspellings (boi, jiui, zhng, ...)
    assert sum(s in SYLLABLES for s in sylls) / len(sylls) > 0.999
    same = 0
    for d in sample:
        py = d["pinyin"]
        toks = pinyin.pinyin_syllables(py)
        assert "".join(toks) == pinyin.pinyin_key(py) and len(pinyin.pinyin_syllables(py, cut=False)) == len(py.split())
        # written without spaces, the syllables are found again (tone marks and the apostrophe rule cut them)
        same += pinyin.pinyin_syllables(py.replace(" ", "")) == pinyin.pinyin_syllables(py, cut=False)
        # 1 exactly when pinyin_exact holds; one syllable's tone changed costs exactly that syllable
        assert metrics.pinyin_syllable_acc(_numbered(py), py) == 1.0 == metrics.pinyin_syllable_acc(py.replace(" ", ""), py)
        parts = py.split()
        if _toneless(parts[-1]) != parts[-1]:          # the last syllable said in the neutral tone: one wrong
            off = " ".join(parts[:-1] + [_toneless(parts[-1])])
            assert metrics.pinyin_syllable_acc(off, py) == pytest.approx((len(parts) - 1) / len(parts)), py
            assert not metrics.pinyin_exact(off, py) and metrics.pinyin_syllable_acc(off, py, tones=False) == 1.0
    assert same / len(sample) > 0.98


def test_restates_idiom():
    assert metrics.restates_idiom("“一见倾心”的意思是：一见面就产生了爱慕之情。", "一见倾心")
    assert metrics.restates_idiom("一 见 倾 心，出自……", "一见倾心")                 # spaces between its characters
    assert not metrics.restates_idiom("一见面就产生了爱慕之情。", "一见倾心")         # a bare explanation
    assert not metrics.restates_idiom("“一见钟情”的意思是：……", "一见倾心")           # another idiom
    assert not metrics.restates_idiom("一见倾心", "") and not metrics.restates_idiom("", "一见倾心")


def test_sft_answers_name_their_idiom_first_where_restating_is_scored(dictionary):
    """SFT teaches restating by example: every meaning / origin / example answer it trains on opens with
    the idiom in quotes, so the metric and the data agree; the everyday judge reads each as idiom-shaped."""
    from zero_chatgpt.data import chat_data
    from zero_chatgpt.eval import everyday as ed
    seen = {k: 0 for k in metrics.RESTATE_KINDS}
    for d in dictionary[::11]:
        for kind, ref in chat_data.idiom_answers(d).items():
            text = chat_data.answer_text(kind, d["word"], ref)
            if kind in metrics.RESTATE_KINDS:
                seen[kind] += 1
                assert text.startswith(f"“{d['word']}”") and metrics.restates_idiom(text, d["word"]), (kind, text)
                assert text.endswith(ref) and ed.looks_like_idiom_answer(text), (kind, text)
            else:
                assert text == ref
    assert min(seen.values()) > 200, seen


def test_new_metrics_are_defined_on_their_kinds_only():
    recs = [{"messages": [{"role": "user", "content": "q"}], "reference": ref, "meta": {"kind": k, "idiom": "一见倾心",
                                                                                      "first_char": "心"}}
            for k, ref in (("meaning", "一见面就产生了爱慕之情。"), ("origin", "出自……"), ("example", "他对她一见倾心。"),
                           ("pinyin", "yī jiàn qīng xīn"), ("chain", "心花怒放"))]
    answers = ["“一见倾心”的意思是：一见面就……", "出自……", "他对她一见倾心。", "yí jiàn qīng xīn", "心花怒放"]
    v = metrics.per_prompt_values(recs, answers, [True] * 5, {"心花怒放"}, [3] * 5)
    assert v["restates_idiom"] == [1, 0, 1, None, None]
    assert v["pinyin_syllable_acc"] == [None, None, None, 0.75, None] and v["pinyin_exact"][3] == 0
    agg = metrics.aggregate([r["meta"]["kind"] for r in recs], v)
    assert agg["restates_idiom"] == pytest.approx(2 / 3) and agg["pinyin_syllable_acc"] == 0.75
    assert agg["by_kind"]["origin"]["restates_idiom"] == 0 and "restates_idiom" not in agg["by_kind"]["pinyin"]
