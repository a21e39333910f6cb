//! `mm-engine doctor`: what this engine was built against and what it can see.

use serde::Serialize;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Serialize)]
pub struct Doctor {
    pub engine_version: String,
    pub libtorch_version: String,
    pub libtorch_lib: String,
    pub cuda_available: bool,
    pub cuda_devices: i64,
    pub cudnn_available: bool,
    pub nccl_compiled: bool,
    pub gloo_compiled: bool,
    pub cpu_threads: i32,
    /// A tensor was created and reduced on the CPU: libtorch works in this process.
    pub cpu_tensor_ok: bool,
}

pub fn collect() -> Doctor {
    let t = Tensor::arange(10, (Kind::Float, Device::Cpu));
    let sum = t.sum(Kind::Float).double_value(&[]);
    Doctor {
        engine_version: env!("CARGO_PKG_VERSION").to_string(),
        libtorch_version: crate::dist::c10d::torch_version(),
        libtorch_lib: env!("MM_ENGINE_LIBTORCH_LIB").to_string(),
        cuda_available: tch::Cuda::is_available(),
        cuda_devices: tch::Cuda::device_count(),
        cudnn_available: tch::Cuda::cudnn_is_available(),
        nccl_compiled: crate::dist::c10d::has_nccl(),
        gloo_compiled: true,
        cpu_threads: tch::get_num_threads(),
        cpu_tensor_ok: sum == 45.0,
    }
}

impl std::fmt::Display for Doctor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let yes = |b: bool| if b { "yes" } else { "no" };
        writeln!(f, "mm-engine       {}", self.engine_version)?;
        writeln!(f, "libtorch        {} ({})", self.libtorch_version, self.libtorch_lib)?;
        writeln!(f, "cpu tensor      {}", if self.cpu_tensor_ok { "ok" } else { "FAILED" })?;
        writeln!(f, "cpu threads     {}", self.cpu_threads)?;
        writeln!(f, "cuda            {} ({} devices)", yes(self.cuda_available), self.cuda_devices)?;
        writeln!(f, "cudnn           {}", yes(self.cudnn_available))?;
        writeln!(f, "c10d gloo       {}", yes(self.gloo_compiled))?;
        write!(f, "c10d nccl       {}", yes(self.nccl_compiled))
    }
}
