"""Embedded Kubernetes cluster: control plane built from source, plus a local node agent."""
