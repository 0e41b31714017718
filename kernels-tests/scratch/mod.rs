//! A test's scratch directory under the system's temporary directory: made
//! empty at the start, removed when the test passes, kept (its path printed)
//! when it fails, for a look at what the test wrote.

use std::path::{Path, PathBuf};

pub struct Scratch(PathBuf);

impl Scratch {
    /// `cvt-gpu-<tag>-<pid>`, empty.
    pub fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("cvt-gpu-{tag}-{}", std::process::id()));
        std::fs::remove_dir_all(&d).ok();
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for a look", self.0.display());
        } else {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }
}
