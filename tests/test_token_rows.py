"""Per-token rows (corpus.unit=token): prefixes that end at a word, their vectors, their extractive teacher."""

import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from nla_universal import activations
from nla_universal.config import CorpusConfig, load_pool
from nla_universal.corpus import SOURCE_ID, build_passages, is_token_table, write_passages
from nla_universal.errors import ConfigError, DataError
from nla_universal.heads import HeadKind, split_head
from nla_universal.models import load_model
from nla_universal.pipeline.extract import ExtractConfig
from nla_universal.pipeline.extract import run as extract
from nla_universal.pipeline.rows import tag_rows
from nla_universal.pipeline.workspace import RunConfig
from nla_universal.teacher import TeacherConfig, teach
from nla_universal.token_rows import context_explanation, token_rows

TINY = [
    {"tag": "tiny-llama", "source": "random", "name": "llama", "layer": 1, "pool": "last"},
    {"tag": "tiny-gpt2", "source": "random", "name": "gpt2", "layer": 1, "pool": "last"},
    {"tag": "tiny-gemma3", "source": "random", "name": "gemma3_text", "layer": 1, "pool": "last"},
]
TOKENS = dict(max_passages=20, max_chars=600, unit="token", tokens_per_passage=3, min_context_words=4)


@pytest.fixture(scope="module")
def passages():
    """The whole passages the token rows are cut from (building the corpus walks the stdlib: once)."""
    return build_passages(CorpusConfig(max_passages=20, max_chars=600))


@pytest.fixture(scope="module")
def token_table():
    return build_passages(CorpusConfig(**TOKENS))


@pytest.fixture(scope="module")
def token_run(tmp_path_factory, token_table) -> Path:
    run = tmp_path_factory.mktemp("tokens")
    write_passages(token_table, run / "passages.parquet")
    (run / "pool.yaml").write_text(yaml.safe_dump({"anchor": "tiny-llama", "models": TINY}))
    extract(ExtractConfig(run=RunConfig(run_dir=str(run), pool=str(run / "pool.yaml")), batch_size=8))
    return run


def test_token_rows_are_prefixes_ending_at_a_word_in_their_passages_split_and_reproducible(passages, token_table):
    rows = token_table
    assert is_token_table(rows) and not is_token_table(passages)
    columns = [passages.column(c).to_pylist() for c in ("passage_id", "text", "split")]
    again = list(token_rows(*columns, TOKENS["tokens_per_passage"], TOKENS["min_context_words"]))
    assert [r[0] for r in again] == rows.column("passage_id").to_pylist()
    source = {p: (t, s) for p, t, s in zip(*(passages.column(c).to_pylist() for c in ("passage_id", "text", "split")))}
    ids = rows.column("passage_id").to_pylist()
    assert len(set(ids)) == len(ids) == 3 * passages.num_rows
    for rid, text, split, src in zip(ids, *(rows.column(c).to_pylist() for c in ("text", "split", SOURCE_ID))):
        full, full_split = source[src]
        assert rid == f"{src}@{len(text)}" and full.startswith(text) and split == full_split
        assert re.search(r"[A-Za-z][A-Za-z0-9_]{2,}$", text) and not re.match(r"[A-Za-z0-9_]", full[len(text):len(text) + 1])
        assert len(re.findall(r"[A-Za-z][A-Za-z0-9_]{2,}", text)) > TOKENS["min_context_words"]


def test_a_token_rows_vector_is_that_tokens_vector_inside_the_whole_passage(token_run, passages):
    """The claim the unit rests on: the prefix's last-token state equals the state of the same token in
    the full passage, for every tokenizer — so rows correspond across models by character offset."""
    table = pq.read_table(token_run / "passages.parquet")
    full = dict(zip(*(passages.column(c).to_pylist() for c in ("passage_id", "text"))))
    for spec in load_pool(token_run / "pool.yaml").models:
        acts = activations.read_activations(token_run / "activations", spec.tag)
        assert acts.passage_ids == table.column("passage_id").to_pylist()
        lm = load_model(spec)
        matched = 0
        for rid, src, row in zip(acts.passage_ids, table.column(SOURCE_ID).to_pylist(), acts.X):
            end = int(rid.split("@")[1])
            enc = lm.tokenizer(full[src], return_tensors="pt", return_offsets_mapping=True)
            ends = enc.pop("offset_mapping")[0, :, 1].tolist()
            if end not in ends:  # a token that runs across the cut in the whole passage (rare)
                continue
            with torch.no_grad():
                hs = lm.model(**enc, output_hidden_states=True).hidden_states[lm.layer + 1][0].float()
            np.testing.assert_allclose(row, hs[ends.index(end)].numpy(), rtol=1e-4, atol=1e-4)
            matched += 1
        assert matched >= 0.8 * len(acts.passage_ids), (spec.tag, matched)


def test_token_rows_need_pool_last_and_may_not_be_truncated(token_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "passages.parquet").write_bytes((token_run / "passages.parquet").read_bytes())
    for entry, problem in ((dict(TINY[0], pool="mean"), "['tiny-llama'] do not use pool=last"), (dict(TINY[0], max_length=16), "exceed max_length=16")):
        (run / "pool.yaml").write_text(yaml.safe_dump({"anchor": "tiny-llama", "models": [entry]}))
        with pytest.raises((ConfigError, DataError)) as err:
            extract(ExtractConfig(run=RunConfig(run_dir=str(run), pool=str(run / "pool.yaml"))))
        assert problem in err.value.problem
        assert not (run / "activations" / "tiny-llama" / "_SUCCESS").exists()


def test_the_context_teacher_writes_the_word_then_the_words_before_it(token_run, tmp_path):
    path = tmp_path / "passages.parquet"
    path.write_bytes((token_run / "passages.parquet").read_bytes())
    report = teach(path, TeacherConfig(backend="context", context_words=4), cache_dir=tmp_path / "cache")
    table = pq.read_table(path)
    assert report.valid == table.num_rows and report.teacher == "context:4" and report.requested == 0
    for text, z in zip(table.column("text").to_pylist(), table.column("z").to_pylist()):
        head, rest = split_head(z)
        assert head == [re.findall(r"[A-Za-z][A-Za-z0-9_]{2,}", text)[-1].lower()]
        assert rest == f'It reads "{" ".join(text.split()[-4:])}".'
    rows = tag_rows(activations.read_activations(token_run / "activations", "tiny-gpt2"), table, "train", need_z=True)
    assert len(rows) and all(r.split("@")[0] in set(table.column(SOURCE_ID).to_pylist()) for r in rows.ids)


def test_the_context_teacher_refuses_whole_passages_and_a_keyword_head(tmp_path):
    path = tmp_path / "passages.parquet"
    write_passages(build_passages(CorpusConfig(max_passages=10)), path)
    before = path.read_bytes()
    with pytest.raises(DataError, match="corpus.unit=token"):
        teach(path, TeacherConfig(backend="context"), cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="head=keywords"):
        teach(path, TeacherConfig(backend="context", head=HeadKind.keywords), cache_dir=tmp_path)
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="must end with a word"):
        context_explanation("a passage cut mid-sentence, ", 4)
