import os
import sys

# The shared step fixtures in tests/steps.py are imported as a plain module.
sys.path.insert(0, os.path.dirname(__file__))


# ---- param_groups tests (tests/test_groups*.py) ----
import collections  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


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
