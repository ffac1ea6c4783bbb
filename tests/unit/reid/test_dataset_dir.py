"""Dataset directories (reid/dataset_dir.py): msmoe replaces only what it made, writers take turns,
unreadable metadata is named. A killed writer's leftovers: tests/integration/test_dataset_dir.py."""

import os

import numpy as np
import pytest

from reid.data import META_FILE, DataError, load_splits, read_meta
from reid.rgbnt201 import import_rgbnt201
from reid.synth import SynthSpec, ensure_synth

TINY = SynthSpec(num_train_ids=2, num_test_ids=1, num_cameras=2, images_per_camera=2, height=32, width=16)


def _tree(folder) -> dict:
    """Every file under ``folder`` (relative path -> bytes)."""
    out = {}
    for base, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(base, f)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def _user_folder(path, with_meta=False):
    os.makedirs(path / "photos")
    (path / "notes.txt").write_text("my thesis notes")
    (path / "photos" / "a.jpg").write_bytes(b"\xff\xd8 not really")
    if with_meta:  # a file of msmoe's name among the user's own
        (path / META_FILE).write_text('{"kind": "synth"}')
    return _tree(path)


@pytest.mark.parametrize("with_meta", [False, True])
def test_a_folder_msmoe_did_not_make_is_refused_and_kept(tmp_path, with_meta):
    user = tmp_path / "mine"
    before = _user_folder(user, with_meta)
    for force in ({}, {"force": True}):
        with pytest.raises(DataError) as err:
            ensure_synth(str(user), TINY, progress=False, **force)
        assert f"data.path={str(user)!r}" in str(err.value) and "notes.txt" in str(err.value)
        assert "Set data.path to a new or empty folder" in str(err.value)
        assert _tree(user) == before
    with pytest.raises(DataError, match=r"--out=.*notes\.txt"):
        import_rgbnt201(str(tmp_path / "no_src"), str(user), 32, 16, progress=False)
    assert _tree(user) == before
    assert sorted(os.listdir(tmp_path)) == [".mine.msmoe-lock", "mine"]  # no temp dir left


def test_a_file_is_refused_and_an_empty_folder_is_written(tmp_path):
    (tmp_path / "a_file").write_text("keep")
    with pytest.raises(DataError, match="is a file, not a dataset folder"):
        ensure_synth(str(tmp_path / "a_file"), TINY, progress=False)
    assert (tmp_path / "a_file").read_text() == "keep"
    (tmp_path / "empty").mkdir()
    assert ensure_synth(str(tmp_path / "empty"), TINY, progress=False)
    assert sorted(os.listdir(tmp_path / "empty")) == ["arrow", META_FILE]


def test_msmoe_sets_are_replaced_whole_by_another_spec_or_force(tmp_path):
    out = str(tmp_path / "set")
    assert ensure_synth(out, TINY, progress=False)
    assert not ensure_synth(out, TINY, progress=False)  # present: kept
    bigger = SynthSpec(**{**TINY.__dict__, "num_train_ids": 3})
    assert ensure_synth(out, bigger, progress=False)
    assert len(np.unique(np.asarray(load_splits(out)["train"]["pid"]))) == 3
    assert sorted(os.listdir(tmp_path)) == [".set.msmoe-lock", "set"]  # the old sets went with their temp dirs
    assert ensure_synth(out, bigger, progress=False, force=True)
    assert sorted(os.listdir(tmp_path)) == [".set.msmoe-lock", "set"]


@pytest.mark.parametrize("content,problem", [
    (b'{"kind": "synth", ', "JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 19"),
    (b"\xff\xfe\x00garbage", "UnicodeDecodeError"),
    (b"[1, 2]", "it holds a JSON list, not an object"),
])
def test_unreadable_metadata_is_named_with_the_fix(tmp_path, content, problem):
    out = str(tmp_path / "set")
    assert ensure_synth(out, TINY, progress=False)
    with open(os.path.join(out, META_FILE), "wb") as fh:
        fh.write(content)
    for read in (read_meta, load_splits, lambda d: ensure_synth(d, TINY, progress=False)):
        with pytest.raises(DataError) as err:
            read(out)
        text = str(err.value)
        assert f"metadata {os.path.join(out, META_FILE)} is unreadable ({problem}" in text, text
        assert f"`msmoe data synth --force --out {out}`" in text
    assert ensure_synth(out, TINY, progress=False, force=True)  # the fix it names works
    assert read_meta(out)["kind"] == "synth"
