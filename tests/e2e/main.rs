//! End-to-end tests against a real control plane: etcd, kube-apiserver,
//! kube-scheduler and kube-controller-manager (garbage collector) built from
//! the Kubernetes Go modules, a real node (kubelet, containerd, runc) and
//! kwok's simulated nodes, as `tripod-dev serve --for-tests` runs them. Each test has its own
//! namespace and starts its own `tripod controller` process(es).

mod common;

mod abuse;
mod api_validation;
mod builds;
mod controller;
mod index;
mod leadership;
mod node;
mod runners;
mod windows;
