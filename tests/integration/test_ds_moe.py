"""DeepSpeed checkpoints of expert-parallel models: per-global-expert files and exact resume."""

import pytest

from tests.helpers import run_torchrun


@pytest.mark.slow
@pytest.mark.parametrize("ep, zero", [(2, 0), (2, 2), (1, 1)])
def test_checkpoint_resume_and_files(tmp_path, ep, zero):
    reports, _ = run_torchrun("ds_ckpt_check.py", 2, ["--ep-size", str(ep), "--zero", str(zero)], str(tmp_path))
    for r in reports:
        assert r["weights_equal"], "loaded expert weights differ from the saved ones"
        assert r["file_check"] and all(r["file_check"]), "an expert file does not hold its expert's weights"
        # resumed after step 3 == steps 4 and 5 of the uninterrupted run
        assert r["resumed"] == pytest.approx(r["straight"][3:], rel=1e-6)
        experts = [f for f in r["files"] if f.startswith("layer_0_expert_")]
        assert experts == [f"layer_0_expert_{g}_mp_rank_00_model_states.pt" for g in range(4)]
