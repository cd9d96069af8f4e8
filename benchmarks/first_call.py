"""Where one bench variant's first call goes, in a process of its own: the first call, the second, and explain()'s
split of the first (trace, AOTAutograd, inductor; and with config.trace_cache whether the trace was loaded).

Like `dualmode bench`'s worker: 2 threads (the cores here), inductor imported before the clock starts.
`--cold` gives the process an empty inductor cache directory of its own.

Run:  python benchmarks/first_call.py [--variant graph|graph-saved-trace|...] [--model mobilenet_v2] [--batch-size 64]
      [--cold]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="graph")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cold", action="store_true", help="an empty inductor cache directory")
    args = parser.parse_args()
    if args.cold:  # before torch reads it
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="dualmode-first-call-")

    import torch

    from dualmode.apps.bench.variants import VARIANTS, BenchSettings, make_batch
    from dualmode.apps.bench.worker import _load_lazily_loaded_parts

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    _load_lazily_loaded_parts(torch)
    settings = BenchSettings(model=args.model, batch_size=args.batch_size)
    step, batch = VARIANTS[args.variant].make(settings), make_batch(settings)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        step(*batch)
        times.append(time.perf_counter() - start)
    print(f"{args.variant}, {args.model} b{args.batch_size}, {'cold' if args.cold else 'warm'} cache: first call "
          f"{times[0]:.2f} s, second {times[1]:.2f} s")
    explain = getattr(step, "explain", None)
    if explain is not None:
        print("\n".join(line.strip() for line in str(explain()).splitlines()
                        if line.strip().startswith(("first call:", "trace:"))))


if __name__ == "__main__":
    main()
