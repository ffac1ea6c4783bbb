"""The checkpoint manifest (training/checkpoint/manifest.py) and the offline check (training/checkpoint/verify.py), on
fabricated step directories: each kind of damage is named, a legacy marker is 'unverified'."""

import json
import os

import pytest

from training.checkpoint import manifest, verify

from tests.unit.training.checkpoint.markers import write_legacy_marker

FILES = {"mp_rank_00_model_states.pt": 3000, "layer_0_expert_0_mp_rank_00_model_states.pt": 1500,
         "layer_0_expert_1_mp_rank_00_model_states.pt": 1500, "expp_rank_0_mp_rank_00_optim_states.pt": 5000}


def _step(ck, step, run_id="run-a", legacy=False):
    d = os.path.join(ck, f"step{step:07d}")
    os.makedirs(d)
    for i, (name, size) in enumerate(sorted(FILES.items())):
        with open(os.path.join(d, name), "wb") as fh:
            fh.write(bytes((step + i + k) % 251 for k in range(size)))
    if legacy:
        write_legacy_marker(d, step)
    else:
        manifest.write(d, step, run_id, manifest.entries(d, manifest.list_files(d)))
    return d


def _flip_middle(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.seek(size // 2)
        b = fh.read(1)
        fh.seek(size // 2)
        fh.write(bytes([b[0] ^ 0xFF]))
    assert os.path.getsize(path) == size


def test_manifest_lists_every_file_with_size_and_hash(tmp_path):
    d = _step(str(tmp_path), 10)
    doc = json.load(open(os.path.join(d, manifest.MARKER)))
    assert doc["step"] == 10 and doc["run_id"] == "run-a" and doc["hash"] == "blake2b"
    assert {k: v["size"] for k, v in doc["files"].items()} == FILES
    assert all(len(v["blake2b"]) == 128 for v in doc["files"].values())
    m = manifest.read(d)
    assert not m.legacy and m.step == 10 and manifest.check(d, m.files, sorted(m.files)) == []
    assert not os.path.exists(os.path.join(d, manifest.MARKER + ".tmp"))  # written atomically


@pytest.mark.parametrize("damage,expect", [
    ("flip", "layer_0_expert_1_mp_rank_00_model_states.pt: blake2b differs: the bytes changed after the save"),
    ("truncate", "layer_0_expert_1_mp_rank_00_model_states.pt: size 700 != 1500 in the manifest"),
    ("delete", "layer_0_expert_1_mp_rank_00_model_states.pt: missing (1500 bytes in the manifest)"),
])
def test_each_kind_of_damage_is_named(tmp_path, damage, expect):
    d = _step(str(tmp_path), 10)
    path = os.path.join(d, "layer_0_expert_1_mp_rank_00_model_states.pt")
    if damage == "flip":
        _flip_middle(path)
    elif damage == "truncate":
        os.truncate(path, 700)
    else:
        os.remove(path)
    m = manifest.read(d)
    problems = manifest.check(d, m.files, sorted(m.files))
    assert len(problems) == 1 and problems[0].startswith(expect), problems


def test_shares_split_the_files_across_ranks_without_overlap():
    names = [f"f{i}" for i in range(7)]
    parts = [manifest.share(names, r, 3) for r in range(3)]
    assert parts[0] == ["f0", "f3", "f6"] and sorted(sum(parts, [])) == names


def test_legacy_marker_counts_as_complete_but_unverified(tmp_path):
    ck = str(tmp_path)
    _step(ck, 5, legacy=True)
    m = manifest.read(os.path.join(ck, "step0000005"))
    assert m.legacy and m.step == 5 and m.run_id is None
    text, code = verify.verify_dir(ck)
    assert code == 1 and "unverified (legacy)" in text and "--resume would use step0000005" in text


def test_a_cut_short_marker_is_an_error_not_a_step(tmp_path):
    d = _step(str(tmp_path), 5)
    with open(os.path.join(d, manifest.MARKER), "r+") as fh:
        fh.truncate(40)
    with pytest.raises(manifest.MarkerError, match="not a manifest nor a step number"):
        manifest.read(d)


def test_verify_table_and_exit_code(tmp_path):
    run = tmp_path / "run"
    ck = str(run / "checkpoints")
    os.makedirs(ck)
    _step(ck, 5)
    d10 = _step(ck, 10, run_id="run-b")
    os.makedirs(os.path.join(ck, "step0000015"))  # a save that never finished
    text, code = verify.verify_dir(str(run))  # the run directory works too
    assert code == 0, text
    rows = {ln.split()[0]: ln.split() for ln in text.splitlines()[2:6]}
    assert rows["5"][1:5] == ["step0000005", "complete", "verified", "run-a"]
    assert rows["10"][3:7] == ["verified", "run-b", "4", "11,000"]
    assert rows["15"][2] == "incomplete"
    _flip_middle(os.path.join(d10, "mp_rank_00_model_states.pt"))
    text, code = verify.verify_dir(ck)
    assert code == 1
    assert "step0000010 (step 10): mp_rank_00_model_states.pt: blake2b differs" in text
    assert "newest complete: step0000010, mismatch; --resume would use step0000005" in text


def test_verify_of_a_missing_directory_is_a_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run or checkpoint directory"):
        verify.verify_dir(str(tmp_path / "nope"))
