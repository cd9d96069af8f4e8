"""Per-layer learning rates in four rules, and what describe() shows.

fc2.bias trains at 20 x lr without weight decay, every other bias at 2 x lr without weight decay, fc2.weight
at 10 x lr, everything else at 1 x lr. Run it with:

    python examples/param_groups_basics.py
"""

import torch
from torch import nn

import dualmode as dm


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(64, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def main():
    torch.manual_seed(0)
    model = Net()
    groups = dm.param_groups(model, [
        {"params": "fc2.bias", "lr_scale": 20.0, "weight_decay": 0.0},  # first match wins: specific first
        {"params": "*.bias", "lr_scale": 2.0, "weight_decay": 0.0},
        {"params": "fc2.weight", "lr_scale": 10.0},
        {"params": "*"},
    ])
    optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9, weight_decay=5e-4)
    print(dm.describe(optimizer, model=model))

    # A dm.TrainGraph updates each group with lr x lr_scale (the "effective lr" column). A plain
    # optimizer.step() reads group["lr"] only: without a TrainGraph, give each rule an absolute "lr" instead.

    # The classic mistake is caught: a tensor that is not a parameter of the model.
    try:
        dm.param_groups(model, [{"params": torch.randn(3, 64, 64), "lr": 0.1}])
    except ValueError as error:
        print(f"ValueError: {error}")


if __name__ == "__main__":
    main()
