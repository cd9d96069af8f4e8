"""OneFlow's layer-wise learning-rate tutorial, eager mode, line by line in dualmode.

The tutorial ("如何分层设置学习率", section "Eager模式") trains MobileNetV2 on CIFAR-10 with one lr per part of
the network, and decays each part's lr by its own factor every 10 batches. The numbered comments follow its steps.
Two differences: the decay factor is called `lr_decay` here (the tutorial calls it `lr_scale`, which in dualmode
means "effective lr = lr x lr_scale"), and the tutorial's typo `model.classifer` is fixed. Run:

    python examples/oneflow_tutorial_eager.py                   # the built-in digits, one epoch
    python examples/oneflow_tutorial_eager.py --data ~/cifar10  # CIFAR-10 from a local archive or folder
    python examples/oneflow_tutorial_eager.py --max-steps 5 --width-mult 0.25   # a quick check

`dualmode tutorial --mode eager` runs the same recipe with a progress bar, larger lrs and a summary.
"""

import argparse

import torch
import torch.nn as nn

import dualmode as dm
from dualmode.apps.data import load_dataset
from dualmode.apps.models import mobilenet_v2

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", metavar="DIR", help="CIFAR-10 directory (default: the built-in digits)")
parser.add_argument("--max-steps", type=int, default=None, help="stop after this many batches")
parser.add_argument("--width-mult", type=float, default=1.0, help="MobileNetV2 width (default: 1.0)")
args = parser.parse_args()

# 1. Training settings and device.
BATCH_SIZE = 64
EPOCH_NUM = 1
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
print(f"Using {DEVICE} device")

# 2. The data set. The tutorial downloads CIFAR-10 with flowvision; dualmode reads a local copy, or uses the
#    built-in digits (already tensors, normalised: no transform needed).
training_data = load_dataset(args.data, train=True)
train_dataloader = torch.utils.data.DataLoader(training_data, BATCH_SIZE, shuffle=True)

# 3. MobileNetV2 with a 10-class classifier, and the loss. (The tutorial assigns `model.classifer`, a typo
#    that leaves the classifier unchanged; replacing `model.classifier` is what it meant.)
model = mobilenet_v2(width_mult=args.width_mult).to(DEVICE)
model.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(model.last_channel, 10)).to(DEVICE)
model.train()
loss_fn = nn.CrossEntropyLoss().to(DEVICE)

# 4. One group per part of the network, each with its lr and its decay factor. adaptive_avg_pool2d has no
#    parameters: dm.param_groups warns (UserWarning) and keeps the group, empty, as the tutorial has it.
param_groups = dm.param_groups(model, [
    {"params": model.features, "lr": 1e-3, "lr_decay": 0.9},
    {"params": model.adaptive_avg_pool2d, "lr": 1e-4, "lr_decay": 0.8},
    {"params": model.classifier, "lr": 1e-5, "lr_decay": 0.7},
])
optimizer = torch.optim.SGD(param_groups)  # each group brings its own lr
print(dm.describe(optimizer))


# 5. The per-group decay: each group's lr times its own factor.
def adjust_learning_rate(optimizer):
    for param_group in optimizer.param_groups:
        param_group["lr"] *= param_group["lr_decay"]


# 6. Training: the tutorial's loop, unchanged.
steps = 0
for t in range(EPOCH_NUM):
    print(f"Epoch {t+1}\n-------------------------------")
    size = len(train_dataloader.dataset)
    for batch, (x, y) in enumerate(train_dataloader):
        x = x.to(DEVICE)
        y = y.to(DEVICE)

        # Compute prediction error
        pred = model(x)
        loss = loss_fn(pred, y)

        # Backpropagation
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        current = batch * BATCH_SIZE
        if batch % 5 == 0:
            print(f"loss: {loss:>7f}  [{current:>5d}/{size:>5d}]")

        # Adjust the learning rate per 10 batches
        if batch % 10 == 0:
            adjust_learning_rate(optimizer)

        steps += 1
        if steps == args.max_steps:
            break

print("lr after training: " + ", ".join(f"{g['lr']:.3g}" for g in optimizer.param_groups))
