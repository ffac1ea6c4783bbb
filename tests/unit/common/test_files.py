"""Atomic writes (common/files.py): the old content or the new, never half of either."""

import errno
import os

import pytest

from common.files import staged_dir, write_text_atomic
from tests.helpers import mounted_tmpfs


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


def test_a_full_disk_leaves_the_old_file_and_no_temp_file(tmp_path):
    """A real full filesystem (a 1 MiB tmpfs): the write fails naming the file, the old content stays,
    and no 0-byte or cut temp file is left beside it (summary.json.tmp before)."""
    with mounted_tmpfs(str(tmp_path / "small"), "1m") as mnt:
        path = os.path.join(mnt, "summary.json")
        write_text_atomic(path, '{"map": 0.5}')
        with pytest.raises(OSError) as err:
            write_text_atomic(path, "x" * (2 << 20))
        assert err.value.errno == errno.ENOSPC and err.value.filename == path
        assert open(path).read() == '{"map": 0.5}' and os.listdir(mnt) == ["summary.json"]


def test_a_binary_file_cut_by_a_full_disk_is_not_left_behind(tmp_path):
    from common.files import atomic_file

    with mounted_tmpfs(str(tmp_path / "small"), "1m") as mnt:
        with pytest.raises(OSError):
            with atomic_file(os.path.join(mnt, "plot.png"), "wb") as fh:
                fh.write(b"\0" * (2 << 20))
        assert os.listdir(mnt) == []  # none was there, none is left
