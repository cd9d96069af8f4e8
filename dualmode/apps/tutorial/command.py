"""`dualmode tutorial`: OneFlow's layer-wise learning-rate tutorial (MobileNetV2), in eager and graph mode.

Eager mode uses the tutorial's absolute per-group lrs and its per-group decay every 10 batches; graph mode its
`lr_scale` per group, baked into one compiled step. `--mode both` trains each from the same initial weights and
seed and prints a summary side by side; `--checkpoint DIR` saves every N steps and resumes when restarted
(resume.py). The training code is in train.py, the output in
progress.py and report.py. See docs/tutorial.md.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import io
import math
import os
import sys

import torch

import dualmode as dm
from dualmode.apps.data import load_dataset
from dualmode.apps.launch import Launch
from dualmode.apps.tutorial.evaluate import evaluate
from dualmode.apps.tutorial.progress import Console
from dualmode.apps.tutorial.report import plot_losses, summary_table
from dualmode.apps.tutorial.resume import ResumeError
from dualmode.apps.tutorial.train import TutorialSettings, train, tutorial_model

NAME = "tutorial"
HELP = ("OneFlow's layer-wise learning-rate tutorial: MobileNetV2 with per-group lrs (eager mode) or lr_scale "
        "(graph mode), on CIFAR-10 or the built-in digits.")

# Chosen by measurement on the built-in digits, 2 shared cores: see docs/tutorial.md.
DEFAULT_LR = 0.1
DEFAULT_MOMENTUM = 0.0
DEFAULT_EPOCHS = 3
DEFAULT_WIDTH_MULT = 1.0
DEFAULT_BATCH_SIZE = 64  # the tutorial's BATCH_SIZE
DEFAULT_DECAY_EVERY = 10  # the tutorial decays the lrs every 10 batches
DEFAULT_BN_BATCHES = 16
DEFAULT_CHECKPOINT_EVERY = 50


def _number(convert, least, *, inclusive: bool = True, below=None):
    """An argparse type: `convert(text)`, finite, at least `least` (or above it), below `below` if given."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if convert is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if value < least or (not inclusive and value == least):
            raise argparse.ArgumentTypeError(f"must be {'at least' if inclusive else 'above'} {least}, got {text}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"must be below {below}, got {text}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `dualmode tutorial`."""
    parser.add_argument("--mode", choices=("eager", "graph", "both"), default="both",
                        help="eager: the tutorial's per-group lrs and decay; graph: its lr_scale, compiled; "
                             "both: eager then graph from the same initial weights, and a summary (default: both)")
    parser.add_argument("--data", metavar="DIR", default=None,
                        help="directory with CIFAR-10 (cifar-10-python.tar.gz or cifar-10-batches-py/); "
                             "default: the built-in digits (scikit-learn, no download)")
    parser.add_argument("--epochs", type=_number(int, 1), default=DEFAULT_EPOCHS, metavar="N",
                        help=f"passes over the training set (default: {DEFAULT_EPOCHS}; the tutorial: 1 on CIFAR-10)")
    parser.add_argument("--max-steps", type=_number(int, 1), default=None, metavar="N",
                        help="stop each mode after N steps (default: no limit)")
    parser.add_argument("--batch-size", type=_number(int, 1), default=DEFAULT_BATCH_SIZE, metavar="N",
                        help=f"samples per step (default: {DEFAULT_BATCH_SIZE}, the tutorial's)")
    parser.add_argument("--lr", type=_number(float, 0.0, inclusive=False), default=DEFAULT_LR, metavar="X",
                        help="base lr: eager gives features / adaptive_avg_pool2d / classifier lr, lr/10, lr/100 "
                             "(the tutorial: 1e-3, 1e-4, 1e-5); graph trains each group at lr x lr_scale "
                             f"(default: {DEFAULT_LR}; the tutorial's 1e-3 barely moves in a minute)")
    parser.add_argument("--momentum", type=_number(float, 0.0, below=1.0), default=DEFAULT_MOMENTUM, metavar="X",
                        help=f"SGD momentum (default: {DEFAULT_MOMENTUM}, the tutorial's)")
    parser.add_argument("--width-mult", type=_number(float, 0.0, inclusive=False), default=DEFAULT_WIDTH_MULT,
                        metavar="X",
                        help=f"MobileNetV2 width multiplier (default: {DEFAULT_WIDTH_MULT}); 0.25 trains several "
                             "times faster, for quick checks")
    parser.add_argument("--decay-every", type=_number(int, 1), default=DEFAULT_DECAY_EVERY, metavar="N",
                        help="eager mode: multiply each group's lr by its lr_decay after batch 0, N, 2N, ... of "
                             f"each epoch (default: {DEFAULT_DECAY_EVERY}, the tutorial's)")
    parser.add_argument("--bn-batches", type=_number(int, 0), default=DEFAULT_BN_BATCHES, metavar="N",
                        help="before the held-out accuracy, re-estimate BatchNorm statistics on N training batches "
                             f"(default: {DEFAULT_BN_BATCHES}; 0: keep the running statistics from training)")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG of the loss against the step (needs matplotlib)")
    parser.add_argument("--backend", default="inductor", metavar="NAME",
                        help="torch.compile backend of graph mode (default: inductor; aot_eager skips the C++ "
                             "compile, for quick checks)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seed of the weights, dropout and shuffling (default: 0)")
    parser.add_argument("--checkpoint", metavar="DIR", default=None,
                        help="save each mode's run to DIR/<mode>.ckpt every --checkpoint-every steps and at its "
                             "end; when restarted with the same options, resume from there (see docs/checkpoints.md)")
    parser.add_argument("--checkpoint-every", type=_number(int, 1), default=DEFAULT_CHECKPOINT_EVERY, metavar="N",
                        help=f"steps between two checkpoints (default: {DEFAULT_CHECKPOINT_EVERY})")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="call dm.keep_freed_memory() first: glibc keeps freed memory, so each step reuses its "
                             "buffers instead of faulting in fresh pages (faster on a CPU; see docs/performance.md)")
    parser.add_argument("--trace-cache", action="store_true",
                        help="graph mode saves its traced step, and a restarted run loads it instead of tracing "
                             "again (config.trace_cache; see docs/modes.md)")


def _fail(message: str) -> int:
    print(f"dualmode tutorial: error: {message}", file=sys.stderr)
    return 2


def _check_plot_path(path: str | None) -> str | None:
    """Why --plot cannot be written (None if it can), checked before minutes of training."""
    if path is None:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"--plot {path}: the folder {folder} does not exist"
    if importlib.util.find_spec("matplotlib") is None:
        return f"--plot {path}: matplotlib is not installed (pip install 'dualmode[tutorial]')"
    return None


def _check_backend(backend: str | None) -> str | None:
    """Why graph mode cannot compile with --backend (None if it can), checked before eager mode trains."""
    if backend is None:
        return None
    if backend not in torch.compiler.list_backends(exclude_tags=()):
        usual = ["eager", "aot_eager"] + torch.compiler.list_backends()
        return f"--backend {backend!r} is not a torch.compile backend; try one of {', '.join(usual)}"
    return None


def _check_checkpoint_folder(folder: str | None) -> str | None:
    """Why --checkpoint cannot be used (None if it can); creates the folder if its parent exists."""
    if folder is None:
        return None
    if os.path.exists(folder) and not os.path.isdir(folder):
        return f"--checkpoint {folder}: not a folder"
    parent = os.path.dirname(os.path.abspath(folder))
    if not os.path.isdir(parent):
        return f"--checkpoint {folder}: the folder {parent} does not exist"
    os.makedirs(folder, exist_ok=True)
    return None


def run(args: argparse.Namespace) -> int:
    """Train in the chosen mode(s), print the tutorial's output and a summary; write --plot.

    Under torchrun every rank trains its shard of each global batch; rank 0 alone prints, evaluates and plots.
    """
    with Launch.from_env() as launch:
        return _run(args, launch)


def _run(args: argparse.Namespace, launch: Launch) -> int:
    modes = ("eager", "graph") if args.mode == "both" else (args.mode,)
    settings = TutorialSettings(lr=args.lr, momentum=args.momentum, batch_size=args.batch_size,
                                epochs=args.epochs, max_steps=args.max_steps, width_mult=args.width_mult,
                                decay_every=args.decay_every, seed=args.seed, backend=args.backend,
                                bn_batches=args.bn_batches, checkpoint=args.checkpoint,
                                checkpoint_every=args.checkpoint_every, trace_cache=args.trace_cache)
    problem = (_check_plot_path(args.plot) or _check_backend(args.backend if "graph" in modes else None)
               or _check_checkpoint_folder(args.checkpoint))
    if problem:
        return _fail(problem)
    if args.keep_freed_memory and not dm.keep_freed_memory():
        return _fail("--keep-freed-memory: malloc was left as it is (the warning above says why)")
    try:
        train_data = load_dataset(args.data, train=True)
        test_data = load_dataset(args.data, train=False)
    except (FileNotFoundError, ValueError, ImportError) as error:
        return _fail(f"--data {args.data}: {error}" if args.data else str(error))
    try:
        launch.shard_size(settings.batch_size)
    except ValueError as error:
        return _fail(str(error))
    if "graph" in modes and settings.batch_size > len(train_data) // launch.world * launch.world:
        return _fail(f"--batch-size {settings.batch_size} is larger than the {len(train_data)} training images: "
                     "graph mode drops the last short batch (a new shape would recompile), so no step would run")

    console = Console() if launch.main else Console(io.StringIO(), io.StringIO())  # only rank 0 speaks
    ranks = (f"; {launch.world} processes (torchrun), {settings.batch_size // launch.world} images of each batch "
             "per process" if launch.distributed else "")
    console.say(f"Using cpu device ({torch.get_num_threads()} threads{ranks})\n"
                f"data: {train_data.name}; held out: {len(test_data)} images\n"
                f"model: MobileNetV2, width_mult {settings.width_mult}; SGD, base lr {settings.lr}, momentum "
                f"{settings.momentum}; batch size {settings.batch_size}; {settings.epochs} epoch(s)"
                + (f", at most {settings.max_steps} steps" if settings.max_steps else "")
                + ("; freed memory kept (dm.keep_freed_memory)" if args.keep_freed_memory else ""))
    torch.manual_seed(settings.seed)
    initial = copy.deepcopy(tutorial_model(len(train_data.classes), settings.width_mult).state_dict())
    results = []
    for mode in modes:
        model = tutorial_model(len(train_data.classes), settings.width_mult)
        model.load_state_dict(initial)
        torch.manual_seed(settings.seed)  # the same seed for dropout in every mode
        try:
            result = train(mode, model, train_data, settings, console, launch)
        except ResumeError as error:
            return _fail(f"--checkpoint {args.checkpoint}: {error}")
        if launch.main:  # the ranks' weights are equal; rank 0's BatchNorm statistics are DDP's reference
            evaluate(model, train_data, test_data, settings, result, console.say)
        results.append(result)
    if not launch.main:
        return 0

    console.say("\n=== summary ===\n" + summary_table(results))
    if args.plot:
        data_name = train_data.name.split(" (")[0].removesuffix(" train")
        title = f"MobileNetV2 (width {settings.width_mult}) on {data_name}: training loss per step"
        plot_losses(results, args.plot, title)
        console.say(f"loss plot written to {args.plot}")
    return 0
