"""The built-in idiom world (data.idioms, data.idiom_texts): the N idioms the built-in news and reviews
mention most, each as up to five texts stating its facts in different contexts; the corpus and the SFT,
RL and eval questions draw on the same world."""
import json
import random

import pytest

from zero_chatgpt.data import builtin
from zero_chatgpt.data.builtin import MentionIndex
from zero_chatgpt.data.chat_data import build_builtin


@pytest.fixture(scope="module")
def texts():
    return [r["text"] for r in [*builtin.iter_peoples_daily(), *builtin.iter_reviews()]]


@pytest.mark.slow
def test_the_world_is_the_idioms_the_news_and_reviews_mention_most(texts):
    world = builtin.idiom_world(200)
    words = [d["word"] for d in world]
    assert len(words) == 200 == len(set(words))
    allw = [d["word"] for d in builtin.load_idioms()]
    assert words == [w for w in allw if w in set(words)], "dictionary order is kept inside the world"
    count = lambda w: sum(w in t for t in texts)           # noqa: E731  (brute force: documents mentioning w)
    inside = min(count(w) for w in words)
    outside = random.Random(0).sample([w for w in allw if w not in set(words)], 300)
    assert inside >= 1 and all(count(w) <= inside for w in outside)
    assert {"爱不释手", "实事求是", "一如既往"} <= set(words)   # among the most used in this corpus
    assert builtin.idiom_world(0) == builtin.load_idioms()


def test_find_all_lists_each_mention_once_in_order():
    idx = MentionIndex(["画蛇添足", "添足", "一心一意"])
    assert list(idx.find_all("他画蛇添足，又画蛇添足；一心一意")) == ["画蛇添足", "添足", "一心一意"]
    assert idx.find("没有成语") is None and idx.find("一心一意地") == "一心一意"


def test_an_idiom_as_several_texts_each_stating_its_facts():
    d = next(x for x in builtin.load_idioms() if x["word"] == "画蛇添足")
    one = builtin.idiom_texts(d, 1)
    assert one == [builtin.idiom_paragraph(d)]
    five = builtin.idiom_texts(d, 5)
    assert len(five) == 5 == len(set(five)) and all("画蛇添足" in t for t in five)
    assert sum(d["explanation"][:8] in t for t in five) >= 3, "the meaning is stated in several contexts"
    assert any(d["pinyin"] in t for t in five[1:]) and any("出自" in t for t in five[1:])
    # a missing field gives no text for it
    bare = {**d, "derivation": "无", "example": ""}
    assert len(builtin.idiom_texts(bare, 5)) == 3


def test_sft_questions_come_from_the_same_world():
    world = builtin.idiom_world(300)
    data = build_builtin(world, eval_fraction=0.1, rl_fraction=0.15)
    names = {d["word"] for d in world}
    asked = {r["meta"]["idiom"] for split in data.splits.values() for r in split if "idiom" in r["meta"]}
    assert asked <= names and len(asked) > 250
    docs = list(builtin.iter_idiom_documents(300, 3))
    assert {r["meta"]["word"] for r in docs} == names and len(docs) > 600


def test_extra_idioms_join_sft_train_only_and_leave_the_world_splits_as_they_are():
    from zero_chatgpt.data.chat_data import extra_idioms
    world = builtin.idiom_world(300)
    names = {d["word"] for d in world}
    extra = extra_idioms(world, 400, 1)
    assert len(extra) == 400 and not names & {d["word"] for d in extra}
    assert extra == extra_idioms(world, 400, 1) and extra != extra_idioms(world, 400, 2)     # stable, by seed
    assert len(extra_idioms(world, -1, 1)) == len(builtin.load_idioms()) - 300
    plain = build_builtin(world, seed=1, eval_fraction=0.1, rl_fraction=0.15)
    more = build_builtin(world, seed=1, eval_fraction=0.1, rl_fraction=0.15, extra=extra)
    # eval, RL and val are byte for byte the same: adding extra idioms moves no held-out figure
    for split in ("eval", "rl", "val"):
        assert more.splits[split] == plain.splits[split], split
    asked = lambda d, split: {r["meta"]["idiom"] for r in d.splits[split] if "idiom" in r["meta"]}  # noqa: E731
    new = asked(more, "train") - asked(plain, "train")
    assert new and new <= {d["word"] for d in extra} and len(new) > 350
    # what the world's idioms are trained on is unchanged, only reordered among the extra records
    world_train = lambda d: sorted(json.dumps(r, ensure_ascii=False) for r in d.splits["train"]  # noqa: E731
                                   if r["meta"].get("idiom") in names)
    assert world_train(more) == world_train(plain)
    # the identity dialogues keep their share of the (now larger) train split
    share = lambda d: sum(r["meta"]["kind"] == "identity" for r in d.splits["train"]) / len(d.splits["train"])  # noqa
    assert share(more) >= 0.02 * 0.9 and share(plain) >= 0.02 * 0.9
    # an extra idiom's text that mentions an eval idiom is dropped like any other SFT record
    assert more.dropped["mentions an eval idiom"] >= plain.dropped["mentions an eval idiom"]


def test_the_keys_are_checked(tmp_path):
    from zero_chatgpt.core import config
    from zero_chatgpt.core.errors import UserError
    for bad in ("data.idioms=-1", "data.idiom_texts=0", "data.idiom_texts=6", "sft.extra_idioms=-2"):
        with pytest.raises(UserError, match=bad.split("=")[0]):
            config.resolve(tmp_path / "run", "demo", [bad])
