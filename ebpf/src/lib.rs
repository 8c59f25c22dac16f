//! Placeholder for the connect-time socket load balancer (cgroup sock_addr programs written in C
//! under `ebpf/bpf/`, loaded with aya). Nothing is built here yet; `--lb ebpf` reports that.
