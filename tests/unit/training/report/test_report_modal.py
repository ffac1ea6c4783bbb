"""The report's per-modality figures against hand counts."""

import numpy as np

from training.report.report_modal import expert_groups, group_shares, split_weights


def test_expert_groups_follow_the_placement():
    assert expert_groups([2, 2, 2], "grouped") == [0, 0, 1, 1, 2, 2]
    assert expert_groups([2, 2, 2], "spread") == [0, 1, 2, 0, 1, 2]  # id = f*G + g
    assert expert_groups([3, 1, 2], "grouped") == [0, 0, 0, 1, 2, 2]
    assert expert_groups([3, 1, 2], "spread") == [0, 1, 2, 0, 2, 0]


def test_group_shares_sum_each_groups_experts():
    model = {"moe_kind": "hierarchical",
             "hierarchical": {"num_groups": 3, "experts_per_group": 2, "placement": "spread", "coarse_mode": "given"}}
    summary = {"config": {"model": model}, "expert_load": {"block1": {"whole_run": [1, 2, 3, 4, 5, 5]}}}
    # spread: experts 0..5 belong to groups 0 1 2 0 1 2
    assert group_shares(summary) == {"block1": [5 / 20, 7 / 20, 8 / 20]}
    summary["config"]["model"]["moe_kind"] = "patch"
    assert group_shares(summary) is None


def test_split_weights_recovers_modality_and_scale_weights():
    a = np.array([[0.5, 0.0, 0.5]])  # modality weights (nir absent)
    w = np.array([[[0.2, 0.8], [0.0, 0.0], [0.6, 0.4]]])  # scale weights within each modality
    modality, within = split_weights((a[..., None] * w).reshape(1, -1), scales=[4, 8])
    np.testing.assert_allclose(modality, a)
    np.testing.assert_allclose(within[0, 0], [0.2, 0.8])
    np.testing.assert_allclose(within[0, 2], [0.6, 0.4])
    assert np.isnan(within[0, 1]).all()
