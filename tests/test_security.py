"""Safe defaults: the local Ray listens on loopback only and refuses a client without its token; only our own
formats are loaded (no pickle from a folder or file a user hands us); `resume` refuses a folder it did not create.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_search.errors import CxrError
from cxr_search.experiment.results import read_predictions
from cxr_search.io.layout import PLAN_FILE
from cxr_search.training.model_folder import FORMAT_VERSION, RESUME_FILE, read_resume_state

REPO = Path(__file__).resolve().parents[1]

# A local Ray started the way `cxr-search run` starts it, with a task and an actor so that workers (and the agents
# the raylet starts) are up; it prints its listening sockets and GCS address, then waits for a line on stdin.
LOCAL_RAY = textwrap.dedent("""
    import json, sys, psutil, ray
    from cxr_search.tuning.cluster import init_ray
    init_ray(num_cpus=1)

    @ray.remote
    class Probe:
        def pid(self):
            return 0

    @ray.remote
    def task():
        return 1

    probe = Probe.remote()
    ray.get([task.remote(), probe.pid.remote()])
    me = psutil.Process()
    tree = {p.pid: p.name() for p in [me, *me.children(recursive=True)]}
    sockets = [(c.laddr.ip, c.laddr.port, tree[c.pid]) for c in psutil.net_connections("inet")
               if c.status == psutil.CONN_LISTEN and c.pid in tree]
    print(json.dumps({"sockets": sockets, "processes": len(tree),
                      "gcs": ray.get_runtime_context().gcs_address}), flush=True)
    sys.stdin.readline()
    ray.shutdown()
""")

# A client that joins a Ray by address on loopback; exits 0 only if it got in.
CLIENT = textwrap.dedent("""
    import sys, ray
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False  # keep 127.0.0.1 as given (see cxr_search.tuning.cluster)
    ray.init(address=sys.argv[1], logging_level="ERROR")
    print("JOINED", sum(n["Alive"] for n in ray.nodes()))
""")


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


@pytest.fixture(scope="module")
def local_ray():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", LOCAL_RAY], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line, "the local Ray did not start"
        yield json.loads(line), env
    finally:
        if proc.poll() is None:
            proc.stdin.write("\n")
            proc.stdin.flush()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.slow
def test_every_port_of_the_local_ray_is_on_loopback(local_ray):
    info, _ = local_ray
    sockets = info["sockets"]
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the listing sees Ray's servers (the test can fail)
    exposed = [s for s in sockets if not _loopback(s[0])]
    print(f"\nlocal Ray: {len(sockets)} listening sockets in {info['processes']} processes, "
          f"{len(exposed)} beyond loopback")
    assert not exposed, f"listening beyond 127.0.0.1: {exposed}"


def _join(env: dict, address: str, **auth: str) -> subprocess.Popen:
    """A driver joining the Ray at `address` with these auth settings, started (the three run side by side)."""
    env = {**{k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}, **auth}
    return subprocess.Popen([sys.executable, "-c", CLIENT, address], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _joined(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_the_local_ray_refuses_a_client_without_its_token(local_ray, tmp_path):
    info, env = local_ray
    address = info["gcs"]
    assert _loopback(address.rsplit(":", 1)[0].strip("[]"))
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    started = [_join(env, address, RAY_AUTH_MODE="disabled"),
               _join(env, address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(wrong)),
               _join(env, address, RAY_AUTH_MODE="token")]  # the token the local Ray made: ~/.ray/auth_token
    no_token, wrong_token, with_token = (_joined(p) for p in started)
    for refused in (no_token, wrong_token):
        assert refused.returncode != 0 and "JOINED" not in refused.stdout
        assert "auth" in (refused.stderr + refused.stdout).lower(), refused.stderr[-2000:]
    assert with_token.returncode == 0 and "JOINED 1" in with_token.stdout, with_token.stderr[-2000:]


class _Payload:
    """Unpickling this runs code: it creates the file it names."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_holding_a_pickle_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "trial"
    folder.mkdir()
    torch.save({"format_version": FORMAT_VERSION, "payload": _Payload(marker)}, folder / RESUME_FILE)
    with pytest.raises(CxrError, match="not a readable checkpoint"):
        read_resume_state(folder)
    assert not marker.exists()


def test_predictions_holding_objects_are_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "0000.npz"
    np.savez(path, val_labels=np.zeros(2), val_probs=np.array([_Payload(marker)], dtype=object),
             test_labels=np.zeros(2), test_probs=np.zeros((2, 3)))
    with pytest.raises(CxrError, match="not a readable predictions file"):
        read_predictions(path)
    assert not marker.exists()


def _resume(folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "cxr_search.cli", "resume", str(folder)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_resume_refuses_a_folder_it_did_not_create(tmp_path):
    marker = tmp_path / "ran"
    ray_experiment = tmp_path / "someone-elses-tune-run"  # what a plain Ray Tune run leaves: pickles
    ray_experiment.mkdir()
    (ray_experiment / "tuner.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    (ray_experiment / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    forged = tmp_path / "forged"  # a pipeline.json without our marker
    forged.mkdir()
    (forged / PLAN_FILE).write_text(json.dumps({"kind": "ray tune experiment", "format_version": 2}))
    (forged / "tuner.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    for folder, reason in ((ray_experiment, "not an experiment folder"), (forged, "not a cxr-search experiment")):
        before = sorted(p.name for p in folder.iterdir())
        out = _resume(folder)
        assert out.returncode == 2, out.stderr[-2000:]
        assert reason in out.stdout + out.stderr
        assert sorted(p.name for p in folder.iterdir()) == before  # nothing written, nothing unpickled
    assert not marker.exists()
