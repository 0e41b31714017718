//! Shared by the tests that run the `cvt-gpu` binary: running a command and
//! checking that a failure is one clean error line.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs `cmd` to completion: (success, stdout, stderr). A command that takes
/// minutes is a failure here: every case these tests run ends in seconds.
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let t = Instant::now();
    let out = cmd.output().unwrap();
    assert!(t.elapsed() < Duration::from_secs(120), "a command took {:?}", t.elapsed());
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A failed run that printed exactly one `error:` line mentioning `needle`, and
/// no panic or allocation abort.
pub fn one_line_error(what: &str, (ok, _, err): (bool, String, String), needle: &str) {
    assert!(!ok, "{what}: should fail");
    assert!(!err.contains("panicked") && !err.contains("memory allocation"), "{what}: crashed: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{what}: want one error line, got: {err}");
    assert!(lines[0].contains(needle), "{what}: error should mention {needle:?}: {}", lines[0]);
}

/// A class-dependent synthetic image: class c has a bright square in a class-specific corner.
pub fn synth(class: usize, i: usize, size: u32) -> image::RgbImage {
    image::RgbImage::from_fn(size, size, |x, y| {
        let (cx, cy) = ((class % 2) as u32 * size / 2, (class / 2 % 2) as u32 * size / 2);
        let inside = x >= cx && x < cx + size / 2 && y >= cy && y < cy + size / 2;
        let n = ((x * 31 + y * 17 + i as u32 * 13) % 40) as u8;
        if inside {
            image::Rgb([200 + n / 2, 180 + n, 60 + (class as u8) * 40])
        } else {
            image::Rgb([20 + n, 30, 40 + n])
        }
    })
}

/// DIR/train/<class>/*.png and DIR/val/<class>/*.png.
pub fn image_folder(dir: &Path, classes: &[&str], per_class: usize) {
    for split in ["train", "val"] {
        for (ci, c) in classes.iter().enumerate() {
            let d = dir.join(split).join(c);
            std::fs::create_dir_all(&d).unwrap();
            let n = if split == "train" { per_class } else { per_class / 2 };
            for i in 0..n {
                synth(ci, i + if split == "val" { 1000 } else { 0 }, 16).save(d.join(format!("{i}.png"))).unwrap();
            }
        }
    }
}

pub fn tensors(path: &Path) -> HashMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, v)| (n, v.data().to_vec())).collect()
}
