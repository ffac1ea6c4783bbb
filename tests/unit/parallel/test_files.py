"""Atomic writes (parallel/files.py): the old content or the new, never half of either."""

import os

import pytest

from parallel.files import staged_dir, write_text_atomic


def test_text_file_replaced_whole(tmp_path):
    path = str(tmp_path / "latest")
    write_text_atomic(path, "step0000010")
    write_text_atomic(path, "step0000020")
    assert open(path).read() == "step0000020" and os.listdir(tmp_path) == ["latest"]


def test_staged_dir_appears_only_when_complete(tmp_path):
    dst = str(tmp_path / "step0000010")
    with staged_dir(dst) as tmp:
        open(os.path.join(tmp, "a.pt"), "w").write("a")
        assert not os.path.exists(dst)
    assert os.listdir(dst) == ["a.pt"] and sorted(os.listdir(tmp_path)) == ["step0000010"]
    with pytest.raises(RuntimeError):
        with staged_dir(dst) as tmp:
            open(os.path.join(tmp, "b.pt"), "w").write("b")
            raise RuntimeError("disk full")
    assert os.listdir(dst) == ["a.pt"] and sorted(os.listdir(tmp_path)) == ["step0000010"]  # old one intact
    with staged_dir(dst) as tmp:
        open(os.path.join(tmp, "c.pt"), "w").write("c")
    assert os.listdir(dst) == ["c.pt"]
