"""``meshctl node start``: add a node to a running ``meshctl up`` mesh.

The node is started *by* the ``meshctl up`` process, on request: it then gets
exactly the settings of the others (etcd, cluster, cluster secret, lease TTL, the
environment ``up`` was started with, so the same ``MESH_AUTH_*`` tokens), shows
in its status line, and stops (or dies) with the mesh like every other node.
``meshctl up`` records where it runs in a state file (`state_path`) and watches
a requests directory in its work dir; ``node start`` drops a request there and
waits for the answer.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from meshctl.context import Settings
from meshctl.output import FAILED, OK, UNREACHABLE, emit

REQUESTS = "node-requests"
"""Directory of the up's work dir where requests and answers go."""


def state_path(cluster: str) -> Path:
    """Where the ``meshctl up`` of ``cluster`` describes itself (one per user and cluster)."""
    return Path(tempfile.gettempdir()) / f"meshctl-up-{os.getuid()}-{cluster}.json"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` so that a reader never sees half of it (rename is atomic)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def start_node(s: Settings, node_id: str, up_state: str | None,
               node_args: list[str], timeout: float = 60.0) -> int:
    """Ask the running ``meshctl up`` to start one more node; print where it runs."""
    path = Path(up_state) if up_state else state_path(s.cluster)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return _error(f"no `meshctl up` is running for cluster {s.cluster!r} (no {path}); "
                      f"start one, or give --cluster / --up-state", UNREACHABLE)
    except (OSError, ValueError) as exc:
        return _error(f"cannot read {path}: {exc}", UNREACHABLE)
    if not _alive(int(state.get("pid", 0))):
        return _error(f"the `meshctl up` of cluster {s.cluster!r} (pid {state.get('pid')}) "
                      f"is gone; {path} is stale", UNREACHABLE)
    requests = Path(state["workdir"]) / REQUESTS
    request_id = uuid.uuid4().hex
    write_json(requests / f"{request_id}.request",
               {"node_id": node_id, "args": node_args})
    answer = requests / f"{request_id}.answer"
    deadline = time.monotonic() + timeout
    while not answer.exists():
        if time.monotonic() > deadline or not _alive(int(state["pid"])):
            return _error(f"`meshctl up` (pid {state['pid']}) did not start the node in "
                          f"{timeout:g}s", UNREACHABLE)
        time.sleep(0.1)
    reply = json.loads(answer.read_text())
    answer.unlink(missing_ok=True)
    if s.json:
        emit(reply)
    elif "error" in reply:
        pass
    else:
        print(f"{reply['node_id']:<9} {reply['address']}   peer {reply['peer_address']}   "
              f"pid {reply['pid']}   metrics http://{reply['metrics']}/metrics\n"
              f"log: {reply['log']}\n"
              f"it runs as part of `meshctl up` (pid {state['pid']}) and stops with it; "
              f"`meshctl drain {reply['node_id']}` takes it out before", flush=True)
    if "error" in reply:
        return _error(reply["error"], FAILED)
    return OK
