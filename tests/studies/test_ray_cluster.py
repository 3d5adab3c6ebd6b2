"""A real two-node Ray cluster on this machine (`ray start --head` and a second `ray start --address`, loopback only,
one CPU each, separate temporary directories): a study runs on it with `--address`, the second node's raylet is
`kill -9`ed while it runs a trial, the study ends with that trial marked failed, the rerun resumes it from its
checkpoint, and no finished trial's files are touched. Every Ray process this test started is killed at the end.

`ray stop` is not used: it stops every Ray process of the machine (other users' included); the test kills its own
nodes' processes instead (every one inherits a marker in its environment) and checks that none is left.
Skipped without Ray (CI installs the `ray` extra, so it runs there) and off Linux (it reads `/proc`).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.studies.conftest import OVERRIDES, write_study

pytest.importorskip("ray.tune")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find Ray's processes")

ROOT = Path(__file__).resolve().parents[2]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = _parent(pid)
    return False


def _processes_of(marker: str) -> set[int]:
    """Every process started for our nodes: they all inherit ``LP_RAY_CLUSTER_TEST=<marker>`` in their environment
    (Ray renames its processes, ``ray::IDLE``, so their command lines do not say whose they are)."""
    needle = f"LP_RAY_CLUSTER_TEST={marker}".encode()
    found = set()
    for pid in _pids():
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.add(pid)
        except OSError:
            pass
    return found - {os.getpid()}


def _kill_nodes(marker: str) -> set[int]:
    for _ in range(3):
        for pid in _processes_of(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.5)
    alive = set()
    for pid in _processes_of(marker):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":  # a zombie is dead, waiting for its parent to reap it
            alive.add(pid)
    return alive


def _node_args(temp_dir: str) -> list[str]:
    ports = _free_ports(7)
    base = random.randint(20000, 59000)
    return ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--temp-dir", temp_dir, "--disable-usage-stats",
            "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
            "--dashboard-agent-listen-port", str(ports[2]), "--dashboard-agent-grpc-port", str(ports[3]),
            "--runtime-env-agent-port", str(ports[4]), "--metrics-export-port", str(ports[5]),
            "--min-worker-port", str(base), "--max-worker-port", str(base + 60)], ports


def _ray_start(args: list[str], env: dict[str, str]) -> None:
    done = subprocess.run([*RAY, "start", *args], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"ray start {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def _raylet_of(temp_dir: str) -> int:
    found = [pid for pid in _pids() if "raylet" in _cmdline(pid).split(" ", 1)[0] and temp_dir in _cmdline(pid)]
    assert len(found) == 1, found
    return found[0]


def _worker_pid(trial: Path) -> int | None:
    try:
        lines = [line for line in (trial / "fit.log").read_text().splitlines() if "long-lived worker, pid" in line]
    except OSError:
        return None
    return int(lines[-1].rsplit("pid ", 1)[1]) if lines else None


def test_study_on_a_two_node_cluster_survives_a_killed_node(tmp_path):
    short = tempfile.mkdtemp(prefix="lpray", dir="/tmp")  # Ray's socket paths must stay short
    head_dir, node_dir = os.path.join(short, "h"), os.path.join(short, "n")
    # Token authentication with a token of our own (a real cluster's setting; `ray start --head` turns it on when
    # ~/.ray/auth_token exists, and then the second node needs the token too).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONWARNINGS": "ignore", "LP_RAY_CLUSTER_TEST": short,
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    overrides = {**OVERRIDES, "trainer.max_epochs": 3,
                 "trainer.callbacks": [{"class_path": "ModelCheckpoint", "init_args": {"save_last": True}},
                                       {"class_path": "tests.studies.faults.Slow", "init_args": {"seconds": 0.7}}]}
    config = write_study(tmp_path / "cluster.yaml", grid={"model.init_args.lr": [0.05, 0.2]}, seeds=[1, 2],
                         overrides=overrides, test=False)
    output = tmp_path / "out"
    study, log = None, None
    try:
        head_args, _ = _node_args(head_dir)
        (port,) = _free_ports(1)
        _ray_start(["--head", "--port", str(port), "--include-dashboard", "false",
                    "--ray-client-server-port", str(_free_ports(1)[0]), *head_args], env)
        address = f"127.0.0.1:{port}"
        node_args, _ = _node_args(node_dir)
        _ray_start(["--address", address, *node_args], env)
        raylet = _raylet_of(node_dir)
        command = [sys.executable, "-m", "lightning_probes.cli", "study", "--config", str(config), "--output",
                   str(output), "--engine", "ray", "--address", address, "--max_concurrent", "2", "--no_progress"]
        log = open(tmp_path / "study.log", "wb")  # noqa: SIM115 (closed in finally)
        study = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log, start_new_session=True)
        # Wait until a trial runs on the second node and has checkpointed its first epoch, then kill its raylet.
        victim, deadline = None, time.monotonic() + 400
        while victim is None:
            assert study.poll() is None, (tmp_path / "study.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial ran on the second node"
            for trial in sorted((output / "trials").glob("*")) if (output / "trials").exists() else []:
                pid = _worker_pid(trial)
                if (pid and _descends_from(pid, raylet) and (trial / "checkpoints" / "last.ckpt").exists()
                        and not (trial / "status.json").exists()):
                    victim = trial
                    break
            time.sleep(0.2)
        os.kill(raylet, signal.SIGKILL)
        assert study.wait(timeout=600) == 1, (tmp_path / "study.log").read_text()[-3000:]
        statuses = {t.name: json.loads((t / "status.json").read_text()) for t in (output / "trials").iterdir()}
        assert len(statuses) == 4
        assert statuses[victim.name]["status"] == "failed", statuses[victim.name]
        assert "rerun the study to resume it" in statuses[victim.name]["error"]
        finished = [name for name, s in statuses.items() if s["status"] == "finished"]
        logs = {n: (output / "trials" / n / "fit.log").read_text()[-3000:] for n in statuses if n not in finished}
        assert set(finished) | {victim.name} == set(statuses), logs  # only the lost trial failed
        before = {p: (p.stat().st_size, p.stat().st_mtime_ns)
                  for name in finished for p in (output / "trials" / name).rglob("*") if p.is_file()}

        rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr.decode()[-3000:]
        status = json.loads((victim / "status.json").read_text())
        assert status["status"] == "finished" and status["resumed"], status
        after = {p: (p.stat().st_size, p.stat().st_mtime_ns)
                 for name in finished for p in (output / "trials" / name).rglob("*") if p.is_file()}
        assert after == before  # no finished trial's file lost, added or rewritten
        from lightning_probes.reading import read_epoch_metrics

        for name in statuses:
            epochs = read_epoch_metrics(str(output / "trials" / name))
            assert list(epochs.index) == [0, 1, 2] and epochs["val/acc"].notna().all(), name  # every epoch once
        summary = json.loads((output / "summary.json").read_text())
        assert summary["n_finished"] == 4 and summary["n_failed"] == 0
    finally:
        if log is not None:
            log.close()
        if study is not None and study.poll() is None:
            os.killpg(study.pid, signal.SIGKILL)
            study.wait()
        left = _kill_nodes(short)
        assert not left, f"Ray processes left running: {left}"
