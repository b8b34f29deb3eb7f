"""Data where it lives (SOURCES.py): every format, folder and dataset gives the token cache the same rows give as
.jsonl; --columns; the Hub rule; and an error naming file and row for each way data goes wrong."""
import csv
import gzip
import json
import os
import shutil
import time

import pytest

from CONFIG import DataCfg
from DATA import iter_texts, local, read_all, sources, token_cache
from REPORT import UserError
from TOKENIZER import train_tokenizer
from conftest import ROOT, TINY, run, same_weights, train

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

TEXTS = [line.strip() for line in open(os.path.join(ROOT, "tests/data/train.txt")) if line.strip()][:40] + [
    'a "quoted" word; a semicolon, a comma', "two\nlines in one row", "café — naïve, ünïcödé", "tab\tinside"]
TEXT_ROWS = [{"text": t} for t in TEXTS]
CHAT_ROWS = [json.loads(line) for line in open(os.path.join(ROOT, "data/chat.jsonl"))][:8]
PAIR_ROWS = [{"prompt": f"Question {i}: what is {i} + {i}?", "completion": f"It is {2 * i}."} for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter_texts(local(["tests/data/train.txt", "data/chat.jsonl"])), 400, chat=True)


def write(path, rows, sep=","):
    """rows as a file of the format its name says (str or Path; folders made)."""
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)
    elif path.endswith((".csv", ".tsv")):
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t" if path.endswith(".tsv") else sep)
            w.writeheader()
            w.writerows(rows)
    else:
        body = json.dumps(rows) if path.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows)
        if ".txt" in path:
            body = "".join(r["text"] + "\n" for r in rows)
        data = body.encode()
        if path.endswith(".gz"):
            data = gzip.compress(data)
        elif path.endswith(".zst"):
            data = pytest.importorskip("zstandard").ZstdCompressor().compress(data)
        open(path, "wb").write(data)
    return path


def cache(tok, tmp_path, *names, **settings):
    """The token cache of --data names with these data settings: (tokens, mask, ends) as lists."""
    c = token_cache(sources(DataCfg(files=[str(n) for n in names], **settings))[0], tok, str(tmp_path / "cache"))
    return c.tokens.tolist(), c.mask.tolist(), c.ends.tolist(), c.whole.tolist()


@pytest.mark.parametrize("rows, name", [
    (TEXT_ROWS, "a.json"), (TEXT_ROWS, "a.jsonl.gz"), (TEXT_ROWS, "a.jsonl.zst"), (TEXT_ROWS, "a.csv"),
    (TEXT_ROWS, "a.tsv"), (TEXT_ROWS, "a.parquet"), (CHAT_ROWS, "a.parquet"), (CHAT_ROWS, "a.json"),
    (PAIR_ROWS, "a.csv"), (PAIR_ROWS, "a.parquet")])
def test_each_format_gives_the_token_cache_of_the_same_rows_in_jsonl(tmp_path, tok, rows, name):
    expected = cache(tok, tmp_path, write(tmp_path / "a.jsonl", rows))
    assert cache(tok, tmp_path, write(tmp_path / "f" / name, rows)) == expected


def test_txt_gz_is_the_txt(tmp_path, tok):
    rows = [r for r in TEXT_ROWS if "\n" not in r["text"]]
    assert cache(tok, tmp_path, write(tmp_path / "a.txt.gz", rows)) == cache(tok, tmp_path, write(tmp_path / "a.txt", rows))


def test_csv_with_bom_semicolons_and_quoted_newlines(tmp_path, tok):
    p = tmp_path / "excel.csv"
    p.write_bytes("\ufeffid;text\r\n1;\"two\r\nlines; one row\"\r\n2;plain\r\n".encode())
    rows = [r for _, r, _ in read_all(local([p]))]
    assert rows == [{"text": "two\r\nlines; one row"}, {"text": "plain"}]


def test_a_folder_of_shards_is_its_files_in_name_order(tmp_path, tok):
    for i, part in [(2, TEXT_ROWS[30:]), (0, TEXT_ROWS[:10]), (1, TEXT_ROWS[10:30])]:  # written out of order
        write(tmp_path / "shards" / f"part-{i:05d}.parquet", part)
    (tmp_path / "shards" / "README.md").write_text("not data")
    write(tmp_path / "shards" / ".cache" / "x.parquet", TEXT_ROWS[:3])  # hidden: never read
    assert cache(tok, tmp_path, tmp_path / "shards") == cache(tok, tmp_path, write(tmp_path / "one.parquet", TEXT_ROWS))


def test_save_to_disk_folders_read_their_split(tmp_path, tok):
    split = datasets.DatasetDict({"train": datasets.Dataset.from_list(TEXT_ROWS[:20]),
                                  "test": datasets.Dataset.from_list(TEXT_ROWS[20:])})
    split.save_to_disk(str(tmp_path / "dd"))
    datasets.Dataset.from_list(CHAT_ROWS).save_to_disk(str(tmp_path / "ds"))
    assert cache(tok, tmp_path, tmp_path / "dd") == cache(tok, tmp_path, write(tmp_path / "a.jsonl", TEXT_ROWS[:20]))
    assert cache(tok, tmp_path, tmp_path / "dd", split="test") == cache(tok, tmp_path,
                                                                        write(tmp_path / "b.jsonl", TEXT_ROWS[20:]))
    assert cache(tok, tmp_path, tmp_path / "ds") == cache(tok, tmp_path, write(tmp_path / "c.jsonl", CHAT_ROWS))
    with pytest.raises(UserError, match=r"dd: no split 'validation' in this dataset \(it has: train, test\)"):
        sources(DataCfg(files=[str(tmp_path / "dd")], split="validation"))


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A dataset repository as the Hub lays one out: a card with two configs, each with train and test files."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    root = tmp_path / "repo"
    write(root / "texts" / "train-00000-of-00002.parquet", TEXT_ROWS[:15])
    write(root / "texts" / "train-00001-of-00002.parquet", TEXT_ROWS[15:30])
    write(root / "texts" / "test-00000-of-00001.parquet", TEXT_ROWS[30:])
    write(root / "chats" / "train.parquet", CHAT_ROWS)
    (root / "README.md").write_text("---\nconfigs:\n- config_name: texts\n  default: true\n  data_files:\n"
                                    "  - split: train\n    path: texts/train-*\n  - split: test\n    path: texts/test-*\n"
                                    "- config_name: chats\n  data_files:\n  - split: train\n    path: chats/train.parquet\n"
                                    "---\n# A dataset\n")
    return root


@pytest.mark.parametrize("streaming", [False, True])
def test_a_dataset_repository_reads_through_load_dataset_by_split_and_subset(tmp_path, tok, repo, streaming):
    """The Hub's code path (datasets resolves the card, configs and splits), on a local copy of a repository."""
    jsonl = cache(tok, tmp_path, write(tmp_path / "a.jsonl", TEXT_ROWS[:30]))
    assert cache(tok, tmp_path, repo, streaming=streaming) == jsonl
    assert cache(tok, tmp_path, repo, split="test", streaming=streaming) == cache(
        tok, tmp_path, write(tmp_path / "b.jsonl", TEXT_ROWS[30:]))
    assert cache(tok, tmp_path, repo, subset="chats", streaming=streaming) == cache(
        tok, tmp_path, write(tmp_path / "c.jsonl", CHAT_ROWS))
    assert cache(tok, tmp_path, repo, max_samples=7, streaming=streaming) == cache(
        tok, tmp_path, write(tmp_path / "d.jsonl", TEXT_ROWS[:7]))


def test_files_named_by_split_are_a_repository_not_shards(tmp_path, tok, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    write(tmp_path / "plain" / "train.csv", TEXT_ROWS[:10])
    write(tmp_path / "plain" / "test.csv", TEXT_ROWS[10:])
    assert cache(tok, tmp_path, tmp_path / "plain") == cache(tok, tmp_path, write(tmp_path / "a.jsonl", TEXT_ROWS[:10]))
    write(tmp_path / "plain" / "extra.jsonl", TEXT_ROWS[:2])  # datasets reads one format: this file is left out
    sources(DataCfg(files=[str(tmp_path / "plain")]))
    assert "leaves out 1 of its data files (" + str(tmp_path / "plain" / "extra.jsonl") in capsys.readouterr().err


def test_repository_errors_name_the_splits_and_subsets_that_exist(tmp_path, repo):
    with pytest.raises(UserError, match=r"repo: no split 'dev' \(it has: train, test\) - pass --data-split"):
        sources(DataCfg(files=[str(repo)], split="dev"))
    with pytest.raises(UserError, match=r"repo: .*'nope'.*chats.* - pass --data-subset"):
        sources(DataCfg(files=[str(repo)], subset="nope"))


def test_max_samples_reads_that_many_of_each_source(tmp_path, tok):
    a, b = write(tmp_path / "a.parquet", TEXT_ROWS), write(tmp_path / "b.csv", PAIR_ROWS)
    data = sources(DataCfg(files=[a, b], max_samples=3))[0]
    assert [s for _, s, _ in read_all(data)] == TEXT_ROWS[:3] + PAIR_ROWS[:3]


def test_columns_map_rename_and_ignore(tmp_path, tok):
    renamed = write(tmp_path / "r.parquet", [{"content": r["text"], "id": i} for i, r in enumerate(TEXT_ROWS)])
    assert cache(tok, tmp_path, renamed, columns={"text": "content"}) == cache(tok, tmp_path,
                                                                              write(tmp_path / "a.jsonl", TEXT_ROWS))
    own = write(tmp_path / "own.parquet", TEXT_ROWS)  # a source without the mapped column reads the key's own
    assert cache(tok, tmp_path, own, columns={"text": "content"}) == cache(tok, tmp_path, tmp_path / "a.jsonl")
    qa = write(tmp_path / "qa.csv", [{"question": r["prompt"], "answer": r["completion"]} for r in PAIR_ROWS])
    assert cache(tok, tmp_path, qa, columns={"prompt": "question", "completion": "answer"}) == cache(
        tok, tmp_path, write(tmp_path / "b.jsonl", PAIR_ROWS))
    # UltraFeedback's layout: messages beside the pair; mapping messages to nothing reads the pair
    both = [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away.",
             "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}] * 3
    for path in write(tmp_path / "uf.parquet", both), write(tmp_path / "uf.jsonl", both):
        assert {k for k, _, _ in read_all(sources(DataCfg(files=[path]))[0])} == {"messages"}
        ignored = sources(DataCfg(files=[path], columns={"messages": None}))[0]
        assert {k for k, _, _ in read_all(ignored)} == {"preference"}


def test_the_column_map_is_part_of_the_cache_key(tmp_path, tok):
    rows = [{"a": r["text"], "b": r["text"][::-1]} for r in TEXT_ROWS]
    path = write(tmp_path / "ab.parquet", rows)
    assert cache(tok, tmp_path, path, columns={"text": "a"}) != cache(tok, tmp_path, path, columns={"text": "b"})


@pytest.mark.parametrize("columns, message", [
    ({}, r"x.parquet: none of the fields LLM-MINI reads .*; it has: Text, id - did you mean --columns text=Text\?"),
    ({"text": "content"}, r"data.columns: text=content, but .*x.parquet has neither 'content' nor 'text' \(it has: "
                          r"Text, id\)"),
    ({"txt": "Text"}, r"data.columns: 'txt' is not a key a row can have .* did you mean 'text'\?"),
])
def test_unreadable_columns_name_what_the_data_has(tmp_path, columns, message):
    path = write(tmp_path / "x.parquet", [{"Text": "hello", "id": 1}])
    with pytest.raises(UserError, match=message):
        list(read_all(sources(DataCfg(files=[path], columns=columns))[0]))


def rows_with(n, at, value):
    return [{"text": value if i == at else f"row {i}"} for i in range(n)]


def damaged(tmp_path, name):
    """Files that go wrong in each way, by name: the path to pass to --data."""
    p = tmp_path / name
    if name == "null.parquet":
        write(p, rows_with(1300, 1203, None))
    elif name == "int.parquet":
        write(p, [{"text": 5}, {"text": 6}])
    elif name == "empty.parquet":
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), str(p))
    elif name == "corrupt.parquet":
        p.write_bytes(b"PAR1 this is not parquet at all" * 10)
    elif name == "cut.parquet":
        write(p, TEXT_ROWS)
        p.write_bytes(p.read_bytes()[:-100])
    elif name == "header.csv":
        p.write_text("text\n")
    elif name == "short.csv":
        p.write_text("text,id\nhello,1\nworld\n")
    elif name == "cut.jsonl.gz":
        write(p, TEXT_ROWS)
        p.write_bytes(p.read_bytes()[:60])
    elif name == "object.json":
        p.write_text('{"text": "one object"}')
    elif name == "mixed":
        write(p / "a.parquet", TEXT_ROWS[:3])
        write(p / "b.parquet", CHAT_ROWS[:3])
    elif name == "formats":
        write(p / "a.parquet", TEXT_ROWS[:3])
        write(p / "b.csv", TEXT_ROWS[:3])
    return p


@pytest.mark.parametrize("name, message", [
    ("null.parquet", r"null.parquet: row 1,204: \"text\" is null - drop or fill it"),
    ("int.parquet", r"int.parquet: row 1: \"text\" is a int - it must be a string"),
    ("empty.parquet", r"empty.parquet: no samples"),
    ("corrupt.parquet", r"corrupt.parquet: not a readable Parquet file \(.*\) - the file is damaged or truncated"),
    ("cut.parquet", r"cut.parquet: not a readable Parquet file"),
    ("header.csv", r"header.csv: no samples \(it is empty, or only blank lines or a header\)"),
    ("short.csv", r"short.csv: row 2 \(line 3\): 1 fields, the header has 2 - quote fields"),
    ("cut.jsonl.gz", r"cut.jsonl.gz: cannot be decompressed .* damaged or truncated"),
    ("object.json", r"object.json: expected an array of objects .* got a dict - for one object per line name the "
                    r"file .jsonl"),
    ("mixed", r"mixed/b.parquet: row 1: a messages sample among text samples \(the first at .*mixed/a.parquet: row 1"),
    ("formats", r"formats: mixed formats in one folder \(1 .csv, 1 .parquet\) - keep one format per folder"),
])
def test_bad_data_is_one_error_naming_file_and_row(tmp_path, name, message):
    path = damaged(tmp_path, name)
    with pytest.raises(UserError, match=message):
        list(read_all(sources(DataCfg(files=[str(path)]))[0]))


def test_a_hub_id_without_network_fails_at_once_saying_how_to_pass_a_local_copy(tmp_path):
    """Not a file or folder here, shaped like owner/name: a Hub id. The Hub (a closed port here) is not reached."""
    t = time.time()
    r = run("TRAIN.py", "--config", TINY, "--out", tmp_path / "out", "--data", "someone/some-dataset",
            env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert ("error: someone/some-dataset: not a file or folder here, so read as a Hub dataset id (a --data value is "
            "read from the Hub only when it is neither a file nor a folder here") in r.stderr
    assert "cannot be reached - download it where there is a network (hf download someone/some-dataset " \
           "--repo-type dataset --local-dir DIR) and pass --data DIR" in r.stderr
    assert time.time() - t < 60  # no minute of retries (this includes importing torch)
    offline = run("TRAIN.py", "--config", TINY, "--out", tmp_path / "out", "--data", "someone/some-dataset",
                  env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")})
    assert offline.returncode == 2 and "not in the Hugging Face cache" in offline.stderr


@pytest.mark.parametrize("name", ["./missing", "data/sub/missing", "missing.parquet", "someone/x.jsonl"])
def test_a_value_that_cannot_be_a_hub_id_is_a_missing_path(name):
    with pytest.raises(UserError, match=f"{name}: no such file or folder"):
        sources(DataCfg(files=[name]))


PARQUET_RUN = ["--max-steps", "24", "--save-every", "4", "--log-every", "1"]


@pytest.fixture(scope="module")
def parquet_data(tmp_path_factory):
    """tests/tiny.yaml's data (tests/data/train.txt and train.jsonl) as 3 Parquet shards, and as one .jsonl."""
    root = tmp_path_factory.mktemp("parquet")
    rows = [{"text": t} for _, s, _ in read_all(local(["tests/data/train.txt", "tests/data/train.jsonl"]))
            for t in [s["text"]]]
    for i, n in enumerate(range(0, len(rows), 150)):
        write(root / "shards" / f"{i:03d}.parquet", rows[n:n + 150])
    return root / "shards", write(root / "same.jsonl", rows)


def test_training_on_parquet_shards_equals_training_on_the_same_jsonl(tmp_path, parquet_data):
    shards, jsonl = parquet_data
    train(tmp_path / "p", "--data", shards, *PARQUET_RUN)
    train(tmp_path / "j", "--data", jsonl, *PARQUET_RUN)
    assert same_weights(tmp_path / "p", tmp_path / "j")


def test_killed_run_on_parquet_resumes_bit_identically(tmp_path, parquet_data):
    import subprocess
    import sys
    shards, _ = parquet_data
    straight, out = tmp_path / "straight", tmp_path / "out"
    train(straight, "--data", shards, *PARQUET_RUN)
    proc = subprocess.Popen([sys.executable, "TRAIN.py", "--config", TINY, "--out", str(out), "--data", str(shards),
                             *PARQUET_RUN], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.time() + 120
        while not (out / "ckpt-step-8").exists():
            assert proc.poll() is None and time.time() < end, "training ended before the kill"
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "model.safetensors").exists()  # killed mid-run
    train(out, "--data", shards, *PARQUET_RUN, "--resume", "auto")
    assert same_weights(out, straight)
    shutil.rmtree(straight)


def test_eval_py_scores_a_parquet_file_as_the_same_jsonl(tmp_path, trained):
    rows = [{"body": t} for t in TEXTS[:12]]
    parquet, jsonl = write(tmp_path / "v.parquet", rows), write(tmp_path / "v.jsonl", [{"text": r["body"]} for r in rows])
    a = run("EVAL.py", "--model", trained, "--data", parquet, "--columns", "text=body")
    b = run("EVAL.py", "--model", trained, "--data", jsonl)
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and "perplexity" in a.stdout
