"""A step directory is written once and every reader verifies, through the real CLI.

The sequence a user hit: a finished EP=2 run resumed at EP=1 on one process (nothing left to train),
then resumed again. Before, the final step was rewritten in place (the EP=2 run's expp_rank_1 stayed
beside the new expp_rank_0, the manifest listed both, verify said "verified") and every later resume
crashed in Adam. Then readers: export and eval with the newest step's bytes flipped and `latest` gone.
"""

import os

import pytest

from tests.helpers import TINY_DATA, run_cli
from training.checkpoint import manifest, store


def _train(tmp, nproc, *extra, check=True):
    return run_cli("train", "--config", "configs/tiny.yaml", "--no-progress", "name=r", f"out_dir={tmp}/runs",
                   f"data.path={tmp}/data", f"data.synth={TINY_DATA}", "train.ckpt_every=2", "eval.untrained=false",
                   "model.patch_moe.router.num_experts=4", *extra, nproc=nproc, timeout=900, check=check)


def _optim(step_dir):
    return sorted(f for f in os.listdir(step_dir) if f.startswith("expp_rank_"))


@pytest.mark.slow
def test_a_finished_ep2_run_resumed_at_ep1_keeps_its_step_and_every_reader_verifies(tmp_path):
    tmp = str(tmp_path)
    ck = f"{tmp}/runs/r/checkpoints"
    _train(tmp, 2, "train.ep_size=2", "train.steps=4")
    marker = open(f"{ck}/step0000004/{manifest.MARKER}").read()

    again = _train(tmp, 1, "train.ep_size=1", "train.steps=4", "--resume")  # nothing left to train
    assert "resumed 'r' at step 4 (resharded EP 2 -> 1)" in again.stdout
    assert open(f"{ck}/step0000004/{manifest.MARKER}").read() == marker  # not saved again
    assert _optim(f"{ck}/step0000004") == ["expp_rank_0_mp_rank_00_optim_states.pt",
                                           "expp_rank_1_mp_rank_00_optim_states.pt"]

    _train(tmp, 1, "train.ep_size=1", "train.steps=6", "--resume")
    assert _optim(f"{ck}/step0000006") == ["expp_rank_0_mp_rank_00_optim_states.pt"]
    assert manifest.read(f"{ck}/step0000006").layout == {"ep_size": 1, "world_size": 1, "zero_stage": 0}
    back = _train(tmp, 2, "train.ep_size=2", "train.steps=8", "--resume")  # crashed in Adam before
    assert "resumed 'r' at step 6 (resharded EP 1 -> 2)" in back.stdout
    assert run_cli("checkpoints", "verify", f"{tmp}/runs/r").returncode == 0

    # readers: the newest step's bytes flipped, `latest` gone -> both use step 6 and say so
    path = f"{ck}/step0000008/layer_0_expert_3_mp_rank_00_model_states.pt"
    data = bytearray(open(path, "rb").read())
    data[-30] ^= 0xFF
    open(path, "wb").write(bytes(data))
    os.remove(f"{ck}/latest")
    out = run_cli("export", "--run-dir", f"{tmp}/runs/r", "--out", f"{tmp}/m.safetensors", check=True).stdout
    assert "export: step0000008 (step 8)" in out and "does not verify" in out
    assert "export: step0000006 (step 6), the newest verified checkpoint" in out
    assert "exported " in out and " step0000006:" in out
    ev = run_cli("eval", "--run-dir", f"{tmp}/runs/r", "--nproc", "2", check=True).stdout
    assert "eval: loading the weights of step0000006 (step 6), the newest verified checkpoint" in ev
    assert "r @ step 6:" in ev
    assert store.newest_complete(ck) == "step0000008"  # readers never delete or rewrite
