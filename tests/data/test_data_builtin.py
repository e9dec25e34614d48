"""The built-in corpus: People's Daily articles, reviews with polarity, idiom paragraphs."""
import itertools

from zero_chatgpt.data.builtin import _balance_quotes, idiom_paragraph, iter_builtin_documents, iter_idiom_documents, iter_peoples_daily, iter_reviews, untag


def test_untag():
    assert untag("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w  １９９８年/t") == "迈向充满希望的新世纪——１９９８年"
    assert untag("Ｅｘｃｅｌ/nx  Ｗｏｒｄ/nx  软件/n") == "Ｅｘｃｅｌ Ｗｏｒｄ软件"
    assert untag("") == ""


def test_peoples_daily_articles(tmp_path):
    p = tmp_path / "199801.txt"
    p.write_text("\n".join([
        "北京/ns  举行/v  新年/t  音乐会/n",                                   # title
        "江/nr  泽民/nr  等/u  出席/v  （/w  附/v  图片/n  １/m  张/q  ）/w",   # sub-title with a picture note
        "今晚/t  的/u  长安街/ns  流光溢彩/l  。/w  （/w  新华社/nt  记者/n  樊/nr  如钧/nr  摄/Vg  ）/w",
        "音乐会/n  在/p  雄壮/a  的/u  管弦乐/n  中/f  拉开/v  帷幕/n  。/w",
        "",
        "李/nr  鹏/nr  在/p  北京/ns  考察/v  企业/n",                         # the next article
        "上午/t  九时/t  ，/w  李/nr  鹏/nr  来到/v  发电/vn  总厂/n  。/w",
    ]) + "\n", encoding="utf-8")
    docs = list(iter_peoples_daily(p))
    assert [d["text"] for d in docs] == [
        "北京举行新年音乐会\n江泽民等出席（附图片１张）\n今晚的长安街流光溢彩。\n音乐会在雄壮的管弦乐中拉开帷幕。",
        "李鹏在北京考察企业\n上午九时，李鹏来到发电总厂。"]
    assert docs[0]["where"] == "199801.txt:1" and docs[1]["where"] == "199801.txt:6"
    assert docs[0]["meta"]["title"] == "北京举行新年音乐会" and docs[0]["source"] == "peoples-daily"
    # the real file: ~1.86M characters in ~3,000 articles, no tags left
    real = list(iter_peoples_daily())
    assert 2500 < len(real) < 3500 and 1_800_000 < sum(len(d["text"]) for d in real) < 1_900_000
    assert not any("/v" in d["text"] or "摄）" in d["text"] for d in real)


def test_reviews_keep_polarity():
    first = list(itertools.islice(iter_reviews(), 3))
    assert all(d["meta"]["polarity"] == "pos" and d["source"] == "reviews" for d in first)
    assert first[0]["where"] == "pos.txt:1"
    neg = next(d for d in iter_reviews() if d["meta"]["polarity"] == "neg")
    assert neg["where"].startswith("neg.txt:")


def test_idiom_paragraphs():
    assert _balance_quotes("语出《法华经·法师功德品》下至阿鼻地狱。”", derivation=True) == \
        "语出《法华经·法师功德品》：“下至阿鼻地狱。”"
    assert _balance_quotes("宋·范成大《次韵代答刘文潜》诗一曲红窗声里怨，如今分作两愁城。”", derivation=True) == \
        "宋·范成大《次韵代答刘文潜》诗：“一曲红窗声里怨，如今分作两愁城。”"
    assert _balance_quotes("意译为无间”，即痛苦无有间断之意。") == "意译为无间，即痛苦无有间断之意。"
    text = idiom_paragraph({"word": "一见倾心", "pinyin": "yī jiàn qīng xīn", "explanation": "倾心爱慕。",
                            "derivation": "无", "example": "袁小姐对于我们的太太是～。"})
    assert text == "一见倾心（yī jiàn qīng xīn）是一个汉语成语。释义：倾心爱慕。例句：袁小姐对于我们的太太是一见倾心。"
    docs = list(iter_idiom_documents())
    assert len(docs) > 30_000
    assert docs[0]["meta"]["word"] == "阿鼻地狱" and set(docs[0]["meta"]) >= {"pinyin", "explanation", "derivation"}
    assert sum(d["text"].count("“") == d["text"].count("”") for d in docs) > 0.97 * len(docs)


def test_builtin_parts():
    sources = {d["source"] for d in itertools.islice(iter_builtin_documents(("reviews", "idioms")), 0, None, 500)}
    assert sources == {"reviews", "idioms"}
