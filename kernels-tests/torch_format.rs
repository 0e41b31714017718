//! PyTorch checkpoints (`torch.save` zip archives) read without Python, and
//! `cvt-gpu convert`: every fixture was written by torch itself
//! (kernels-tests/reference/make_fixtures.py) and is compared tensor by tensor
//! with a safetensors file of the same values.

mod scratch;
use cvt_gpu::models::cvt::weights::{read_checkpoint, Naming, Tensor};
use cvt_gpu::models::pth;
use scratch::Scratch;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels-tests/reference/fixtures")
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cvt-gpu"))
}

fn tmpdir(tag: &str) -> Scratch {
    Scratch::new(&format!("torch-{tag}"))
}

fn safetensors_f32(path: &Path) -> HashMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().filter(|(_, v)| v.dtype() == safetensors::Dtype::F32).map(|(n, v)| (n, Tensor::new(v.shape().to_vec(), bytemuck::pod_collect_to_vec(v.data())))).collect()
}

fn assert_same(what: &str, got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>, round: fn(f32) -> f32) {
    let mut a: Vec<&String> = got.keys().collect();
    let mut b: Vec<&String> = want.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "{what}: tensor names differ");
    for (n, t) in want {
        assert_eq!(got[n].shape, t.shape, "{what}: {n} shape");
        let want: Vec<f32> = t.data.iter().map(|&x| round(x)).collect();
        assert_eq!(got[n].data, want, "{what}: {n} values");
    }
}

#[test]
fn views_strides_shared_storage_and_dtypes() {
    let bytes = std::fs::read(fixtures().join("torch/views.pth")).unwrap();
    let file = pth::read(&bytes).unwrap();
    let names: Vec<&str> = file.tensors.iter().map(|(n, _)| n.as_str()).collect();
    // Insertion order kept; the int64 `count` is not a float tensor and is dropped.
    assert_eq!(names, ["transposed", "head", "tail", "every_other", "f16", "bf16", "f64", "scalar", "param"]);
    let got: HashMap<String, Tensor> = file.tensors.into_iter().collect();
    assert_same("views.pth", &got, &safetensors_f32(&fixtures().join("torch/views.safetensors")), |x| x);
    assert_eq!(got["transposed"].shape, [3, 5]);
    assert_eq!(got["tail"].data, [5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0, 8.5, 9.0, 9.5]);
    assert_eq!(got["every_other"].data, [0.5, 2.5, 4.5, 6.5, 8.5]);
    assert_eq!(got["scalar"].shape, Vec::<usize>::new());
}

#[test]
fn tiny_cvt_in_both_namings_equals_its_safetensors() {
    let t = fixtures().join("tiny");
    let pth = read_checkpoint(&t.join("official.pth")).unwrap();
    let st = read_checkpoint(&t.join("official.safetensors")).unwrap();
    assert_eq!(pth.naming, Naming::Official);
    assert_same("official.pth", &pth.tensors, &st.tensors, |x| x);
    // transformers' pytorch_model.bin layout, with int64 num_batches_tracked buffers.
    let bin = read_checkpoint(&t.join("pytorch_model.bin")).unwrap();
    let st = read_checkpoint(&t.join("hf.safetensors")).unwrap();
    assert_eq!(bin.naming, Naming::Hf);
    assert_same("pytorch_model.bin", &bin.tensors, &st.tensors, |x| x);
}

#[test]
fn wrapped_f16_checkpoint_with_module_prefix() {
    let ck = read_checkpoint(&fixtures().join("torch/wrapped.pth")).unwrap();
    let st = read_checkpoint(&fixtures().join("tiny/official.safetensors")).unwrap();
    assert_eq!(ck.naming, Naming::Official);
    assert_same("wrapped.pth (F16)", &ck.tensors, &st.tensors, |x| half::f16::from_f32(x).to_f32());
}

/// Runs the binary and asserts one error line with exit code 1 and no panic.
fn fails_with(args: &[&std::ffi::OsStr], needle: &str) -> String {
    let out = bin().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.contains("XDG_RUNTIME_DIR")).collect();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{:?} does not mention {needle:?}", lines[0]);
    lines[0].to_string()
}

#[test]
fn refuses_foreign_globals_and_broken_archives() {
    let dir = tmpdir("bad");
    let f = fixtures().join("torch");
    // A pickle that calls os.system: refused by name, and nothing runs (the payload
    // would `touch cvt-gpu-pwned` in the working directory).
    let line = fails_with(&["convert".as_ref(), f.join("evil.pth").as_os_str(), dir.join("x.safetensors").as_os_str()], "posix.system");
    assert!(line.contains("evil.pth"), "{line}");
    assert!(!Path::new("cvt-gpu-pwned").exists() && !dir.join("cvt-gpu-pwned").exists());
    let err = format!("{:#}", pth::read(&std::fs::read(f.join("evil.pth")).unwrap()).err().unwrap());
    assert!(err.contains("refuses the Python global `posix.system`"), "{err}");

    fails_with(&["convert".as_ref(), f.join("missing_storage.pth").as_os_str(), dir.join("x.safetensors").as_os_str()], "lacks views/data/0");

    let whole = std::fs::read(fixtures().join("tiny/official.pth")).unwrap();
    let cut = dir.join("truncated.pth");
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    fails_with(&["infer".as_ref(), "--weights".as_ref(), cut.as_os_str(), "x.png".as_ref()], "truncated.pth: PyTorch checkpoint: not a readable zip archive");
    let garbage = dir.join("garbage.bin");
    std::fs::write(&garbage, b"PK\x03\x04 this is not really a zip file at all").unwrap();
    fails_with(&["convert".as_ref(), garbage.as_os_str(), dir.join("x.safetensors").as_os_str()], "garbage.bin: PyTorch checkpoint: not a readable zip archive");
    // Each tensor's extent is checked against its storage before reading.
    assert!(!dir.join("x.safetensors").exists());
}

fn infer_json(weights: &Path, extra: &[&str]) -> serde_json::Value {
    let t = fixtures().join("tiny");
    let out = bin().arg("infer").arg("--weights").arg(weights).args(extra).args(["--no-resize", "--json", "--topk", "10"]).arg(t.join("chelsea64.png")).arg(t.join("coffee64.png")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn convert(args: &[&std::ffi::OsStr]) -> String {
    let out = bin().arg("convert").args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn convert_gives_identical_logits_and_a_transformers_config() {
    let t = fixtures().join("tiny");
    let cfg = t.join("config.json");
    let dir = tmpdir("convert");
    // Official .pth -> safetensors: the same logits, bit for bit.
    let off = dir.join("official.safetensors");
    convert(&[t.join("official.pth").as_os_str(), off.as_os_str(), "--config".as_ref(), cfg.as_os_str()]);
    let from_pth = infer_json(&t.join("official.pth"), &["--config", cfg.to_str().unwrap()]);
    assert_eq!(from_pth, infer_json(&off, &[]), "official .pth vs its safetensors");
    // HF pytorch_model.bin -> HF safetensors + config.json (a directory output).
    let hf = dir.join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    convert(&[t.join("pytorch_model.bin").as_os_str(), hf.as_os_str(), "--naming".as_ref(), "hf".as_ref(), "--config".as_ref(), cfg.as_os_str()]);
    let from_bin = infer_json(&t.join("pytorch_model.bin"), &["--config", cfg.to_str().unwrap()]);
    assert_eq!(from_bin, infer_json(&hf.join("model.safetensors"), &[]), "pytorch_model.bin vs its safetensors");
    // Both files hold exactly the same tensors as torch wrote, plus BN counters.
    let back = read_checkpoint(&hf.join("model.safetensors")).unwrap();
    assert_eq!(back.naming, Naming::Hf);
    assert_same("hf export", &back.tensors, &read_checkpoint(&t.join("hf.safetensors")).unwrap().tensors, |x| x);
    let names = safetensors_names(&hf.join("model.safetensors"));
    assert!(names.iter().any(|n| n == "cvt.encoder.stages.2.layers.2.attention.attention.convolution_projection_value.convolution_projection.normalization.num_batches_tracked"));
    let c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(c["model_type"], "cvt");
    assert_eq!(c["embed_dim"], serde_json::json!([16, 32, 48]));
    assert_eq!(c["depth"], serde_json::json!([1, 2, 3]));
    assert_eq!(c["num_heads"], serde_json::json!([1, 2, 3]));
    assert_eq!(c["cls_token"], serde_json::json!([false, false, true]));
    assert_eq!(c["id2label"]["9"], "LABEL_9");
    // The export says what it computes: HF naming defaults to GELU, but the metadata
    // keeps this checkpoint's QuickGELU when it came from official names...
    let q = dir.join("q");
    let warn = convert(&[off.as_os_str(), q.as_os_str(), "--naming".as_ref(), "hf".as_ref()]);
    assert!(warn.contains("QuickGELU") && warn.contains("exact GELU"), "{warn}");
    assert_eq!(infer_json(&q.join("model.safetensors"), &[]), from_pth, "hf export of a QuickGELU model keeps its activation");
}

fn safetensors_names(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    safetensors::SafeTensors::deserialize(&bytes).unwrap().names().into_iter().cloned().collect()
}
