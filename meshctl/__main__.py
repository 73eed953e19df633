"""``meshctl``: run a local mesh and talk to one (``meshctl --help`` lists the commands).

    meshctl up --nodes 3          etcd + a coordinator + N nodes on free ports; Ctrl-C stops all
    meshctl node start            add a node to that mesh
    meshctl status                leader, map epoch, coverage; each node's health and cache size
    meshctl topology [--nodes] [--watch] [--format dot]   the cluster map
    meshctl drain NODE [--no-wait] [--timeout S]  move every role off a node, showing progress
    meshctl recover [--dry-run]   give groups that lost every copy a new, EMPTY primary
    meshctl health ADDRESS        a node's or coordinator's gRPC health (exit 0/1/3)
    meshctl cache get|set|del ...; lock describe NAME; jobs stats|dead|requeue|get ...
    meshctl secret FILE           write a new cluster secret (--cluster-secret-file), mode 0600

Every command but ``up`` finds the mesh through ``--etcd`` and ``--cluster`` (or
``$MESH_ETCD_ENDPOINTS``, ``$MESH_CLUSTER``); ``--output json`` prints JSON; exit
codes: 0 ok, 1 the cluster answered no, 2 usage error, 3 cluster unreachable
(see `meshctl.output`). The commands are defined in `meshctl.cli`.
"""

from __future__ import annotations

from meshctl.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
