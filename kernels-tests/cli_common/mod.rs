//! Shared by the tests that run the `cvt-gpu` binary: running a command and
//! checking that a failure is one clean error line.
#![allow(dead_code)]

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
