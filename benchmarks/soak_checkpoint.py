"""Soak test of checkpoints in graph mode: a long run, a kill in the middle, a resume, and memory over time.

Three processes train the same tiny MLP in graph mode (AdamW, a cosine schedule over the whole run, a
checkpoint every --every steps):
  straight   trains all --steps without stopping;
  killed     trains until it has passed --kill-at, then gets SIGKILL (wherever it is: stepping or saving);
  resumed    loads the last checkpoint the killed run left and trains on to --steps.
It reports each process's compiles (one each: a new process compiles again), its RSS after the first step and
at every checkpoint (growth would mean a leak per step or per save), its time per step, and how far the
resumed run's final parameters are from the straight run's.

Run:  python benchmarks/soak_checkpoint.py [--steps 2000] [--every 200] [--kill-at 1100] [--backend inductor]
                                            [--json FILE]
Not a test: it takes minutes (inductor compiles once per process). The machine may be shared: the load average
before and after is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

import dualmode as dm

POOL = 64  # distinct batches, cycled: batch i is POOL[i % 64], the same in every process


class MLPStep(dm.TrainGraph):
    def __init__(self, model, optimizer, scheduler, backend: str):
        config = dm.StepConfig()
        config.compile_options["backend"] = backend
        super().__init__(mode="graph", config=config)
        self.model = model
        self.loss_fn = nn.CrossEntropyLoss()
        self.add_optimizer(optimizer, lr_sch=scheduler)

    def build(self, x, y):
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        return loss


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_step(steps: int, backend: str) -> MLPStep:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    groups = dm.param_groups(model, [{"params": "0.*", "lr_scale": 0.5}, {"params": "*.bias", "weight_decay": 0.0}])
    optimizer = torch.optim.AdamW(groups, lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    return MLPStep(model, optimizer, scheduler, backend)


def child(args) -> None:
    """One training process; prints 'step N' as it goes and a JSON report at the end."""
    rss_start = rss_mib()
    g = torch.Generator().manual_seed(1)
    pool = [(torch.randn(32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(POOL)]
    step = make_step(args.steps, args.backend)
    path = os.path.join(args.folder, "soak.ckpt")
    start = dm.load_checkpoint(path, step)["done"] if args.role == "resumed" else 0
    rss, save_s, begin = [], [], time.perf_counter()
    first_s = None
    for i in range(start, args.steps):
        t = time.perf_counter()
        step(*pool[i % POOL])
        if first_s is None:
            first_s = time.perf_counter() - t
            rss.append([i + 1, round(rss_mib(), 1)])
        if (i + 1) % args.every == 0:
            t = time.perf_counter()
            dm.save_checkpoint(path, step, done=i + 1)
            save_s.append(time.perf_counter() - t)
            rss.append([i + 1, round(rss_mib(), 1)])
        print(f"step {i + 1}", flush=True)
    total = time.perf_counter() - begin
    params = torch.cat([p.detach().flatten() for p in step.model.parameters()])
    torch.save(params, os.path.join(args.folder, f"{args.role}.params.pt"))
    print(json.dumps({
        "role": args.role, "started_at_step": start, "steps_run": args.steps - start,
        "compiles": step.compile_count, "first_call_s": round(first_s, 2),
        "ms_per_step_after_first": round(1000 * (total - first_s - sum(save_s)) / max(1, args.steps - start - 1), 3),
        "save_ms_median": round(1000 * sorted(save_s)[len(save_s) // 2], 2) if save_s else None,
        "rss_mib_process_start": round(rss_start, 1), "rss_mib_by_step": rss,
        "final_lr": step.optimizer.param_groups[0]["lr"], "step_count": step.step_count,
    }), flush=True)


def spawn(args, role: str, folder: str) -> subprocess.Popen:
    command = [sys.executable, os.path.abspath(__file__), "--child", role, "--folder", folder,
               "--steps", str(args.steps), "--every", str(args.every), "--backend", args.backend]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float) -> dict:
    out, _ = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise SystemExit(f"a soak process failed (exit {process.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def parent(args) -> dict:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as straight_dir, tempfile.TemporaryDirectory() as split_dir:
        straight = finish(spawn(args, "straight", straight_dir), args.timeout)
        killed = spawn(args, "killed", split_dir)
        deadline, last = time.monotonic() + args.timeout, 0
        for line in killed.stdout:
            last = int(line.split()[1])
            if last >= args.kill_at or time.monotonic() > deadline:
                break
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
        killed.stdout.close()
        resumed = finish(spawn(args, "resumed", split_dir), args.timeout)
        a = torch.load(os.path.join(straight_dir, "straight.params.pt"), weights_only=True)
        b = torch.load(os.path.join(split_dir, "resumed.params.pt"), weights_only=True)
    return {
        "schema": "dualmode-soak-checkpoint/1",
        "command": "python benchmarks/soak_checkpoint.py " + " ".join(sys.argv[1:]),
        "settings": {"steps": args.steps, "every": args.every, "kill_at": args.kill_at, "backend": args.backend,
                     "model": "MLP 32-64-64-10, batch 32, AdamW, CosineAnnealingLR(T_max=steps), 2 groups"},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "dualmode": dm.__version__,
                    "cpus": os.cpu_count(), "load_average_before": load_before,
                    "load_average_after": os.getloadavg()},
        "killed": {"killed_after_step_line": last, "exit": killed.returncode},
        "straight": straight, "resumed": resumed,
        "resumed_vs_straight_max_abs_diff": float((a - b).abs().max()),
        "bitwise_equal": bool(torch.equal(a, b)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--kill-at", type=int, default=1100)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per process")
    parser.add_argument("--json", metavar="FILE", help="also write the report to FILE")
    parser.add_argument("--child", choices=("straight", "killed", "resumed"), dest="role", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        child(args)
        return
    report = parent(args)
    print(summary(report))
    if args.json:
        with open(args.json, "w") as file:
            file.write(json.dumps(report, indent=1) + "\n")


def summary(report: dict) -> str:
    lines = [f"{report['settings']['model']}; backend {report['settings']['backend']}; load average "
             f"{report['machine']['load_average_before'][0]:.2f} -> {report['machine']['load_average_after'][0]:.2f}"
             " (the machine is shared)"]
    for role in ("straight", "resumed"):
        r = report[role]
        rss = r["rss_mib_by_step"]
        lines.append(f"{role:9} steps {r['started_at_step']}-{r['step_count']}: {r['compiles']} compile(s), first call "
                     f"{r['first_call_s']} s, {r['ms_per_step_after_first']} ms/step, save {r['save_ms_median']} ms, "
                     f"RSS {rss[0][1]} MiB after step {rss[0][0]} -> {rss[-1][1]} MiB after step {rss[-1][0]}")
    lines.append(f"killed with SIGKILL after step {report['killed']['killed_after_step_line']}; resumed from step "
                 f"{report['resumed']['started_at_step']}; final parameters vs the straight run: max |diff| "
                 f"{report['resumed_vs_straight_max_abs_diff']:.3g} (bitwise equal: {report['bitwise_equal']})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
