//! Every bpf call and pin: the programs, the maps, the pins, the TC classifier, the
//! kernel preflight and exec's check that the kernel enforces its cgroup.

pub mod btf;
pub mod enforced;
pub mod features;
pub mod loader;
pub mod manifest;
pub mod maps;
pub mod pins;
pub mod retry;
pub mod tc;
pub mod unix_hooks;
