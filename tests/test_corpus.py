import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nla_universal.cli import main
from nla_universal.config import CorpusConfig
from nla_universal.corpus import build_passages, passage_id, read_passages, split_of
from nla_universal.errors import DataError

PARA = "The quick brown fox jumps over the lazy dog while the farmer watches from the porch. "


@pytest.fixture(scope="module")
def builtin():
    return build_passages(CorpusConfig(max_passages=3000))


def test_builtin_corpus_is_deduplicated_length_filtered_and_split(builtin):
    cfg = CorpusConfig()
    texts = builtin.column("text").to_pylist()
    ids = builtin.column("passage_id").to_pylist()
    assert 1000 <= len(texts) <= 3000
    assert len(set(texts)) == len(texts) and len(set(ids)) == len(ids)
    assert all(cfg.min_chars <= len(t) <= cfg.max_chars for t in texts)
    assert ids == [passage_id(t) for t in texts]
    share = Counter(builtin.column("split").to_pylist())
    n = len(texts)
    assert abs(share["train"] / n - 0.8) < 0.04 and abs(share["test"] / n - 0.1) < 0.03


def test_builtin_corpus_is_stable_across_runs(builtin):
    again = build_passages(CorpusConfig(max_passages=3000))
    assert again.equals(builtin)


def test_split_depends_only_on_the_passage_id():
    pid = passage_id("some passage")
    assert split_of(pid, 0.1, 0.1) == split_of(pid, 0.1, 0.1)
    assert Counter(split_of(str(i), 0.1, 0.1) for i in range(20000))["test"] in range(1800, 2200)


def test_user_corpus_folder_mixes_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text(PARA * 4 + "\n\n" + "short")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": PARA * 3 + "jsonl"}) + "\n")
    pq.write_table(pa.table({"body": [PARA * 3 + "parquet"]}), tmp_path / "c.parquet")
    table = build_passages(CorpusConfig(source=str(tmp_path), text_field="body", min_chars=100))
    texts = table.column("text").to_pylist()
    assert len(texts) == 3
    assert any(t.endswith("jsonl") for t in texts) and any(t.endswith("parquet") for t in texts)


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "a.txt").write_text("too short")
    with pytest.raises(DataError, match="no passages"):
        build_passages(CorpusConfig(source=str(tmp_path)))


def test_unreadable_corpus_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not a parquet file")
    with pytest.raises(DataError, match="cannot read corpus file"):
        build_passages(CorpusConfig(source=str(bad)))
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"text": "unterminated')
    with pytest.raises(DataError, match=r"x\.jsonl:2 is not JSON"):
        build_passages(CorpusConfig(source=str(tmp_path / "x.jsonl")))


def test_corpus_cli_writes_passages_and_refuses_to_clobber(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("\n\n".join(PARA * 3 + str(i) for i in range(12)))
    run = tmp_path / "run"
    assert main(["corpus", f"run.run_dir={run}", f"corpus.source={src}", "corpus.min_chars=100", "corpus.max_chars=300"]) == 0
    assert read_passages(run / "passages.parquet").num_rows == 12
    (src / "a.txt").write_text("\n\n".join(PARA * 3 + str(i) for i in range(12, 20)))
    assert main(["corpus", f"run.run_dir={run}", f"corpus.source={src}", "corpus.min_chars=100", "corpus.max_chars=300"]) == 2
    assert "different passages" in capsys.readouterr().err
    assert read_passages(run / "passages.parquet").num_rows == 12
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_cli_unknown_key_names_the_closest_one(capsys):
    assert main(["corpus", "corpus.max_pasages=5"]) == 2
    assert "corpus.max_passages" in capsys.readouterr().err


def test_cli_unparseable_values_are_named_not_a_traceback(tmp_path, capsys):
    assert main(["corpus", "corpus.source=x: y: z"]) == 2
    err = capsys.readouterr().err
    assert "override 'corpus.source=x: y: z'" in err and "quote values" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("corpus:\n  source: [unclosed\n")
    assert main(["corpus", "-c", str(broken)]) == 2
    assert f"config file {broken}" in capsys.readouterr().err
