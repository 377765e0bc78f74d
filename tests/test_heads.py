"""Keyword heads: the passage's most telling words before the teacher's sentence, their parser, and the
teach stage writing them without asking the teacher again."""

import pyarrow.parquet as pq
import pytest

from chat_server import ChatServer, canned
from nla_universal.heads import idf, keywords, split_head, with_head
from nla_universal.pipeline.evaluate import head_hits
from nla_universal.teacher import teach
from test_teacher import openai_cfg, passages_file


def test_keywords_are_the_passages_most_telling_words():
    train = ["the json module reads json text", "the pickle module writes bytes", "the socket module opens sockets"]
    weights = idf(train)
    assert keywords("the json module reads json text", weights, 2) == ["json", "reads"]
    assert "the" not in keywords("the the the json", weights, 1) and keywords("", weights, 3) == []


def test_the_head_round_trips_through_its_parser():
    z = with_head("The passage explains pickling.", ["pickle", "protocol"])
    assert z == "Keywords: pickle, protocol. The passage explains pickling."
    assert split_head(z) == (["pickle", "protocol"], "The passage explains pickling.")
    assert split_head("The passage explains pickling.") == ([], "The passage explains pickling.")


def test_head_hits_score_own_passages_above_others():
    texts = ["rivers and their deltas", "violins and their makers", "glaciers and ice"]
    own = [with_head("x", ["deltas"]), with_head("x", ["violins"]), with_head("x", ["glaciers"])]
    hits = head_hits(own, texts)
    assert hits == {"own": 1.0, "other": 0.0}


def test_teach_writes_heads_under_their_own_id_and_reuses_the_replies(tmp_path, monkeypatch):
    monkeypatch.setenv("NLA_TEST_KEY", "k")
    path = passages_file(tmp_path)
    with ChatServer(canned()) as server:
        plain = teach(path, openai_cfg(server), cache_dir=tmp_path / "cache")
        asked = server.requests
        headed = teach(path, openai_cfg(server, head="keywords", head_words=2, replace=True), cache_dir=tmp_path / "cache")
        assert server.requests == asked, "a head changes the z, not the teacher's replies"
    rows = pq.read_table(path)
    zs, teachers = rows.column("z").to_pylist(), rows.column("teacher").to_pylist()
    assert headed.teacher == plain.teacher + "+head-keywords2" and set(teachers) == {headed.teacher}
    text = rows.column("text").to_pylist()[0]
    words, rest = split_head(zs[0])
    assert len(words) == 2 and all(w in text.lower() for w in words) and rest.startswith("A passage that opens with")
    with pytest.raises(Exception, match="mixing teachers"):
        teach(path, openai_cfg(server), cache_dir=tmp_path / "cache")
