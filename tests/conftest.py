"""Fixtures shared by the test folders (groups/, step/, graph/, apps/); step helpers are in tests/steps.py."""

import collections

import pytest
import torch
from torch import nn


@pytest.fixture
def seed_net():
    """conv1, bn1, fc1, fc2 as in the classic per-layer lr notes; input (N, 1, 6, 6)."""
    torch.manual_seed(0)
    return nn.Sequential(collections.OrderedDict(
        conv1=nn.Conv2d(1, 4, 3), bn1=nn.BatchNorm2d(4), relu1=nn.ReLU(), flat=nn.Flatten(),
        fc1=nn.Linear(64, 8), relu2=nn.ReLU(), fc2=nn.Linear(8, 3)))


@pytest.fixture
def tied_net():
    """An output layer tied to the embedding: one Parameter named 'embed.weight' and 'head.weight'."""
    torch.manual_seed(0)
    net = nn.Sequential(collections.OrderedDict(embed=nn.Embedding(10, 4), mid=nn.Linear(4, 4),
                                                head=nn.Linear(4, 10)))
    net.head.weight = net.embed.weight
    return net
