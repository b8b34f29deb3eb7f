"""ATOMIC.py: a file or folder appears under its name only when complete; what killed writers leave is cleared."""
import os

import pytest

from ATOMIC import clear_stale, replacing

DEAD = 4999999  # above Linux's largest pid (4194304): no such process


def test_a_folder_replaces_its_predecessor_only_when_complete(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with replacing(str(target)) as tmp:
        os.makedirs(tmp)
        open(os.path.join(tmp, "new.txt"), "w").write("new")
        assert (target / "old.txt").exists()  # still the old one while the new one is written
    assert os.listdir(target) == ["new.txt"] and os.listdir(tmp_path) == ["ckpt"]


def test_an_error_while_writing_leaves_the_predecessor_and_no_temporary(tmp_path):
    target = tmp_path / "model.bin"
    target.write_text("good")
    with pytest.raises(OSError):
        with replacing(str(target)) as tmp:
            open(tmp, "w").write("half")
            raise OSError("disk full")
    assert target.read_text() == "good" and os.listdir(tmp_path) == ["model.bin"]


def test_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    (tmp_path / f".tmp-{DEAD}-cache").mkdir()                 # a killed run's half-written folder
    (tmp_path / f".tmp-{os.getpid()}-tok").mkdir()            # this process is alive: never touched
    (tmp_path / "ckpt-step-3").mkdir()
    (tmp_path / f".old-{DEAD}-ckpt-step-3").mkdir()       # a predecessor whose replacement completed
    (tmp_path / f".old-{DEAD}-ckpt-best").mkdir()         # killed between the two renames: put back
    clear_stale(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [f".tmp-{os.getpid()}-tok", "ckpt-best", "ckpt-step-3"]


def test_the_token_cache_clears_what_an_interrupted_tokenization_left(tmp_path, tok_files):
    from DATA import local, token_cache
    cache = tmp_path / "cache"
    (cache / f".tmp-{DEAD}-0123456789abcdef").mkdir(parents=True)
    token_cache(local([tok_files[0]]), tok_files[1], str(cache))
    assert [n for n in os.listdir(cache) if n.startswith(".tmp-")] == []


@pytest.fixture
def tok_files(tmp_path):
    from TOKENIZER import train_tokenizer
    p = tmp_path / "a.txt"
    p.write_text("the cat sat\na dog ran\n")
    return str(p), train_tokenizer(["the cat sat", "a dog ran"], 270)
