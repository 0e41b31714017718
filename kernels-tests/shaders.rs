//! Every WGSL file is parsed and validated by naga and translated to SPIR-V, MSL,
//! HLSL and GLSL for every entry point, with its override constants resolved at
//! the values the engine uses, under each texture-read prelude (`texread`). This
//! is the guard for Metal and DX12, which no machine here has.

use cvt_gpu::gpu::SHADERS;
use cvt_gpu::texread::{prelude, TexRead};
use naga::back::PipelineConstants;
use naga::valid::{Capabilities, ValidationFlags, Validator};

/// Override sets worth translating per shader (the defaults are always tried).
fn variants(shader: &str) -> Vec<Vec<(&'static str, f64)>> {
    let mut v = vec![vec![]];
    match shader {
        "matmul" => {
            for a in [0.0, 1.0] {
                for act in [0.0, 1.0, 2.0] {
                    v.push(vec![("A_MODE", a), ("ACT", act), ("ACCUMULATE", 1.0)]);
                }
            }
            v.push(vec![("B_F16", 1.0)]);
            // main_tex's operand modes and 16-row block.
            for ta in [1.0, 2.0] {
                v.push(vec![("TA", ta), ("TB_LIN", 1.0), ("TRM", 16.0)]);
            }
            // main_tex_act's fused activation (the forward's and the backward's).
            v.push(vec![("SAVE_Z", 1.0), ("ACT", 2.0), ("TRM", 16.0)]);
            v.push(vec![("ACT_GRAD", 1.0), ("ACT", 1.0)]);
        }
        "attention" => {
            v.push(vec![("D4", 4.0), ("WG", 32.0)]);
            v.push(vec![("D4", 16.0), ("SAVE_P", 1.0), ("QPI", 4.0)]);
            v.push(vec![("QPI", 1.0)]);
        }
        "rownorm" => {
            v.push(vec![("WG", 128.0)]);
            // layernorm4's fused residual add.
            v.push(vec![("LANES", 1.0), ("RESIDUAL", 1.0)]);
        }
        _ => v.push(vec![("WG", 128.0)]),
    }
    v
}

#[test]
fn every_shader_translates_for_every_backend() {
    // (texture reads, f16 weight textures, f16 plan).
    // (texture reads, f16 weight textures, f16 plan, subgroup operations).
    let preludes = [
        (TexRead::Sampled, false, false, false),
        (TexRead::Sampled, false, false, true),
        (TexRead::Storage, false, false, false),
        (TexRead::Storage, false, false, true),
        (TexRead::Storage, true, false, true),
        (TexRead::Sampled, false, true, true),
        (TexRead::Storage, false, true, true),
    ];
    for ((name, body), (read, w16, a16, sg)) in SHADERS.iter().flat_map(|s| preludes.iter().map(move |p| (s, *p))) {
        let src = &(prelude(read, w16, a16, sg) + &cvt_gpu::gpu::derive_entries(body));
        let name = &format!("{name} ({} reads{}{}{})", read.name(), if w16 { ", f16 weights" } else { "" }, if a16 { ", f16 plan" } else { "" }, if sg { ", subgroups" } else { "" });
        let module = naga::front::wgsl::parse_str(src).unwrap_or_else(|e| panic!("{name}.wgsl: {}", e.emit_to_string(src)));
        let info = Validator::new(ValidationFlags::all(), Capabilities::all()).validate(&module).unwrap_or_else(|e| panic!("{name}.wgsl does not validate: {e:?}"));
        assert!(!module.entry_points.is_empty(), "{name}.wgsl has no entry point");
        // Functions and entry points made by `// derive` lines (gpu::derive_entries).
        for line in body.lines().filter_map(|l| l.trim().strip_prefix("// derive ")) {
            let new = line.split(' ').next().unwrap();
            let found = module.entry_points.iter().any(|e| e.name == new) || module.functions.iter().any(|(_, f)| f.name.as_deref() == Some(new));
            assert!(found, "{name}: derived function {new} missing");
        }
        // Storage mode is allowed where the adapter has MAX_TEXTURES_PER_KERNEL
        // storage textures per stage: no entry point may read more.
        for (i, ep) in module.entry_points.iter().enumerate() {
            let reads = module
                .global_variables
                .iter()
                .filter(|(h, v)| {
                    !info.get_entry_point(i)[*h].is_empty()
                        && matches!(module.types[v.ty].inner, naga::TypeInner::Image { class: naga::ImageClass::Storage { access: naga::StorageAccess::LOAD, .. }, .. })
                })
                .count() as u32;
            assert!(reads <= cvt_gpu::texread::MAX_TEXTURES_PER_KERNEL, "{name}::{} reads {reads} textures", ep.name);
        }
        for ep in &module.entry_points {
            for consts in variants(name.split(' ').next().unwrap()) {
                let pc: PipelineConstants = consts.iter().map(|(k, v)| (k.to_string(), *v)).collect();
                let (m, i) =
                    naga::back::pipeline_constants::process_overrides(&module, &info, Some((ep.stage, &ep.name)), &pc).unwrap_or_else(|e| panic!("{name}::{} overrides {consts:?}: {e:?}", ep.name));
                let ctx = format!("{name}::{} {consts:?}", ep.name);

                let spv_opts = naga::back::spv::Options::default();
                let spv_pipe = naga::back::spv::PipelineOptions { shader_stage: ep.stage, entry_point: ep.name.clone() };
                let words = naga::back::spv::write_vec(&m, &i, &spv_opts, Some(&spv_pipe)).unwrap_or_else(|e| panic!("{ctx} SPIR-V: {e:?}"));
                assert!(words.len() > 5, "{ctx}: empty SPIR-V");

                // Storage reads never run on Metal (`texread::storage_supported`):
                // naga's MSL writer cannot pass a storage texture to a function.
                if read == TexRead::Sampled {
                    let msl_pipe = naga::back::msl::PipelineOptions { entry_point: Some((ep.stage, ep.name.clone())), ..Default::default() };
                    let (msl, _) = naga::back::msl::write_string(&m, &i, &naga::back::msl::Options::default(), &msl_pipe).unwrap_or_else(|e| panic!("{ctx} MSL: {e:?}"));
                    assert!(msl.contains("kernel"), "{ctx}: MSL has no kernel");
                }

                // f16 arithmetic types need shader model 6.2 (DX12's shader-f16).
                let shader_model = if a16 { naga::back::hlsl::ShaderModel::V6_2 } else { naga::back::hlsl::ShaderModel::V6_0 };
                let hlsl_opts = naga::back::hlsl::Options { shader_model, ..Default::default() };
                let hlsl_pipe = naga::back::hlsl::PipelineOptions { entry_point: Some((ep.stage, ep.name.clone())) };
                let mut hlsl = String::new();
                naga::back::hlsl::Writer::new(&mut hlsl, &hlsl_opts, &hlsl_pipe).write(&m, &i, None).unwrap_or_else(|e| panic!("{ctx} HLSL: {e:?}"));
                assert!(hlsl.contains("numthreads"), "{ctx}: HLSL has no compute entry");

                // f16 plans need shader-f16 and subgroups the SUBGROUP feature,
                // which no GL adapter offers in wgpu.
                if a16 || sg {
                    continue;
                }
                let glsl_opts = naga::back::glsl::Options { version: naga::back::glsl::Version::new_gles(310), ..Default::default() };
                let glsl_pipe = naga::back::glsl::PipelineOptions { shader_stage: ep.stage, entry_point: ep.name.clone(), multiview: None };
                let mut glsl = String::new();
                naga::back::glsl::Writer::new(&mut glsl, &m, &i, &glsl_opts, &glsl_pipe, naga::proc::BoundsCheckPolicies::default())
                    .unwrap_or_else(|e| panic!("{ctx} GLSL: {e:?}"))
                    .write()
                    .unwrap_or_else(|e| panic!("{ctx} GLSL: {e:?}"));
                assert!(glsl.contains("local_size_x"), "{ctx}: GLSL has no compute layout");
            }
        }
    }
}

#[test]
fn every_wgsl_file_is_embedded() {
    let mut on_disk: Vec<String> =
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).filter(|n| n.ends_with(".wgsl")).collect();
    on_disk.sort();
    let mut embedded: Vec<String> = SHADERS.iter().map(|(n, _)| format!("{n}.wgsl")).collect();
    embedded.sort();
    assert_eq!(on_disk, embedded);
}

/// Every typed parameter struct (`ops::params`) mirrors its WGSL struct: the
/// same fields in the same order with the same names (case aside), each at 4·i
/// bytes, and the same size, read from the shader through naga.
#[test]
fn parameter_structs_match_their_shaders() {
    for (shader, name, fields, size) in cvt_gpu::ops::params::all() {
        let body = SHADERS.iter().find(|(n, _)| *n == shader).unwrap().1;
        let src = prelude(TexRead::Sampled, false, false, false) + &cvt_gpu::gpu::derive_entries(body);
        let module = naga::front::wgsl::parse_str(&src).unwrap();
        let (members, span) = module
            .types
            .iter()
            .find_map(|(_, t)| match &t.inner {
                naga::TypeInner::Struct { members, span } if t.name.as_deref() == Some(name) => Some((members.clone(), *span)),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{shader}.wgsl has no struct {name}"));
        let wgsl: Vec<String> = members.iter().map(|m| m.name.clone().unwrap_or_default()).collect();
        assert_eq!(wgsl.len(), fields.len(), "{shader}.wgsl {name}: fields {wgsl:?}, Rust has {fields:?}");
        for (i, (m, f)) in members.iter().zip(fields.iter()).enumerate() {
            let w = m.name.clone().unwrap_or_default();
            assert!(w.eq_ignore_ascii_case(f), "{shader}.wgsl {name} field {i}: {w} in WGSL, {f} in Rust");
            assert_eq!(m.offset as usize, 4 * i, "{shader}.wgsl {name}.{w}: offset");
        }
        assert_eq!(span as usize, size, "{shader}.wgsl {name}: size");
    }
}

/// Every binding table (`ops::params::kernel_bindings!`) names the WGSL
/// variables at its bindings, and covers every binding the shader declares.
#[test]
fn binding_tables_match_their_shaders() {
    for (shader, table) in cvt_gpu::ops::params::all_bindings() {
        let body = SHADERS.iter().find(|(n, _)| *n == shader).unwrap().1;
        let src = prelude(TexRead::Sampled, false, false, false) + &cvt_gpu::gpu::derive_entries(body);
        let module = naga::front::wgsl::parse_str(&src).unwrap();
        for (_, var) in module.global_variables.iter() {
            let (Some(binding), Some(name)) = (&var.binding, &var.name) else { continue };
            let entry = table.iter().find(|(i, _)| *i == binding.binding as usize);
            let names = entry.map(|(_, n)| n.split('|').collect::<Vec<_>>()).unwrap_or_default();
            assert!(names.contains(&name.as_str()), "{shader}.wgsl: `{name}` at binding {} is not in the table ({entry:?})", binding.binding);
        }
    }
}
