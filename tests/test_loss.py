"""The preference loss against hand-computed numbers: python -m pytest -q tests/test_loss.py"""
import math

import pytest
import torch

from fspo import preference_loss


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5])
def test_policy_equal_reference(beta):
    lp_w, lp_l = torch.tensor([-12.0, -3.5]), torch.tensor([-9.0, -7.25])
    dpo, rw, rl = preference_loss(lp_w, lp_l, lp_w.clone(), lp_l.clone(), beta, "dpo")
    assert torch.allclose(dpo, torch.full((2,), math.log(2)))
    ipo, _, _ = preference_loss(lp_w, lp_l, lp_w.clone(), lp_l.clone(), beta, "ipo")
    assert torch.allclose(ipo, torch.full((2,), (1 / (2 * beta)) ** 2))
    assert torch.equal(rw, torch.zeros(2)) and torch.equal(rl, torch.zeros(2))


def test_hand_computed_values_and_gradients():
    beta = 0.1
    pi_w = torch.tensor([-10.0], requires_grad=True)
    pi_l = torch.tensor([-12.0], requires_grad=True)
    ref_w, ref_l = torch.tensor([-11.0]), torch.tensor([-11.5])
    # h = (-10 + 11) - (-12 + 11.5) = 1.5
    ipo, rw, rl = preference_loss(pi_w, pi_l, ref_w, ref_l, beta, "ipo")
    assert ipo.item() == pytest.approx((1.5 - 5.0) ** 2)
    assert rw.item() == pytest.approx(0.1) and rl.item() == pytest.approx(-0.05)
    assert not rw.requires_grad and not rl.requires_grad
    ipo.sum().backward()
    assert pi_w.grad.item() == pytest.approx(2 * (1.5 - 5.0))
    assert pi_l.grad.item() == pytest.approx(-2 * (1.5 - 5.0))
    dpo, _, _ = preference_loss(pi_w.detach(), pi_l.detach(), ref_w, ref_l, beta, "dpo")
    assert dpo.item() == pytest.approx(math.log(1 + math.exp(-0.15)))


def test_nll_anchor_adds_the_chosen_token_mean_nll():
    """IPO + 2 x NLL: h = 1.5 as above; chosen has 4 tokens summing to -10 nats, so the
    anchor adds 2 * 10 / 4 = 5 and pulls log pi(y_w) up by 2/4 per unit of loss."""
    pi_w = torch.tensor([-10.0], requires_grad=True)
    pi_l = torch.tensor([-12.0], requires_grad=True)
    ref_w, ref_l = torch.tensor([-11.0]), torch.tensor([-11.5])
    loss, _, _ = preference_loss(pi_w, pi_l, ref_w, ref_l, 0.1, "ipo", nll=2.0, n_w=torch.tensor([4]))
    assert loss.item() == pytest.approx((1.5 - 5.0) ** 2 + 5.0)
    loss.sum().backward()
    assert pi_w.grad.item() == pytest.approx(2 * (1.5 - 5.0) - 0.5)
    assert pi_l.grad.item() == pytest.approx(-2 * (1.5 - 5.0))
