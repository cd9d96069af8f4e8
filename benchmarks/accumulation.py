"""Gradient accumulation in graph mode: compiles, the first window (which compiles) and the fastest micro-steps.

MLP 3072-512-512-10, batch 64, SGD with momentum, k = 4 (K=...), inductor; STATIC=1 sets dynamic_batch=False.
Run it with an empty TORCHINDUCTOR_CACHE_DIR for a cold first window, e.g.
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/accumulation.py
"""
import os
import time

import torch
import dualmode as dm
from dualmode.apps.models import mlp
from torch.nn import functional as F
torch.manual_seed(0)
class S(dm.TrainGraph):
    def __init__(self, m, o, c):
        super().__init__(mode="graph", config=c); self.model = m; self.add_optimizer(o)
    def build(self, x, y):
        l = F.cross_entropy(self.model(x), y); l.backward(); return l
m = mlp(hidden=512, num_classes=10)
step = S(m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), dm.StepConfig(grad_accumulation_steps=int(os.environ.get("K", 4)), **({"dynamic_batch": False} if os.environ.get("STATIC") else {})))
x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
t = time.perf_counter()
for _ in range(4): step(x, y)
first = time.perf_counter() - t
times = {0: [], 3: []}
for i in range(40):
    t = time.perf_counter(); step(x, y); d = time.perf_counter() - t
    if i % 4 in times: times[i % 4].append(d * 1000)
print(f"compiles {step.compile_count}; first window (compile) {first:.1f} s; micro-step min {min(times[0]):.2f} ms, apply min {min(times[3]):.2f} ms")
