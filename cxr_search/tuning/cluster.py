"""Ray itself: start a private local Ray on loopback, or join a cluster, refusing an address nothing answers on."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

from cxr_search import interrupt
from cxr_search.errors import CxrError

ADDRESS_TIMEOUT_S = 10.0  # a cluster's GCS port must accept a TCP connection within this, seconds


def may_autoscale() -> bool:
    """Whether the connected cluster may add nodes: its autoscaler config says so, or (as Tune itself guesses)
    it was started by the cluster launcher; when neither can be read, assume it may (never refuse a valid run)."""
    if Path("~/ray_bootstrap_config.yaml").expanduser().exists():  # `ray up` writes it on the head node
        return True
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a private API (Ray Client has no GCS access): unknown, so may
        return True
    if config is None:  # no autoscaler config reported (Ray's v1 autoscaler, a hand-started cluster): unknown
        return True
    return any(g.max_count == -1 or g.max_count > g.min_count for g in config.node_group_configs)


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             quiet: bool = True) -> None:
    """Start a private local Ray or join a cluster (`auto`, `HOST:PORT`, `ray://host:10001`).

    The local Ray listens on 127.0.0.1 only (every port: GCS, raylets, workers, agents; no dashboard) and uses
    Ray's token authentication (on by default for a new local Ray since 2.52; the token is ~/.ray/auth_token).
    An address on 127.0.0.1 joins a Ray whose nodes were started on loopback (`ray start --node-ip-address
    127.0.0.1`, as tests/test_cluster.py does), keeping the driver on loopback too.
    """
    if ray.is_initialized():
        return
    # Our SIGINT/SIGTERM handler asks Tune to stop (SIGUSR1) and remembers which signal it was.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    # Tune's classic output: silent at verbose 0 (the new one prints a configuration box and paths regardless);
    # search/console.py speaks to people instead
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if address is None or _on_loopback(address):
        _keep_loopback()
    if address:
        check_address(address)
        try:
            ray.init(address=address, log_to_driver=not quiet)
        except ConnectionError as e:
            raise CxrError(f"--address {address}: no Ray cluster answered ({' '.join(str(e).split())[:200]}); "
                           "start one with `ray up cluster.yaml` (or `ray start --head`), or leave --address out "
                           "to run on this machine.") from None
    else:
        # ERROR: Ray's warnings at start-up (e.g. that token authentication is on) are not the user's business
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, dashboard_host="127.0.0.1",
                 log_to_driver=not quiet, configure_logging=True, logging_level=logging.ERROR if quiet else logging.INFO)
    interrupt.reinstall()


def _on_loopback(address: str) -> bool:
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def _keep_loopback() -> None:
    """Make Ray keep 127.0.0.1 as this machine's node address, so that every server binds to loopback only.

    Ray 2.60 binds its gRPC servers to 0.0.0.0 unless the node IP is exactly 127.0.0.1, and on Linux it replaces
    127.0.0.1 by the routed IP (`services.resolve_ip_for_localhost`) unless multi-machine clusters are switched
    off, which its `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` does (DESIGN.md, Ray facts). The variable is read when
    Ray is imported, so the already imported constant is set too; the variable reaches the processes Ray starts.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def check_address(address: str) -> None:
    """Refuse at once a cluster address `ray.init` would fail on only after minutes, or with a traceback: a
    host:port nothing listens on (Ray retries its GCS for minutes), `auto` finding a Ray process that does not
    answer (a stale one from another session), `ray://` without Ray Client installed."""
    import socket

    from ray._private.utils import get_ray_client_dependency_error

    if address.startswith("ray://"):
        if get_ray_client_dependency_error() is not None:
            raise CxrError(f"--address {address}: Ray Client is not installed here (pip install "
                           f"'ray[client]=={ray.__version__}'); or run the command on the cluster's head node with "
                           "--address auto.")
        return
    target = address
    if address == "auto":
        try:  # Ray's own lookup: $RAY_ADDRESS, the latest `ray start`, else any local GCS process it finds
            from ray._private.services import canonicalize_bootstrap_address

            target = canonicalize_bootstrap_address(address) or ""
        except Exception:  # noqa: BLE001 - no cluster found: `init_ray` turns Ray's own error into one line
            return
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # another form: Ray resolves it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=ADDRESS_TIMEOUT_S).close()
    except OSError as e:
        found = f" (found {target})" if target != address else ""
        raise CxrError(f"--address {address}{found}: nothing answers there ({e.strerror or e}); give the head "
                       "node's address as `ray status` prints it (host:6379), stop a stale local Ray with `ray "
                       "stop`, or leave --address out to run on this machine.") from None
