"""The pieces of ppo and grpo against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from shitate.train.rl import clipped_policy_loss, clipped_value_loss, gae, group_advantages, kl_estimate


def test_kl_estimates_by_hand():
    logp, reference = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert kl_estimate(logp, reference).tolist() == pytest.approx([0.5, -1.0])
    # k3 = exp(ref − logp) − (ref − logp) − 1: exp(−0.5) + 0.5 − 1 and exp(1) − 1 − 1
    assert kl_estimate(logp, reference, "k3").tolist() == pytest.approx([math.exp(-0.5) - 0.5, math.e - 2])


def test_gae_by_hand():
    rewards, values = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.5, 0.6, 0.7])
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.7                      # last token: no value after it
    d1 = 0.0 + 0.9 * 0.7 - 0.6
    d0 = 0.0 + 0.9 * 0.6 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    advantages, returns = gae(rewards, values, gamma, lam)
    assert advantages.tolist() == pytest.approx([a0, a1, a2])
    assert returns.tolist() == pytest.approx([a0 + 0.5, a1 + 0.6, a2 + 0.7])


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(3)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1]))  # ratios 1.5, 0.5, 1.1
    advantages = torch.tensor([1.0, 1.0, -2.0])
    # ratio 1.5, A=1: max(−1.5, −1.2) = −1.2 (clipped: no gain past 1+ε)
    # ratio 0.5, A=1: max(−0.5, −0.8) = −0.5 (unclipped: the pessimistic side)
    # ratio 1.1, A=−2: max(2.2, 2.2) = 2.2
    assert clipped_policy_loss(logp, old, advantages, 0.2).tolist() == pytest.approx([-1.2, -0.5, 2.2])


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.0]), torch.tensor([0.0, 0.1])
    # first: unclipped (1 − 0)² = 1; clipped 0.5 + 0.2 = 0.7 → 0.49; max → 1, halved 0.5
    # second: unclipped 0.01; clipped 0.0 → 0.01; halved 0.005
    assert clipped_value_loss(values, old, returns, 0.2).tolist() == pytest.approx([0.5, 0.005])


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    advantages = group_advantages(rewards, group=3, eps=0.0 + 1e-12)
    spread = math.sqrt(((1 - 1 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # sample standard deviation, as torch.std
    assert advantages[:3].tolist() == pytest.approx([(2 / 3) / spread, -(1 / 3) / spread, -(1 / 3) / spread])
    assert advantages[3:].tolist() == pytest.approx([0.0, 0.0, 0.0])  # a group that all agrees teaches nothing
