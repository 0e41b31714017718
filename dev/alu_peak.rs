//! Measures the driver's arithmetic rate with no memory traffic: each invocation
//! runs `acc_i = acc_i * m + c` on NACC independent vec4 accumulators in a loop.
//! This bounds what any kernel (the GEMM included) can reach on the adapter.
//!
//!     cargo run --release --example alu_peak -- [NACC ...]
use std::time::Instant;

fn shader(nacc: usize, wg: u32) -> String {
    let mut s = String::from("struct P { m: vec4<f32>, c: vec4<f32>, k: u32 }\n@group(0) @binding(0) var<uniform> p: P;\n@group(0) @binding(1) var<storage, read_write> out: array<vec4<f32>>;\n");
    s += &format!("@compute @workgroup_size({wg})\nfn main(@builtin(global_invocation_id) gid: vec3<u32>) {{\n");
    for i in 0..nacc {
        s += &format!("  var a{i} = vec4<f32>(f32(gid.x) + {i}.0);\n");
    }
    s += "  let m = p.m; let c = p.c;\n  for (var k = 0u; k < p.k; k++) {\n";
    for i in 0..nacc {
        s += &format!("    a{i} = a{i} * m + c;\n");
    }
    s += "  }\n  out[gid.x] = ";
    s += &(0..nacc).map(|i| format!("a{i}")).collect::<Vec<_>>().join(" + ");
    s += ";\n}\n";
    s
}

fn main() -> anyhow::Result<()> {
    let gpu = cvt_gpu::gpu::Gpu::new(&cvt_gpu::gpu::AdapterRequest::default())?;
    let d = &gpu.device;
    let args: Vec<usize> = std::env::args().skip(1).map(|s| s.parse()).collect::<Result<_, _>>()?;
    let naccs = if args.is_empty() { vec![4, 8, 12, 16, 32] } else { args };
    let n: u32 = 1 << 16;
    let k: u32 = 512;
    for &wg in &[8u32, 64] {
        for &nacc in &naccs {
            let module = d.create_shader_module(wgpu::ShaderModuleDescriptor { label: None, source: wgpu::ShaderSource::Wgsl(shader(nacc, wg).into()) });
            let pipe = d.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: None,
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
            let mut words = vec![0u32; 12];
            for i in 0..4 {
                words[i] = 0.999f32.to_bits();
                words[4 + i] = 0.001f32.to_bits();
            }
            words[8] = k;
            let ubuf = gpu.uniform("p", &words);
            let out = gpu.storage("out", n as u64 * 16)?;
            let bg = d.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &pipe.get_bind_group_layout(0),
                entries: &[wgpu::BindGroupEntry { binding: 0, resource: ubuf.as_entire_binding() }, wgpu::BindGroupEntry { binding: 1, resource: out.as_entire_binding() }],
            });
            let mut best = f64::MAX;
            for _ in 0..4 {
                let mut enc = d.create_command_encoder(&Default::default());
                {
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    pass.set_pipeline(&pipe);
                    pass.set_bind_group(0, &bg, &[]);
                    pass.dispatch_workgroups(n / wg, 1, 1);
                }
                let t = Instant::now();
                gpu.queue.submit([enc.finish()]);
                gpu.sync()?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            let flops = 2.0 * 4.0 * nacc as f64 * k as f64 * n as f64;
            println!("workgroup {wg:3}, {nacc:2} vec4 accumulators: {:7.1} ms, {:6.1} GFLOP/s", best * 1e3, flops / best / 1e9);
        }
    }
    Ok(())
}
