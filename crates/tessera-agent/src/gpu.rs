//! GPU discovery (placeholder, being written).
use tessera_core::node::GpuInfo;

pub fn discover() -> (Vec<GpuInfo>, &'static str) {
    (Vec::new(), "none")
}
