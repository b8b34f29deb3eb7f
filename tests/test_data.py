"""DATA.py: reading .txt/.jsonl (errors name file:line), the resumable sample order, and collation. The other
formats, folders and datasets: test_sources.py."""
import pytest
import torch

from BATCHES import collate, count_targets, plain, sample_indices
from CONFIG import DataCfg
from DATA import local, read_samples, sources
from REPORT import UserError


def texts(path):
    return [(str(where).split("/")[-1], sample["text"]) for _, sample, where in read_samples(*local([path]))]


def test_txt_is_one_sample_per_non_empty_line(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first line\n\n   \nsecond line\r\n")
    assert texts(p) == [("a.txt:1", "first line"), ("a.txt:4", "second line")]


def test_jsonl_reads_the_text_field_and_ignores_others(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "hello", "id": 1}\n\n{"text": "line\\nbreak"}\n')
    assert texts(p) == [("a.jsonl:1", "hello"), ("a.jsonl:3", "line\nbreak")]


@pytest.mark.parametrize("name, content, message", [
    ("a.jsonl", b'{"text": "ok"}\n{"text": oops}\n', r"a.jsonl:2: invalid JSON"),
    ("a.jsonl", b'{"text": "ok"}\n["text"]\n', r"a.jsonl:2: expected a JSON object"),
    ("a.jsonl", b'{"body": "x"}\n', r"a.jsonl:1: none of the fields LLM-MINI reads .* it has: body - map one, "
                                    r"e.g. --columns text=body"),
    ("a.jsonl", b'{"text": "x"}\n{"body": "x"}\n', r"a.jsonl:2: no \"text\" field"),
    ("a.jsonl", b'{"text": 5}\n', r"a.jsonl:1: \"text\" is a int"),
    ("a.txt", b"fine\nbad \xff byte\n", r"a.txt:2: invalid UTF-8"),
    ("a.txt", b"\n  \n\n", r"a.txt: no samples"),
    ("a.jsonl", b"", r"a.jsonl: no samples"),
])
def test_bad_lines_name_file_and_line(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(UserError, match=message):
        list(read_samples(*local([p])))


def test_sources_rejects_missing_files_empty_folders_and_unknown_types(tmp_path):
    (tmp_path / "x.docx").write_text("a")
    with pytest.raises(UserError, match="missing.txt: no such file or folder"):
        sources(DataCfg(files=[str(tmp_path / "missing.txt")]))
    with pytest.raises(UserError, match="x.docx: unsupported file type"):
        sources(DataCfg(files=[str(tmp_path / "x.docx")]))
    (tmp_path / "x.docx").unlink()
    with pytest.raises(UserError, match="no data files in this folder"):
        sources(DataCfg(files=[str(tmp_path)]))


def test_eos_is_a_target_and_pads_are_masked_by_position():
    eos = 0  # GPT-2 style: the pad id IS the eos id
    batch = collate([plain([5, 6, 7, eos]), plain([8, eos])], pad_id=eos)
    assert batch["input_ids"].tolist() == [[5, 6, 7, eos], [8, eos, eos, eos]]
    assert batch["labels"].tolist() == [[-100, 6, 7, eos], [-100, eos, -100, -100]]  # real EOS kept, pads masked
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 1]]  # the pads: a segment of their own
    assert count_targets(batch) == 3 + 1


def test_sample_order_covers_every_sample_once_per_epoch():
    n = 7
    first_epoch = sample_indices(0, n, n, seed=1)
    second_epoch = sample_indices(n, n, n, seed=1)
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(n))
    assert first_epoch != second_epoch  # reshuffled each epoch
    assert sample_indices(0, n, n, seed=2) != first_epoch


def test_sample_order_resumes_from_a_position_without_replay():
    whole = sample_indices(0, 25, 7, seed=3)
    assert sample_indices(0, 11, 7, seed=3) + sample_indices(11, 14, 7, seed=3) == whole
    assert torch.equal(torch.tensor(sample_indices(11, 3, 7, seed=3)), torch.tensor(whole[11:14]))
