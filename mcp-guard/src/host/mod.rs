//! The machine around the kernel: cgroupfs (one place that reads it), socket
//! diagnostics, pod interfaces and addresses, the capability posture of guarded
//! processes and the hardening `exec` applies.

pub mod attribution;
pub mod cgroup;
pub mod harden;
pub mod identity;
pub mod podlinks;
pub mod posture;
pub mod sockdiag;
