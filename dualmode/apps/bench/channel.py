"""The parent's end of a variant's worker process (worker.py): start it, send commands, read the replies."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from dualmode.apps.bench.variants import BenchSettings


class WorkerError(RuntimeError):
    """A variant's worker process failed; the message names the variant."""


class Worker:
    """The parent's end of one variant's worker process."""

    def __init__(self, name: str, settings: BenchSettings, threads: int, cache_dir: str | None):
        self.name = name
        env = dict(os.environ)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        if cache_dir is not None:
            env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dualmode.apps.bench.worker", name, json.dumps(vars(settings)), str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, command: str | None) -> dict:
        """Send a command (None: only read the next reply) and return the reply; WorkerError on failure."""
        if command is not None:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise WorkerError(f"variant {self.name!r}: its worker process exited (code {code}) during {command!r}")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(f"variant {self.name!r}, {command or 'start'}: {reply['error']}")
        return reply

    def close(self) -> None:
        """End the worker (closing its stdin tells it to exit) and close the pipes."""
        try:
            self.process.stdin.close()
        except OSError:  # the worker is gone already
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
