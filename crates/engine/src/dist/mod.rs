//! Distribution: libtorch's c10d process groups (Gloo on CPU, NCCL on CUDA) and the
//! rendezvous that builds them from the launcher's environment, and the tensor-parallel
//! regions (autograd functions whose backward communicates) over those groups, and the
//! collective flight recorder behind the rank state file (`flight`).

pub mod c10d;
pub mod env;
pub mod flight;
pub mod groups;
pub mod selftest;
pub mod tp;
pub mod tp_check;
