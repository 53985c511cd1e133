// Builds the etcd server (its main package is go.etcd.io/etcd/server/v3) for localcluster/provision.py.
module rlhf-platform.local/gobuild/etcd

go 1.24.0

require go.etcd.io/etcd/server/v3 v3.6.8
