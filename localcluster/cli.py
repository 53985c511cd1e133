"""`python -m localcluster provision|up|down|status|env|logs`: the embedded cluster from a shell."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from . import controlplane, provision
from .controlplane import Cluster, ClusterError
from .nodeagent.node import DEFAULT_NODES
from .provision import ProvisionError


def _add_state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, default=None,
                   help="the cluster's state directory (default: $RLHF_CLUSTER_DIR or ./.state/cluster)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m localcluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("provision", help="build the cluster's binaries from pinned Go modules (cached by version)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="cache root (default: $RLHF_CACHE_DIR or ~/.cache/rlhf-platform)")
    p.add_argument("--keep-build", action="store_true", help="keep the build directories after installing")
    p.add_argument("--check", action="store_true", help="only check the cache: exit 0 when usable, 1 when not")
    p.add_argument("--with", dest="addons", action="append", default=[], choices=controlplane.ADDONS,
                   help="also build an add-on (repeatable): kueue")

    p = sub.add_parser("up", help="start the cluster and wait until it is ready")
    _add_state_dir(p)
    p.add_argument("--name", default=None, help=f"cluster name in the kubeconfig (default: {controlplane.DEFAULT_NAME})")
    p.add_argument("--node", action="append", default=[], metavar="NAME:cpu=16,memory=64Gi,gpu=1",
                   help="a node for the node agent to register (repeatable; default: two nodes with 2 GPUs each, "
                        f"{' and '.join(DEFAULT_NODES)})")
    p.add_argument("--no-node-agent", action="store_true", help="start the control plane only (no Node, no pods)")
    p.add_argument("--with", dest="addons", action="append", default=[], choices=controlplane.ADDONS,
                   help="also start an add-on (repeatable): kueue (built by `provision --with kueue`)")
    p.add_argument("--no-wait-node", action="store_true", help="do not wait for the node(s) to be Ready")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the API server (default 90)")
    p.add_argument("--node-timeout", type=float, default=60.0, help="seconds to wait for Ready nodes (default 60)")
    p.add_argument("--watch-pid", type=int, default=None,
                   help="stop the cluster by itself when this process exits")

    p = sub.add_parser("down", help="stop every process of the cluster")
    _add_state_dir(p)
    p.add_argument("--purge", action="store_true", help="also delete the state directory (etcd data, logs, volumes)")

    p = sub.add_parser("status", help="show the cluster's processes and readiness")
    _add_state_dir(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("env", help="print `export KUBECONFIG=...` for eval")
    _add_state_dir(p)

    p = sub.add_parser("logs", help="print a pod's container log (kubectl logs needs a kubelet; this reads the "
                                    "node agent's files)")
    _add_state_dir(p)
    p.add_argument("namespace")
    p.add_argument("pod")
    p.add_argument("-c", "--container", default=None, help="container name (needed when the pod has several)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output until interrupted")

    p = sub.add_parser("_watch")  # internal: the watchdog process of `up --watch-pid`
    _add_state_dir(p)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--ticks", type=int, default=None)
    return parser


def _status(cluster: Cluster, as_json: bool) -> int:
    st = cluster.status()
    if as_json:
        print(json.dumps(st, indent=2))
    elif not st["processes"]:
        print(f"no cluster runs in {st['state_dir']}")
    else:
        print(f"cluster '{st['name']}' in {st['state_dir']}: {'ready' if st['ready'] else 'NOT ready'} "
              f"at {st['server']}")
        for p in st["processes"]:
            print(f"  {p['role']:<24} pid {p['pid']:<8} {'running' if p['alive'] else 'EXITED'}   {p['log']}")
        print(f"  ready nodes: {', '.join(st['ready_nodes']) or 'none'}")
        print(f"  pod network: {st['pod_network']}, cluster DNS: {st['dns'] + ':53' if st['dns'] else 'none'}")
        print(f"  export KUBECONFIG={st['kubeconfig']}")
    return 0 if st["ready"] else 1


def _logs(cluster: Cluster, args: argparse.Namespace) -> int:
    path = cluster.log_path(args.namespace, args.pod, args.container)
    with open(path, errors="replace") as fh:
        sys.stdout.write(fh.read())
        while args.follow:
            sys.stdout.flush()
            chunk = fh.read()
            if chunk:
                sys.stdout.write(chunk)
            else:
                time.sleep(0.5)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "provision":
            if args.check:
                reason = provision.check_all(args.cache_dir, (*provision.DEFAULT_COMPONENTS, *args.addons))
                print(reason or f"ok: {provision.bin_dir(args.cache_dir)}")
                return 1 if reason else 0
            bdir = provision.provision(args.cache_dir, keep_build=args.keep_build, with_=args.addons)
            print(f"binaries: {bdir}")
            return 0
        cluster = Cluster(args.state_dir, name=getattr(args, "name", None), nodes=getattr(args, "node", None),
                          node_agent=not getattr(args, "no_node_agent", False), addons=getattr(args, "addons", ()))
        if args.command == "up":
            cluster.up(timeout=args.timeout, node_timeout=args.node_timeout, wait_node=not args.no_wait_node,
                       watch_pid=args.watch_pid)
        elif args.command == "down":
            cluster.down(purge=args.purge)
        elif args.command == "status":
            return _status(cluster, args.json)
        elif args.command == "env":
            print(f"export KUBECONFIG={shlex.quote(cluster.kubeconfig)}")
        elif args.command == "logs":
            return _logs(cluster, args)
        elif args.command == "_watch":
            controlplane.watch(cluster.state_dir, args.pid, args.ticks)
        return 0
    except (ClusterError, ProvisionError, controlplane.certs.CertError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
