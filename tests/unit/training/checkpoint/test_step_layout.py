"""A step directory holds one save of one layout (training/checkpoint/store.py, layout_check.py), readers
take the newest step that verifies (verify.reading) and pruning leaves a step a reader holds
(read_lock.py). World size 1, real files; the engine is DeepSpeed's save interface writing the
file names of an EP layout."""

import os

import pytest
import torch

from training.checkpoint import manifest, read_lock, store
from training.checkpoint.store import CheckpointUnverified
from training.checkpoint.verify import reading, verify_dir


class _EPEngine:
    """``save_checkpoint`` writing the files of an EP=``ep`` DeepSpeed MoE step (4 experts, 1 layer),
    the model file holding the client state as DeepSpeed stores it."""

    def __init__(self, ep: int, experts: int = 4):
        self.ep, self.experts, self.checkpoint_engine = ep, experts, None

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        d = os.path.join(save_dir, tag)
        os.makedirs(d, exist_ok=True)
        torch.save({"module": {"w": torch.ones(2)}, **client_state}, os.path.join(d, "mp_rank_00_model_states.pt"))
        for e in range(self.experts):
            torch.save({"e": torch.full((2,), float(e))}, os.path.join(d, f"layer_0_expert_{e}_mp_rank_00_model_states.pt"))
        for r in range(self.ep):
            torch.save({"r": r}, os.path.join(d, f"expp_rank_{r}_mp_rank_00_optim_states.pt"))


def _save(ck, step, ep, run_id="r", keep=3):
    layout = {"ep_size": ep, "world_size": ep, "zero_stage": 0}
    return store.save(_EPEngine(ep), ck, step, {"step": step, "ep_size": ep}, keep, 0, 1, run_id=run_id,
                           layout=layout)


def _optim_files(step_dir):
    return sorted(f for f in os.listdir(step_dir) if f.startswith("expp_rank_"))


def test_a_step_saved_again_at_another_ep_size_is_replaced_whole_not_written_into(tmp_path):
    """The finished EP=2 run resumed at EP=1: its final step saved again must not keep expp_rank_1."""
    ck = str(tmp_path)
    _save(ck, 10, ep=2)
    _save(ck, 10, ep=1)
    step_dir = os.path.join(ck, "step0000010")
    assert _optim_files(step_dir) == ["expp_rank_0_mp_rank_00_optim_states.pt"]
    m = manifest.read(step_dir)
    assert m.layout == {"ep_size": 1, "world_size": 1, "zero_stage": 0}
    assert sorted(m.files) == manifest.list_files(step_dir)  # exactly the files of the one save
    assert verify_dir(ck)[1] == 0
    assert sorted(os.listdir(ck)) == ["latest", "step0000010"]  # nothing of the swap left behind


def test_verify_and_resume_refuse_a_step_of_two_layouts_and_fall_back(tmp_path, capsys):
    """What the in-place re-save left: EP=1 files plus a stale expp_rank_1, all listed and hashing right."""
    ck = str(tmp_path)
    _save(ck, 5, ep=2)
    _save(ck, 10, ep=1)
    d = os.path.join(ck, "step0000010")
    torch.save({"r": 1}, os.path.join(d, "expp_rank_1_mp_rank_00_optim_states.pt"))  # the stale partner
    for layout in ({"ep_size": 1}, None):  # recorded in the manifest; or an old manifest: the model file says
        manifest.write(d, 10, "r", manifest.entries(d, manifest.list_files(d)), layout)
        text, code = verify_dir(ck)
        assert code == 1 and "step0000010 (step 10): layout: optimizer files of EP ranks [0, 1] but the step was " \
                             "saved at EP size 1" in text, text
        assert "--resume would use step0000005" in text
        assert store.choose_verified(ck, "tiny") == "step0000005"
    assert "resuming from step0000005 (step 5), the newest verified checkpoint, instead of step0000010" \
        in capsys.readouterr().out


def test_layout_check_names_missing_experts_and_uneven_layers(tmp_path):
    from training.checkpoint.layout_check import layout_problems

    names = ["layer_0_expert_0_mp_rank_00_model_states.pt", "layer_0_expert_2_mp_rank_00_model_states.pt",
             "layer_1_expert_0_mp_rank_00_model_states.pt"]
    problems = layout_problems(str(tmp_path), names, {"ep_size": 1})
    assert any("layer 0 has expert files [0, 2]: not 0..1" in p for p in problems)
    assert any("expert files per layer differ" in p for p in problems)
    assert layout_problems(str(tmp_path), names[:1] + names[2:], {"ep_size": 1}) == []


def test_a_killed_saves_directory_is_incomplete_and_pruned_at_the_next_commit(tmp_path):
    ck = str(tmp_path)
    _save(ck, 5, ep=1)
    os.makedirs(os.path.join(ck, "step0000010.partial-0badf00d"))  # what kill_in_save leaves
    assert store.newest_complete(ck) == "step0000005"
    assert store.incomplete(ck) == ["step0000010.partial-0badf00d"]
    _save(ck, 10, ep=1)
    assert sorted(os.listdir(ck)) == ["latest", "step0000005", "step0000010"]


def test_pruning_leaves_a_step_that_a_reader_holds(tmp_path):
    ck = str(tmp_path)
    for s in (5, 10):
        _save(ck, s, ep=1, keep=1)
    assert store.newest_complete(ck) == "step0000010" and not os.path.isdir(os.path.join(ck, "step0000005"))
    with read_lock.shared(ck, "step0000010"):  # an export reading step 10 while training commits 15 and 20
        _save(ck, 15, ep=1, keep=1)
        _save(ck, 20, ep=1, keep=1)
        assert os.path.isfile(os.path.join(ck, "step0000010", manifest.MARKER))
        assert not os.path.isdir(os.path.join(ck, "step0000015"))
    _save(ck, 25, ep=1, keep=1)  # released: the next prune takes it
    assert sorted(t for _, t, _ in store.list_steps(ck)) == ["step0000025"]


def test_a_reader_takes_the_newest_verified_step_and_says_so(tmp_path):
    ck = str(tmp_path)
    for s in (5, 10, 15):
        _save(ck, s, ep=1)
    path = os.path.join(ck, "step0000015", "layer_0_expert_1_mp_rank_00_model_states.pt")
    data = bytearray(open(path, "rb").read())
    data[-20] ^= 0xFF  # a flipped byte, same size
    open(path, "wb").write(bytes(data))
    os.remove(os.path.join(ck, "latest"))  # readers do not depend on it
    said = []
    with reading(ck, None, "export", said.append) as tag:
        assert tag == "step0000010"
        assert os.path.isdir(os.path.join(ck, tag))
    assert any("export: step0000015 (step 15)" in s and "does not verify" in s for s in said)
    assert said[-1].startswith("export: step0000010 (step 10), the newest verified checkpoint")
    with pytest.raises(CheckpointUnverified, match="step0000015: layer_0_expert_1.*blake2b differs"):
        with reading(ck, "step0000015", "export", said.append):
            pass
    with pytest.raises(FileNotFoundError, match="no complete checkpoint named step0000099"):
        with reading(ck, "step0000099", "export", said.append):
            pass
