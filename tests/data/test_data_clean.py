"""Normalization, each filter at its threshold, PII masking."""
import dataclasses
import random
import re
import unicodedata
from collections import Counter

import pytest

from zero_chatgpt.core.settings import DataSection
from zero_chatgpt.data.clean import Cleaner, codepoints, count_cjk, mask_pii, nfkc_keep_punct, ngram_stats, normalize

NEWS = ("新华社北京１月２日电　国家统计局今天发布的数据显示，去年全国粮食总产量再创新高，"
        "比上年增长百分之二点五。专家认为，这与科技进步和农田水利建设密切相关。")


def test_normalize():
    assert normalize("１２月３１日，江泽民发表讲话！（附图片１张）") == "12月31日，江泽民发表讲话！（附图片1张）"
    assert normalize("黄河[1]是中国第二长河[2-3]。。。真的吗？？") == "黄河是中国第二长河。真的吗？"
    assert normalize("  第一行  有　空格 \n\n\n  第二行\r\n") == "第一行 有 空格\n第二行"
    assert normalize("１２．５％……①ﬁ") == "12.5%……1fi"


def test_nfkc_keep_punct_matches_nfkc_elsewhere():
    rng = random.Random(0)
    pool = [chr(c) for c in [*range(0x20, 0x250), *range(0x2000, 0x2500), *range(0x3000, 0x3020),
                             *range(0xFF01, 0xFFEF), *range(0x4E00, 0x4E20), 0x301, 0x308]]
    kept = set("！，：；？（）～…")
    for _ in range(2000):
        s = "".join(rng.choice(pool) for _ in range(rng.randrange(1, 40)))
        # NFKC of the pieces between the kept marks, the marks themselves unchanged
        pieces = re.split("([！，：；？（）～…])", s)
        expected = "".join(p if p in kept else unicodedata.normalize("NFKC", p) for p in pieces)
        assert nfkc_keep_punct(s) == expected, repr(s)
        if not kept & set(s):
            assert nfkc_keep_punct(s) == unicodedata.normalize("NFKC", s), repr(s)


def test_t2s():
    c = Cleaner(DataSection(t2s=True))
    assert c.normalize("漢字簡體轉換") == "汉字简体转换"


def _naive(text, tops, dups):
    L = len(text)
    top = {n: min(1.0, Counter(text[i:i + n] for i in range(L - n + 1)).most_common(1)[0][1] * n / L)
           for n in tops}
    dup = {}
    for n in dups:
        seen, cov = set(), [False] * L
        for i in range(L - n + 1):
            g = text[i:i + n]
            if g in seen:
                cov[i:i + n] = [True] * n
            seen.add(g)
        dup[n] = sum(cov) / L
    return top, dup


def test_ngram_stats_equal_the_plain_definition():
    rng = random.Random(1)
    for _ in range(300):
        alphabet = "的一是在不了有和人这中大为上个国我以要他"[: rng.randrange(2, 20)]
        t = "".join(rng.choice(alphabet) for _ in range(rng.randrange(14, 400)))
        got = ngram_stats(codepoints(t), (2, 3, 4), (5, 7, 10, 13))
        want = _naive(t, (2, 3, 4), (5, 7, 10, 13))
        for g, w in zip(got, want):
            assert g == pytest.approx(w, abs=1e-12)
    assert count_cjk(codepoints("汉字abc𠀀㐀，")) == 4


def _boundary(field, value, text, reason, below, above):
    """Kept when the threshold sits exactly at the document's value, dropped just past it."""
    keep = Cleaner(DataSection(**{field: value, **above}))
    drop = Cleaner(DataSection(**{field: value, **below}))
    assert keep.check(text) is None, (field, keep.cfg)
    assert drop.check(text) == reason, (field, drop.cfg)


def test_length_and_cjk_filters_at_their_thresholds():
    t = "春天来了河边的柳树发芽小草从地下钻出来孩子们在田野里放风筝啦"  # 30 CJK chars
    assert len(t) == 30
    c = DataSection()
    assert Cleaner(c).check(t) is None
    assert Cleaner(dataclasses.replace(c, min_chars=31)).check(t) == "too_short"
    assert Cleaner(dataclasses.replace(c, min_chars=10, min_cjk_chars=31)).check(t) == "few_cjk"
    mixed = "中文" * 15 + "abcdefghij" * 7  # 30 CJK of 100 characters
    base = dict(min_chars=10, min_cjk_chars=10, top_ngram_n=(), top_ngram_max=(), dup_ngram_n=(), dup_ngram_max=())
    assert Cleaner(DataSection(min_cjk_ratio=0.30, **base)).check(mixed) is None
    assert Cleaner(DataSection(min_cjk_ratio=0.31, **base)).check(mixed) == "cjk_ratio"


def test_line_filters_at_their_thresholds():
    base = dict(min_chars=1, min_cjk_chars=1, top_ngram_n=(), top_ngram_max=(), dup_ngram_n=(), dup_ngram_max=())
    lines = ["第一行结束了。", "第二行没有", "第三行也没有", "第四行结束了！"]  # 2 of 4 end in punctuation
    text = "\n".join(lines)
    assert Cleaner(DataSection(min_line_punct_ratio=0.5, **base)).check(text) is None
    assert Cleaner(DataSection(min_line_punct_ratio=0.51, **base)).check(text) == "line_punct"
    dup = "\n".join(["同一行。", "同一行。", "另一行。", "第四行。"])  # 1 of 4 lines repeats
    assert Cleaner(DataSection(max_dup_line_frac=0.25, **base)).check(dup) is None
    assert Cleaner(DataSection(max_dup_line_frac=0.24, **base)).check(dup) == "dup_lines"


def test_repetition_filters_at_their_thresholds():
    spam = NEWS + "欢迎光临本店" * 8
    top, dup = ngram_stats(codepoints(spam), (2, 3, 4), (5, 10))
    off = dict(min_chars=1, min_cjk_chars=1)
    for n in (2, 3, 4):
        v = top[n]
        cfg = dict(off, dup_ngram_n=(), dup_ngram_max=(), top_ngram_n=(n,))
        assert Cleaner(DataSection(top_ngram_max=(v,), **cfg)).check(spam) is None
        assert Cleaner(DataSection(top_ngram_max=(v - 1e-9,), **cfg)).check(spam) == "top_ngram"
    for n in (5, 10):
        v = dup[n]
        assert v > 0.2
        cfg = dict(off, top_ngram_n=(), top_ngram_max=(), dup_ngram_n=(n,))
        assert Cleaner(DataSection(dup_ngram_max=(v,), **cfg)).check(spam) is None
        assert Cleaner(DataSection(dup_ngram_max=(v - 1e-9,), **cfg)).check(spam) == "dup_ngram"
    # the defaults keep real news and drop the spam
    assert Cleaner(DataSection()).check(normalize(NEWS)) is None
    assert Cleaner(DataSection()).check(spam * 2) in ("top_ngram", "dup_ngram")


def test_baike_section_titles():
    c = Cleaner(DataSection())
    text = normalize(NEWS)
    assert c.check(text, {"section_titles": ["早年经历", "个人简介"]}) == "baike_section"
    assert c.check(text, {"section_titles": ["重要参数表"]}) == "baike_section"
    assert c.check(text, {"section_titles": ["历史", "地理"]}) is None
    assert Cleaner(DataSection(drop_section_titles=())).check(text, {"section_titles": ["个人简介"]}) is None


def test_pii_masking():
    counts = Counter()
    s = ("联系人邮箱zhang.san@example.com.cn，手机13812345678或+86 139-1234-5678，座机010-62751234，"
         "身份证11010519491231002X，QQ：123456789，扣扣号 98765。1998年1月1日，订单号2023，共3000元。")
    out = mask_pii(s, counts)
    assert out == ("联系人邮箱<EMAIL>，手机<PHONE>或<PHONE>，座机<PHONE>，身份证<ID>，QQ：<QQ>，扣扣号 <QQ>。"
                   "1998年1月1日，订单号2023，共3000元。")
    assert counts == {"email": 1, "phone": 3, "id_card": 1, "qq": 2}
    # numbers that are not PII stay: years, prices, a 12-digit number
    assert mask_pii("人口为1234567人，编号123456789012。") == "人口为1234567人，编号123456789012。"


def test_clean_record_masks_only_kept_text():
    c = Cleaner(DataSection())
    text, reason = c.clean({"text": NEWS + "详情请致电13812345678。", "meta": {}})
    assert reason is None and "<PHONE>" in text and "1月2日" in text
    text, reason = c.clean({"text": "太短", "meta": {}})
    assert text is None and reason == "too_short"
