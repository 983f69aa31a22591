"""A real multi-node Ray cluster on this machine: a head and worker nodes started with `ray start` on 127.0.0.1
(separate raylets), a smoke search through `--address`, the worker's raylet SIGKILLed while a trial runs on it, a
new worker joining, and every trial ending exactly once from its own folder.

The head offers no CPU (as on a real cluster, where the head does not train), so every trial runs on a worker
node (1 CPU, and a custom resource naming it). A test-only stall (`$CXR_SEARCH_FAULTS`) holds the first trial that
reaches epoch 2 after its first batch (STALL_S); the test kills the worker's raylet while that trial is held, whenever that
is, so where the kill lands does not depend on timing. Trial folders live on a local folder every node reaches
(one machine: the storage is shared; a real cluster needs shared storage or s3://, README "Running on a cluster").
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from cxr_search.experiment.folder import Experiment
from cxr_search.experiment.trials import trial_dirs, trial_end, trial_events

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = Path(__file__).with_name("ray_loopback.py")
pytestmark = pytest.mark.slow
# Every trial that reaches epoch 2 is held this long once (the fault is per trial folder); the test kills the node
# within a second of seeing the hold, and later trials pay it once each.
STALL_S = 20
TINY = """
name: tiny
metric: val_loss
mode: min
searcher: {type: optuna, seed: 0}
scheduler: {type: asha, max_t: 2, grace_period: 1, reduction_factor: 2}
num_samples: 3
max_concurrent_trials: 1
resources: {cpu: 1, gpu: 0}
data: {size: 32, n_images: 120}
trial: {backbone: cnn3, max_epochs: 2, patience: 3, device: cpu, batch_size: 16, augment: false}
params:
  lr: {loguniform: [1.0e-4, 1.0e-2]}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    """Ray nodes started with `ray start --block` on 127.0.0.1, each a process tree this object ends."""

    def __init__(self, root: Path):
        self.root = root
        token = root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env = {
            **os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "RAY_TMPDIR": str(root), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_USAGE_STATS_ENABLED": "0",
            # notice a dead node within seconds (defaults: tens of seconds)
            "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
        }
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen] = []
        self.logs = []

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
        self.logs.append(log)
        proc = subprocess.Popen([sys.executable, str(LAUNCHER), "start", "--block", "--node-ip-address=127.0.0.1",
                                 "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}", *args],
                                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(proc)
        return proc

    def start_head(self) -> None:
        self.wait_started(self._start("head", "--head", f"--port={self.port}", "--num-cpus=0",
                                      "--include-dashboard=false"))

    def add_worker(self, name: str) -> subprocess.Popen:
        return self._start(name, f"--address={self.address}", "--num-cpus=1", '--resources={"cxr_worker": 1}')

    def wait_started(self, node: subprocess.Popen, timeout: float = 120) -> None:
        """Until the node's `ray start` says its processes run (a worker: its raylet registered with the head)."""
        log = Path(self.logs[self.nodes.index(node)].name)
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in log.read_text():
            assert node.poll() is None, f"ray start ended: {self.tail()}"
            assert time.monotonic() < deadline, f"ray start did not finish in {timeout} s: {self.tail()}"
            time.sleep(0.5)

    @staticmethod
    def raylet_of(node: subprocess.Popen) -> psutil.Process:
        for child in psutil.Process(node.pid).children(recursive=True):
            if child.name() == "raylet":
                return child
        raise AssertionError("the node has no raylet")

    def tail(self) -> str:
        return "\n".join(p.read_text()[-1500:] for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        """End every process the nodes started (by id: each node's tree, then anything left under our temp dir)."""
        procs = []
        for node in self.nodes:
            try:
                procs += [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for p in psutil.process_iter(["cmdline"]):  # daemons a dead `ray start` left behind
            if p.pid != os.getpid() and any(str(self.root) in a for a in (p.info["cmdline"] or [])):
                procs.append(p)
        for p in procs:  # SIGKILL at once: some of Ray's processes wait out a SIGTERM for seconds
            with_suppress(p.kill)
        psutil.wait_procs(procs, timeout=10)
        for log in self.logs:
            log.close()


def with_suppress(fn, *args) -> None:
    try:
        fn(*args)
    except psutil.Error:
        pass


@pytest.fixture
def cluster():
    # A short path of its own: Ray's unix sockets live under it (108-byte limit), and its processes are found by it.
    root = Path(tempfile.mkdtemp(prefix="cxr-ray-", dir="/tmp"))
    c = LoopbackCluster(root)
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


held_marker = ".fault-stall-e0002"  # engine's once-per-folder marker of the stall at epoch 2


def _stalled(exp: Path) -> Path | None:
    hits = sorted(exp.glob(f"trial_*/{held_marker}"))
    return hits[0].parent if hits else None


def test_worker_node_killed_mid_trial_every_trial_finishes_once(cluster, tmp_path):
    cluster.start_head()
    first = cluster.add_worker("worker1")
    cluster.wait_started(first)

    space = tmp_path / "tiny.yaml"
    space.write_text(TINY)
    storage = tmp_path / "experiments"  # shared: every node is on this machine
    env = {**cluster.env, "PYTHONUNBUFFERED": "1",
           "CXR_SEARCH_FAULTS": json.dumps({"kind": "stall", "epoch": 2, "seconds": STALL_S})}
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115
    driver = subprocess.Popen(
        [sys.executable, "-m", "cxr_search.cli", "run", str(space), "--address", cluster.address,
         "--storage", str(storage), "--name", "multinode", "--stages", "search"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    exp = storage / "multinode"
    try:
        deadline = time.monotonic() + 300
        while (held := _stalled(exp)) is None:
            assert driver.poll() is None, f"driver ended before a trial reached epoch 2: {(tmp_path / 'driver.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no trial reached epoch 2 in 300 s"
            time.sleep(0.5)
        cluster.raylet_of(first).kill()  # SIGKILL: the node dies with the trial held on it
        cluster.add_worker("worker2")
        deadline = time.monotonic() + 400
        while (rc := driver.poll()) is None:
            assert time.monotonic() < deadline, "the search did not end within 400 s of the kill"
            for folder in exp.glob("trial_*"):  # the stall has done its work: later trials skip it (saves time
                (folder / held_marker).touch(exist_ok=True)  # only; a trial marked late is held once, no more)
            time.sleep(0.2)
    finally:
        if driver.poll() is None:
            driver.kill()
        log.close()
    output = (tmp_path / "driver.log").read_text()
    assert rc == 0, output[-4000:]

    plan = Experiment.open(exp)
    events = [json.loads(line) for line in (exp / "trials.jsonl").read_text().splitlines()]
    last = trial_events(exp)
    folders = {t.trial_id: t.path for t in trial_dirs(exp)}
    started = {e["trial_id"] for e in events if e["event"] == "start"}
    retried = [e["trial_id"] for e in events if e["event"] == "retry"]
    ended = {k for k, p in folders.items() if trial_end(p, last.get(k)) in ("finished", "stopped")}
    lost = started - ended
    print(f"\nmulti-node kill: trials started {len(started)}, retried {len(retried)}, finished {len(ended)}, "
          f"lost {len(lost)} (held trial {held.name})")

    assert plan.is_complete("search")
    n = plan.plan.space.num_samples
    assert len(folders) == n and started == set(folders) == ended, (started, folders, ended)
    assert not lost
    assert held.name.removeprefix("trial_") in retried  # the trial on the dead node was retried, not lost
    completes = [e["trial_id"] for e in events if e["event"] == "complete"]
    assert sorted(completes) == sorted(set(completes)) and set(completes) == ended  # each trial ended once
    history = [json.loads(line) for line in (held / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))  # continued from its folder, no repeat
