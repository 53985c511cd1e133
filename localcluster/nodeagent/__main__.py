"""python -m localcluster.nodeagent --kubeconfig K --state-dir D [--node NAME:cpu=16,memory=64Gi,gpu=1 ...]"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from . import shared_cache_dir
from .addresses import default_pod_network, is_loopback_ip, parse_pod_network
from .node import DEFAULT_NODE_NAME, DEFAULT_NODES, parse_node_spec, parse_taint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m localcluster.nodeagent",
                                description="Local node agent: plays the kubelet for the embedded cluster.")
    p.add_argument("--kubeconfig", required=True, help="kubeconfig of the cluster's API server")
    p.add_argument("--state-dir", required=True, help="the cluster's state directory (pods, logs, volumes)")
    p.add_argument("--node", action="append", default=[], metavar="NAME:RES=QTY,...",
                   help=f"a node to register, e.g. {DEFAULT_NODE_NAME}:cpu=16,memory=64Gi,gpu=1 (repeatable; "
                        f"default {' and '.join(DEFAULT_NODES)}, each with cpu=16, memory=64Gi, pods=110)")
    p.add_argument("--taint", action="append", default=[], metavar="KEY[=VALUE]:EFFECT",
                   help="register the node(s) with this taint (repeatable)")
    p.add_argument("--pod-network", help="loopback CIDR for pod IPs (default: a 127.N.0.0/16 derived from --state-dir)")
    p.add_argument("--cluster-dns", default="", metavar="IP",
                   help="the cluster DNS server's address: pods with dnsPolicy ClusterFirst get a resolv.conf naming it "
                        "(default: none, pods keep the host's resolv.conf)")
    p.add_argument("--cluster-domain", default="cluster.local", help="the cluster's DNS domain (default %(default)s)")
    p.add_argument("--heartbeat-seconds", type=float, default=10.0, help="node status and Lease renewal period")
    p.add_argument("--shutdown-grace-seconds", type=float, default=10.0,
                   help="on SIGTERM, the longest a pod gets to stop before SIGKILL")
    p.add_argument("--default-workdir", default="/", help="working directory of containers without workingDir")
    p.add_argument("--pass-env", action="append", default=[], metavar="NAME",
                   help="pass this variable of the agent's environment to every container (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="set this variable in every container, like an image's ENV (repeatable)")
    p.add_argument("--shared-cache", default=shared_cache_dir(), metavar="DIR",
                   help="a host directory (made mode 1777) that every pod sees writable at the same path, whatever "
                        "its user and read-only root: for build caches such as TORCH_EXTENSIONS_DIR "
                        "(default %(default)s; '' for none)")
    p.add_argument("--log-level", default=os.environ.get("LOCALCLUSTER_LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)
    try:
        args.nodes = [parse_node_spec(s) for s in args.node or DEFAULT_NODES]
        taints = [parse_taint(t) for t in args.taint]
        for node in args.nodes:
            node.taints = list(taints)
        args.pod_network = args.pod_network or default_pod_network(args.state_dir)
        network = parse_pod_network(args.pod_network)
        if args.cluster_dns and not is_loopback_ip(args.cluster_dns):
            raise ValueError(f"--cluster-dns {args.cluster_dns!r} must be a loopback IPv4 address (e.g. the last "
                             f"address of --pod-network {network})")
        args.extra_env = {}
        for item in args.env:
            name, eq, value = item.partition("=")
            if not eq or not name:
                raise ValueError(f"--env {item!r} must be NAME=VALUE")
            args.extra_env[name] = value
    except ValueError as e:
        p.error(str(e))
    if len({n.name for n in args.nodes}) != len(args.nodes):
        p.error("--node names must be distinct")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    if os.geteuid() != 0:
        print("local node agent: must run as root (each pod gets its own mount namespace via unshare)",
              file=sys.stderr)
        return 2
    # Imported here so --help and argument errors do not need the kubernetes client.
    from .agent import Agent
    from .kube import Kube

    agent = Agent(Kube(args.kubeconfig), args.state_dir, args.nodes, pod_network=args.pod_network,
                  heartbeat_seconds=args.heartbeat_seconds, shutdown_grace=args.shutdown_grace_seconds,
                  default_workdir=args.default_workdir, pass_env=args.pass_env, extra_env=args.extra_env,
                  shared_cache=args.shared_cache, cluster_dns=args.cluster_dns, cluster_domain=args.cluster_domain)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop.set())
    try:
        agent.run_until_stopped()
    except Exception as e:
        logging.getLogger("localcluster.nodeagent").exception("node agent failed: %s", e)
        agent.shutdown()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
