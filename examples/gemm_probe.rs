//! Kernel-development probe: matmul rate at a few shapes on the chosen adapter.
use cvt_gpu::bench::gemm;
use cvt_gpu::gpu::{AdapterRequest, Gpu};
fn main() -> anyhow::Result<()> {
    let gpu = Gpu::new(&AdapterRequest::default())?;
    for (m, n, k) in [(64, 64, 64), (256, 256, 256), (1024, 1024, 1024), (3136, 256, 64)] {
        let r = gemm(&gpu, m, n, k, 5)?;
        println!("{m}x{n}x{k}: {:.2} ms {:.2} GFLOP/s", r.median_ms, r.gflops_per_s);
    }
    Ok(())
}
