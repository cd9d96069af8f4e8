"""OneFlow's layer-wise learning-rate tutorial, graph mode, line by line in dualmode.

The tutorial ("如何分层设置学习率", section "Graph模式") gives each part of MobileNetV2 an `lr_scale` and
trains it with an `nn.Graph` whose `build()` runs forward and `loss.backward()`. In dualmode that graph is a
`dm.TrainGraph`: the first call traces forward, backward and the SGD update into one graph and compiles it
with torch.compile, with each group's effective lr = lr x lr_scale. The numbered comments follow the tutorial.
The first call compiles: minutes for MobileNetV2 on two CPU cores, seconds once inductor's cache holds it. Run:

    python examples/oneflow_tutorial_graph.py                   # the built-in digits, one epoch
    python examples/oneflow_tutorial_graph.py --data ~/cifar10  # CIFAR-10 from a local archive or folder
    python examples/oneflow_tutorial_graph.py --max-steps 3 --width-mult 0.25 --backend aot_eager  # quick check

`dualmode tutorial --mode graph` runs the same recipe with a progress bar, a larger lr and a summary.
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
parser.add_argument("--backend", default="inductor", help="torch.compile backend (default: inductor)")
args = parser.parse_args()

# 1. Settings, device and data. drop_last=True: a short last batch is a new input shape, which would compile
#    the step again (dualmode would warn with a RecompileWarning).
BATCH_SIZE = 64
EPOCH_NUM = 1
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
print(f"Using {DEVICE} device")

training_data = load_dataset(args.data, train=True)
train_dataloader = torch.utils.data.DataLoader(training_data, BATCH_SIZE, shuffle=True, drop_last=True)

# 2. The model (the tutorial's `model.classifer` typo fixed: the classifier is replaced) and the loss.
model = mobilenet_v2(width_mult=args.width_mult).to(DEVICE)
model.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(model.last_channel, 10)).to(DEVICE)
model.train()
loss_fn = nn.CrossEntropyLoss().to(DEVICE)

# 3. One lr for the optimizer and an lr_scale per group: each group trains at lr x lr_scale. The
#    adaptive_avg_pool2d group selects nothing (no parameters): dm.param_groups warns and keeps it empty.
param_groups = dm.param_groups(model, [
    {"params": model.features, "lr_scale": 0.9},
    {"params": model.adaptive_avg_pool2d, "lr_scale": 0.8},
    {"params": model.classifier, "lr_scale": 0.7},
])
optimizer = torch.optim.SGD(param_groups, lr=1e-3)


# 4. The graph: the tutorial's GraphMobileNetV2, with dm.TrainGraph in place of flow.nn.Graph.
class GraphMobileNetV2(dm.TrainGraph):
    def __init__(self):
        super().__init__()  # mode="graph"
        self.config.compile_options["backend"] = args.backend
        self.model = model
        self.loss_fn = loss_fn
        self.add_optimizer(optimizer)

    def build(self, x, y):
        y_pred = self.model(x)
        loss = self.loss_fn(y_pred, y)
        loss.backward()
        return loss


# 5. Training: each call is one step (forward, backward, update with lr x lr_scale); the first compiles.
graph_mobile_net_v2 = GraphMobileNetV2()
print(graph_mobile_net_v2)  # the groups, their lr_scale and effective lr

steps = 0
for t in range(EPOCH_NUM):
    print(f"Epoch {t+1}\n-------------------------------")
    size = len(train_dataloader.dataset)
    for batch, (x, y) in enumerate(train_dataloader):
        x = x.to(DEVICE)
        y = y.to(DEVICE)
        if graph_mobile_net_v2.compile_count == 0:
            print("compiling the step (first call) ...", flush=True)
        loss = graph_mobile_net_v2(x, y)
        current = batch * BATCH_SIZE
        if batch % 5 == 0:
            print(f"loss: {loss:>7f}  [{current:>5d}/{size:>5d}]")

        steps += 1
        if steps == args.max_steps:
            break

print(f"compiles: {graph_mobile_net_v2.compile_count}")
