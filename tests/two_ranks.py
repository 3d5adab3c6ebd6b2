"""The launcher and the exit shared by the two-process test scripts (``tests/*_run.py``): two gloo ranks of one
script on a free loopback port, each leaving without the interpreter's teardown."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def launch_two_ranks(script: str, out: str, rank_variable: str) -> int:
    """Run ``script out`` as ranks 0 and 1 (``rank_variable`` set to the rank); the worst exit code."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    children = []
    for rank in (0, 1):
        env = {**os.environ, rank_variable: str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0"}
        children.append(subprocess.Popen([sys.executable, os.path.abspath(script), out], env=env))
    codes = [child.wait() for child in children]
    return max(abs(c) for c in codes)


def leave_rank() -> None:
    """End a rank: a barrier, the process group destroyed, and out without the interpreter's teardown (gloo's
    threads torn down by it abort a rank now and then, "terminate called without an active exception", after
    everything is written)."""
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
