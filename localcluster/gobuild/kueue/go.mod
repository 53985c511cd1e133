// Builds Kueue's manager (only with `python -m localcluster provision --with kueue`) for localcluster/provision.py.
module rlhf-platform.local/gobuild/kueue

go 1.25.0

require sigs.k8s.io/kueue v0.17.0
