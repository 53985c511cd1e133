"""Embedded Kubernetes cluster: control plane, etcd and CoreDNS built from pinned Go modules, plus a local node agent.

    from localcluster import Cluster
    c = Cluster("/tmp/my-cluster")      # state directory
    c.up()                              # etcd, API server, controllers, scheduler, node agent; waits until ready
    subprocess.run(["kubectl", "get", "nodes"], env=c.env)
    print(c.logs("default", "my-pod"))  # a container's log, written by the node agent
    c.down()                            # stops exactly the processes it started, and their children
"""

from .controlplane import Cluster, ClusterError
from .provision import K8S_VERSION, ProvisionError

__all__ = ["Cluster", "ClusterError", "K8S_VERSION", "ProvisionError"]
