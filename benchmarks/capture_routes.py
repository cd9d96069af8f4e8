"""Which way of compiling a whole training step works best on this torch: graphs, breaks, compile and step time.

Routes, each on the same model, data and SGD-with-momentum update:
  dualmode        make_fx traces forward, backward and update into one GraphModule; torch.compile(fullgraph=True)
  compile-fn      torch.compile of a function doing forward, loss.backward(), opt.step(), opt.zero_grad()
  compiled-ag     the same with torch._dynamo.config.compiled_autograd = True
  torch-func      torch.func.functional_call + torch.func.grad, update as tensor code, fullgraph=True
  compile-model   torch.compile(model), eager backward and optimizer step
  eager           no compile (the reference)

Run:  python benchmarks/capture_routes.py [--model mlp|shared] [--steps 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn
from torch._dynamo.utils import counters

import dualmode as dm
from dualmode.apps.models import mlp

LR, MOMENTUM = 0.01, 0.9


class SharedMLP(nn.Module):
    """An MLP with one block reached under two names (`block` and `again`), applied twice."""

    def __init__(self, width=512):
        super().__init__()
        self.inp = nn.Linear(3072, width)
        self.block = nn.Linear(width, width)
        self.again = self.block
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        h = torch.relu(self.inp(x.flatten(1)))
        return self.head(torch.relu(self.again(torch.relu(self.block(h)))))


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return mlp()
    return SharedMLP()


class Step(dm.TrainGraph):
    def __init__(self, model, optimizer):
        super().__init__(mode="graph")
        self.model = model
        self.add_optimizer(optimizer)

    def build(self, x, y):
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        return loss


def route_dualmode(model):
    step = Step(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
    return step


def route_compile_fn(model, compiled_autograd=False):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def train_step(x, y):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    compiled = torch.compile(train_step)
    if not compiled_autograd:
        return compiled

    def with_compiled_autograd(x, y):
        with torch._dynamo.config.patch(compiled_autograd=True):
            return compiled(x, y)

    return with_compiled_autograd


def route_torch_func(model):
    params = {n: p.detach() for n, p in model.named_parameters()}
    bufs = {n: torch.zeros_like(p) for n, p in params.items()}

    def loss_of(p, x, y):
        return nn.functional.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    @torch.compile(fullgraph=True)
    def train_step(x, y):
        grads, loss = torch.func.grad_and_value(loss_of)(params, x, y)
        for n, g in grads.items():
            bufs[n].mul_(MOMENTUM).add_(g)
            params[n].sub_(LR * bufs[n])
        return loss

    return train_step


def route_compile_model(model):
    compiled = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, foreach=True)

    def train_step(x, y):
        loss = nn.functional.cross_entropy(compiled(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    return train_step


def route_eager(model):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, foreach=True)

    def train_step(x, y):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    return train_step


ROUTES = {
    "dualmode": route_dualmode,
    "compile-fn": route_compile_fn,
    "compiled-ag": lambda m: route_compile_fn(m, compiled_autograd=True),
    "torch-func": route_torch_func,
    "compile-model": route_compile_model,
    "eager": route_eager,
}


def measure(route: str, model_name: str, steps: int, batch: int) -> dict:
    torch._dynamo.reset()
    counters.clear()
    model = make_model(model_name)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    result = {"route": route}
    try:
        step = ROUTES[route](model)
        start = time.perf_counter()
        step(x, y)
        result["first_call_s"] = time.perf_counter() - start
        step(x, y)  # a second call shows a recompile, if the route has one
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step(x, y)
            times.append(time.perf_counter() - start)
        result["median_ms"] = 1000 * statistics.median(times)
        result["graphs"] = counters["stats"]["unique_graphs"]
        result["graph_breaks"] = sum(counters["graph_break"].values())
        result["break_reasons"] = sorted({k.splitlines()[0][:100] for k in counters["graph_break"]})
        result["frames_compiled"] = counters["stats"]["calls_captured"]
    except Exception as error:  # a route that fails on this torch is a finding, not a crash
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        result["error"] = f"{type(error).__name__}: {' / '.join(lines[:2])[:300]}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "shared"], default="mlp")
    parser.add_argument("--routes", nargs="+", default=list(ROUTES), choices=list(ROUTES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    results = []
    for route in args.routes:
        r = measure(route, args.model, args.steps, args.batch_size)
        results.append(r)
        if "error" in r:
            print(f"{route:14s} FAILED {r['error']}", flush=True)
        else:
            print(f"{route:14s} graphs {r['graphs']:2d}  breaks {r['graph_breaks']:2d}  first call "
                  f"{r['first_call_s']:7.2f} s  step {r['median_ms']:8.2f} ms  {'; '.join(r['break_reasons'])}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "batch_size": args.batch_size, "torch": torch.__version__,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
