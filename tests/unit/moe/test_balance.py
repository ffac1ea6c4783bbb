import math

import torch

from moe.balance import load_balance_loss, router_z_loss, variance_loss
from moe.dispatch import slot_counts
from tests.reference import expert_balance_loss


def test_switch_loss_is_one_when_balanced_and_grows_with_imbalance():
    e = 4
    uniform = torch.full((8, e), 1 / e)
    balanced = torch.tensor([2.0, 2.0, 2.0, 2.0])
    assert math.isclose(float(load_balance_loss(uniform, balanced)), 1.0, rel_tol=1e-6)
    skewed_p = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 8)
    skewed_f = torch.tensor([8.0, 0.0, 0.0, 0.0])
    assert math.isclose(float(load_balance_loss(skewed_p, skewed_f)), 4 * 0.7, rel_tol=1e-6)


def test_switch_loss_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], requires_grad=True)
    ids = torch.tensor([[0, 1], [1, 2]])
    mask = torch.tensor([[True, True], [True, False]])
    load = slot_counts(ids, mask, 3).float()
    assert load.tolist() == [1.0, 2.0, 0.0]
    # f = [1/3, 2/3, 0]; P = [0.3, 0.45, 0.25]; 3 * (0.1 + 0.3) = 1.2
    loss = load_balance_loss(probs, load)
    assert math.isclose(float(loss.detach()), 1.2, rel_tol=1e-6)
    loss.backward()
    torch.testing.assert_close(probs.grad, torch.tensor([[0.5, 1.0, 0.0]] * 2))


def test_z_loss_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    expected = (math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2
    assert math.isclose(float(router_z_loss(logits)), expected, rel_tol=1e-6)


def test_variance_loss_is_the_seeds():
    w = torch.softmax(torch.randn(16, 3), -1)
    torch.testing.assert_close(variance_loss(w), expert_balance_loss(w))
    assert float(variance_loss(torch.ones(5, 1))) == 0.0
