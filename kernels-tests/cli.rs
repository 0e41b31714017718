//! The command line as a user meets it: a real inference through the binary, and
//! every kind of bad input ending in one clear line on stderr and exit code 1.

mod scratch;
use scratch::Scratch;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cvt-gpu"))
}

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels-tests/reference/fixtures/tiny")
}

fn tmpdir(tag: &str) -> Scratch {
    Scratch::new(&format!("cli-{tag}"))
}

/// Runs `cvt-gpu infer` and asserts a one-line error mentioning `needle`.
fn fails_with(args: &[&str], needle: &str) {
    let out = bin().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.contains("XDG_RUNTIME_DIR")).collect();
    assert_eq!(out.status.code(), Some(1), "{args:?}: exit {:?}, stderr {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {stderr}");
    assert!(lines[0].starts_with("error: "), "{args:?}: {stderr}");
    assert!(lines[0].contains(needle), "{args:?}: {:?} does not mention {needle:?}", lines[0]);
}

#[test]
fn infer_prints_json_top_k_matching_torch() {
    let d = tiny();
    // `--f16`: f16 weights (and activations with shader-f16); 1e-2 as in
    // model.rs's f16 tests, which measured 1.5-2.3e-3.
    for (f16, tol) in [(false, 1e-4), (true, 1e-2)] {
        let out = bin()
            .args(["infer", "--weights"])
            .arg(d.join("official.safetensors"))
            .arg("--config")
            .arg(d.join("config.json"))
            .args(["--no-resize", "--json", "--topk", "3"])
            .args(f16.then_some("--f16"))
            .arg(d.join("chelsea64.png"))
            .arg(d.join("coffee64.png"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("expected.json")).unwrap()).unwrap();
        for (i, r) in v.as_array().unwrap().iter().enumerate() {
            let top = r["top"].as_array().unwrap();
            assert_eq!(top.len(), 3);
            let want = exp["logits_quick_gelu"][i].as_array().unwrap();
            let argmax = (0..want.len()).max_by(|&a, &b| want[a].as_f64().unwrap().total_cmp(&want[b].as_f64().unwrap())).unwrap();
            assert_eq!(top[0]["index"].as_u64().unwrap() as usize, argmax);
            assert_eq!(top[0]["label"], format!("class {argmax}"));
            let p: Vec<f64> = top.iter().map(|t| t["probability"].as_f64().unwrap()).collect();
            assert!(p[0] >= p[1] && p[1] >= p[2] && p[0] <= 1.0 && p[2] > 0.0);
            let err = (top[0]["logit"].as_f64().unwrap() - want[argmax].as_f64().unwrap()).abs();
            assert!(err < tol, "f16={f16}: image {i}: top-1 logit off by {err:.2e}");
        }
    }
}

#[test]
fn infer_text_output_and_labels_file() {
    let d = tiny();
    let t = tmpdir("labels");
    let labels: String = (0..10).map(|i| format!("thing{i}\n")).collect();
    std::fs::write(t.join("labels.txt"), labels).unwrap();
    let out =
        bin().args(["infer", "-w"]).arg(d.join("hf.safetensors")).arg("--config").arg(d.join("config.json")).arg("--labels").arg(t.join("labels.txt")).arg(d.join("chelsea64.png")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.lines().next().unwrap().ends_with("chelsea64.png"));
    assert_eq!(s.lines().filter(|l| l.contains("thing")).count(), 5, "{s}");
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let d = tiny();
    let t = tmpdir("bad");
    let w = d.join("official.safetensors");
    let img = d.join("chelsea64.png");
    let cfg = d.join("config.json");
    let s = |p: &Path| p.to_str().unwrap().to_string();

    // Weights: missing, a directory, truncated, corrupt, unknown naming, wrong shape.
    fails_with(&["infer", "--weights", "/no/such/cvt.safetensors", &s(&img)], "/no/such/cvt.safetensors");
    fails_with(&["infer", "--weights", &s(&t), &s(&img)], "is a directory");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(t.join("trunc.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    fails_with(&["infer", "--weights", &s(&t.join("trunc.safetensors")), &s(&img)], "trunc.safetensors: not a valid safetensors file");
    std::fs::write(t.join("junk.safetensors"), b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    fails_with(&["infer", "--weights", &s(&t.join("junk.safetensors")), &s(&img)], "junk.safetensors: not a valid safetensors file");
    let one = |name: &str, shape: Vec<usize>| {
        let data = vec![0u8; shape.iter().product::<usize>() * 4];
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &data).unwrap();
        safetensors::serialize(vec![(name.to_string(), view)], &None).unwrap()
    };
    std::fs::write(t.join("other.safetensors"), one("encoder.layer.0.weight", vec![4, 4])).unwrap();
    fails_with(&["infer", "--weights", &s(&t.join("other.safetensors")), &s(&img)], "unknown parameter naming");
    // A correct checkpoint with one tensor of the wrong shape.
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let bad = vec![0u8; 17 * 4];
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = st.tensors().into_iter().filter(|(n, _)| n != "stage1.patch_embed.norm.weight").collect();
    views.push(("stage1.patch_embed.norm.weight".into(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![17], &bad).unwrap()));
    safetensors::serialize_to_file(views, &None, &t.join("shape.safetensors")).unwrap();
    fails_with(&["infer", "--weights", &s(&t.join("shape.safetensors")), "--config", &s(&cfg), &s(&img)], "stage1.patch_embed.norm.weight is [17], expected [32]");
    // Missing tensors (checkpoint of another architecture).
    fails_with(&["infer", "--weights", &s(&w), "--config", "cvt-13", &s(&img)], "missing");

    // Images: missing, zero bytes, not an image, a directory, wrong size for --no-resize.
    fails_with(&["infer", "--weights", &s(&w), "--config", &s(&cfg), "/no/such.png"], "/no/such.png");
    std::fs::write(t.join("empty.png"), b"").unwrap();
    fails_with(&["infer", "--weights", &s(&w), "--config", &s(&cfg), &s(&t.join("empty.png"))], "empty.png: empty file");
    std::fs::write(t.join("notes.png"), b"this is not a picture").unwrap();
    fails_with(&["infer", "--weights", &s(&w), "--config", &s(&cfg), &s(&t.join("notes.png"))], "notes.png");
    fails_with(&["infer", "--weights", &s(&w), "--config", &s(&cfg), &s(&t)], "is a directory");
    fails_with(&["infer", "--weights", &s(&w), "--config", &s(&cfg), "--no-resize", "--res", "32", &s(&img)], "--no-resize needs exactly 32x32");
    // Config and flags.
    std::fs::write(t.join("bad.json"), b"{\"dims\": [16]}").unwrap();
    fails_with(&["infer", "--weights", &s(&w), "--config", &s(&t.join("bad.json")), &s(&img)], "invalid CvT config JSON");
    fails_with(&["infer", "--weights", &s(&w), "--config", &s(&cfg), "--topk", "0", &s(&img)], "--topk");
    fails_with(&["bench", "--gemm", "--f16"], "--f16 applies to inference");
}

#[test]
fn adapters_lists_at_least_one() {
    let out = bin().args(["adapters", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let a = &v["adapters"].as_array().unwrap()[0];
    assert!(a["max_storage_buffer_binding_size"].as_u64().unwrap() > 0);
    assert!(!a["name"].as_str().unwrap().is_empty());
    // The resolved kernel profile of the adapter a command would open, each
    // choice with its source; `--kernels` forces the set.
    let p = &v["selected"]["profile"];
    assert!(["gpu", "cpu"].contains(&p["kernels"].as_str().unwrap()), "{p}");
    assert!(p["gemm"]["tiles"].as_array().unwrap().len() == 2, "{p}");
    let out = bin().args(["--kernels", "gpu", "adapters", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["selected"]["profile"]["kernels"], "gpu");
    assert_eq!(v["selected"]["profile"]["sources"]["kernels"], "setting");
    assert_eq!(v["selected"]["profile"]["row_lanes"], 64);
    // The option takes the place of the environment's setting, `auto` included.
    let out = bin().env("CVT_GPU_KERNELS", "gpu").args(["--kernels", "auto", "adapters", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(v["selected"]["profile"]["sources"]["kernels"], "setting", "{v}");
}

/// A bad kernel set, and an unknown setting, are one-line errors.
#[test]
fn bad_kernel_settings_are_one_line() {
    for (key, value, want) in
        [("CVT_GPU_KERNELS", "gpux", "error: CVT_GPU_KERNELS=gpux: expected `auto`, `gpu`, `cpu`"), ("CVT_GPU_KERNAL", "gpu", "error: CVT_GPU_KERNAL: unknown setting (did you mean CVT_GPU_KERNELS?)")]
    {
        let out = bin().env(key, value).args(["adapters"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().filter(|l| !l.trim().is_empty()).count(), 1, "{stderr}");
        assert!(stderr.starts_with(want), "{stderr}");
    }
}

#[test]
fn help_has_examples() {
    let out = bin().args(["infer", "--help"]).output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("Examples:") && s.contains("--weights"), "{s}");
}

/// The kernel-variant trial runs once per adapter and build: its choice is cached
/// on disk, keyed by adapter, driver and kernels; `--no-tune` neither reads nor
/// writes the cache.
#[test]
fn tuning_is_cached_on_disk_and_no_tune_skips_it() {
    let d = tiny();
    let infer_with = |cache: &Path, no_tune: bool, read: Option<&str>| {
        let mut c = bin();
        c.env("CVT_GPU_CACHE_DIR", cache).env_remove("CVT_GPU_KERNELS").env_remove("CVT_GPU_TEX_READ");
        if let Some(r) = read {
            c.env("CVT_GPU_TEX_READ", r);
        }
        if no_tune {
            c.arg("--no-tune");
        }
        let out = c.args(["infer", "--weights"]).arg(d.join("official.safetensors")).arg("--config").arg(d.join("config.json")).arg("--no-resize").arg(d.join("chelsea64.png")).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let infer = |cache: &Path, no_tune: bool| infer_with(cache, no_tune, None);
    let cache = tmpdir("tune");
    let first = infer(&cache, false);
    let text = std::fs::read_to_string(cache.join("tuning.json")).expect("tuning.json written");
    let table: serde_json::Value = serde_json::from_str(&text).unwrap();
    let (key, entry) = table.as_object().unwrap().iter().next().unwrap();
    assert!(key.contains("kernels ") && key.contains("cvt-gpu "), "{key}");
    let choice = entry["kernels"].as_str().unwrap().to_string();
    assert!(choice == "cpu" || choice == "gpu");
    let read = entry["texture_read"].as_str().unwrap();
    assert!(read == "storage" || read == "sampled", "{read}");
    // A second run reads the cache (same output, same file).
    assert_eq!(infer(&cache, false), first);
    assert_eq!(std::fs::read_to_string(cache.join("tuning.json")).unwrap(), text);
    let none = tmpdir("notune");
    assert_eq!(infer(&none, true), first);
    assert!(!none.join("tuning.json").exists());
    // A forced texture-read mode is honoured (same answer) but never cached: a
    // later run without it must still measure.
    let forced = tmpdir("forced");
    assert_eq!(infer_with(&forced, false, Some("sampled")), first);
    let text = std::fs::read_to_string(forced.join("tuning.json")).unwrap_or_default();
    assert!(!text.contains("texture_read") && !text.contains("\"kernels\""), "{text}");
}

#[test]
fn bad_texture_read_setting_is_one_line() {
    let mut c = bin();
    let out = c.env("CVT_GPU_TEX_READ", "fast").args(["bench", "--gemm"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.lines().any(|l| l.starts_with("error: CVT_GPU_TEX_READ=fast: expected `sampled`, `storage`")), "{stderr}");
}
