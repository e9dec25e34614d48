"""Evaluation metrics: character F1, ROUGE-L, eos rate, repetition rate, chaining validity."""
import functools

import pytest
from hypothesis import given, settings, strategies as st

from zero_chatgpt import evaluate as ev


def test_units_mix_cjk_chars_and_words():
    assert ev.units("一见倾心，yī jiàn！ABC 12") == ["一", "见", "倾", "心", "yī", "jiàn", "abc", "12"]
    assert ev.units("你好，世界。", keep_punct=True) == ["你", "好", ",", "世", "界", "。"]   # NFKC folds the full-width comma
    assert ev.units("ＡＢ１") == ["ab1"]                      # full-width folded by NFKC


def test_char_f1_known_values():
    assert ev.char_f1("比喻有所依托", "比喻有所依托。") == 1.0
    # pred 4 units, ref 2 units, overlap 2: P = .5, R = 1, F1 = 2/3
    assert ev.char_f1("比喻事情", "比喻") == pytest.approx(2 / 3)
    assert ev.char_f1("完全无关", "比喻") == 0.0
    assert ev.char_f1("", "比喻") == 0.0 and ev.char_f1("", "") == 1.0
    # bag of units: repeats count only as often as in the reference
    assert ev.char_f1("好好好好", "好") == pytest.approx(2 * 0.25 * 1 / 1.25)
    # pinyin is scored by syllables
    assert ev.char_f1("yī jiàn qīng xīn", "yī jiàn qīng xīn") == 1.0
    assert ev.char_f1("yī jiàn", "yī jiàn qīng xīn") == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_rouge_l_known_values():
    assert ev.rouge_l("甲乙丙丁", "甲乙丙丁") == 1.0
    # LCS("甲丙乙丁", "甲乙丙丁") = 3 → P = R = 3/4
    assert ev.rouge_l("甲丙乙丁", "甲乙丙丁") == pytest.approx(0.75)
    # order matters for ROUGE-L, not for char F1
    assert ev.rouge_l("丁丙乙甲", "甲乙丙丁") == pytest.approx(0.25)
    assert ev.char_f1("丁丙乙甲", "甲乙丙丁") == 1.0


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
    assert ev._lcs(list(a), list(b)) == _lcs_naive(a, b)
    f = ev.rouge_l(a, b)
    assert 0.0 <= f <= 1.0 and f == pytest.approx(ev.rouge_l(b, a))


def test_eos_rate():
    assert ev.eos_rate(["stop", "stop", "length", "stop"]) == 0.75
    assert ev.eos_rate([]) == 0.0


def test_repetition_rate():
    assert ev.is_repetitive("我喜欢你我喜欢你我喜欢你")          # one 4-gram three times
    assert not ev.is_repetitive("我喜欢你我喜欢你")              # twice is not enough
    assert ev.is_repetitive("哈哈哈哈哈哈")                     # overlapping occurrences count
    assert not ev.is_repetitive("比喻有所依托，事情就好办。")
    assert ev.repetition_rate(["啊啊啊啊啊啊", "正常的回答。", "正常", "好的。"]) == 0.25


def test_chain_valid():
    idioms = {"心花怒放", "放虎归山", "一见倾心"}
    assert ev.chain_valid("放虎归山。", "放", idioms, asked="心花怒放")
    assert not ev.chain_valid("放虎归林", "放", idioms)            # not an idiom
    assert not ev.chain_valid("一见倾心", "放", idioms)            # wrong first character
    assert not ev.chain_valid("心花怒放", "心", idioms, asked="心花怒放")   # repeating the question
