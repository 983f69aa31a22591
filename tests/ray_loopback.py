"""`ray start` that keeps 127.0.0.1 as the node's address (tests only): `python tests/ray_loopback.py start ...`.

Ray 2.60 binds its servers to 0.0.0.0 unless a node's IP is exactly 127.0.0.1, and on Linux `ray start` turns
`--node-ip-address 127.0.0.1` and `--address 127.0.0.1:PORT` into the machine's routed IP
(`services.resolve_ip_for_localhost`). Its switch for that, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, also refuses to
start a second node. So the tests start each node through this wrapper, which keeps loopback addresses as given:
a head and workers on one machine, reachable from nowhere else.
"""

import sys

from ray._private import services


def _keep(host: str) -> str:
    return host


if __name__ == "__main__":
    services.resolve_ip_for_localhost = _keep
    from ray.scripts.scripts import main

    sys.exit(main())
