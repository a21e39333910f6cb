//! mm-engine: InternVL3 supervised fine-tuning on libtorch (tch), distributed through
//! libtorch's own c10d (Gloo on CPU, NCCL on CUDA).

pub mod dist;
pub mod doctor;
