//! Image datasets on disk: an image folder (`train/<class>/*`, `val/<class>/*`)
//! and Tiny-ImageNet's official layout. Images are decoded on all CPU threads
//! when the dataset is opened, resized to the training resolution and kept in
//! memory as 8-bit RGB (Tiny-ImageNet's 100,000 training images take 1.2 GB).
//! An image that does not decode is skipped with a warning and counted.

use super::Dataset;
use crate::util::{limits, read_text_limited};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Image files are recognised by extension here (content is checked when decoding).
fn is_image(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref(), Some("png" | "jpg" | "jpeg" | "webp" | "bmp"))
}

fn sorted_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).with_context(|| format!("{}: cannot read directory", dir.display()))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    v.sort();
    Ok(v)
}

/// A list of (file, class index) with the class names.
#[derive(Debug)]
pub struct FileList {
    pub files: Vec<(PathBuf, u32)>,
    pub classes: Vec<String>,
}

/// Names for a message: the first few, then how many more.
fn name_list(names: &[&str]) -> String {
    let mut s = names.iter().take(8).copied().collect::<Vec<_>>().join(", ");
    if names.len() > 8 {
        s += &format!(" and {} more", names.len() - 8);
    }
    s
}

/// Classes with no file: an error for the split that defines the classes (such a
/// class would be in the model's output but never trained), a warning otherwise
/// (its validation accuracy is not measured).
fn check_classes(files: &[(PathBuf, u32)], shown: &[String], train: bool, dir: &Path) -> Result<()> {
    let mut count = vec![0usize; shown.len()];
    for (_, c) in files {
        count[*c as usize] += 1;
    }
    let empty: Vec<&str> = shown.iter().zip(&count).filter(|(_, &n)| n == 0).map(|(c, _)| c.as_str()).collect();
    if empty.is_empty() {
        Ok(())
    } else if train {
        bail!("{}: no image files (.png, .jpg, .jpeg, .webp, .bmp) for {} class(es): {} (every class needs training images)", dir.display(), empty.len(), name_list(&empty))
    } else {
        eprintln!("warning: {}: no validation images for {} class(es): {}", dir.display(), empty.len(), name_list(&empty));
        Ok(())
    }
}

/// The class directories of `dir`, sorted, as (name, path). The path is kept as
/// the file system has it; a name that is not UTF-8 is shown and stored in its
/// lossy form, so two names that read the same are refused (they would merge).
fn class_dirs(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let found: Vec<(String, PathBuf)> = sorted_dir(dir)?.into_iter().filter(|p| p.is_dir()).filter_map(|p| Some((p.file_name()?.to_string_lossy().into_owned(), p))).collect();
    let mut seen = std::collections::HashMap::new();
    for (name, path) in &found {
        if let Some(other) = seen.insert(name, path) {
            bail!(
                "{}: class directories {:?} and {:?} both read as class '{name}' (rename one to valid UTF-8)",
                dir.display(),
                other.file_name().unwrap_or_default(),
                path.file_name().unwrap_or_default()
            );
        }
    }
    Ok(found)
}

/// `split` of an image folder: one sub-directory per class, sorted by name (as
/// torchvision's ImageFolder). `classes` fixes the class order (the val split
/// must use the train split's); without it the split defines the classes and
/// every class must have images.
pub fn image_folder(root: &Path, split: &str, classes: Option<&[String]>) -> Result<FileList> {
    let dir = root.join(split);
    if !dir.is_dir() {
        bail!("{}: no {split}/ directory (expected {split}/<class>/<image files>)", root.display());
    }
    let found = class_dirs(&dir)?;
    let defines_classes = classes.is_none();
    let classes: Vec<String> = match classes {
        Some(c) => {
            if let Some((extra, _)) = found.iter().find(|(f, _)| !c.contains(f)) {
                bail!("{}: class {extra} is not among the training classes", dir.display());
            }
            c.to_vec()
        }
        None => found.iter().map(|(name, _)| name.clone()).collect(),
    };
    if classes.len() < 2 {
        bail!("{}: found {} class directories, need at least 2", dir.display(), classes.len());
    }
    let mut files = vec![];
    for (ci, c) in classes.iter().enumerate() {
        // A class missing here counts as empty (checked below).
        if let Some((_, cdir)) = found.iter().find(|(name, _)| name == c) {
            files.extend(sorted_dir(cdir)?.into_iter().filter(|f| f.is_file() && is_image(f)).map(|f| (f, ci as u32)));
        }
    }
    if files.is_empty() {
        bail!("{}: no image files (.png, .jpg, .jpeg, .webp, .bmp) under the class directories", dir.display());
    }
    check_classes(&files, &classes, defines_classes, &dir)?;
    Ok(FileList { files, classes })
}

/// Tiny-ImageNet (tiny-imagenet-200): `wnids.txt` fixes the classes, `words.txt`
/// names them, `train/<wnid>/images/*.JPEG` and `val/images/*` with
/// `val/val_annotations.txt` (file, wnid, box). Split "train" or "val".
pub fn tiny_imagenet(root: &Path, split: &str) -> Result<FileList> {
    let wnids_path = root.join("wnids.txt");
    if !wnids_path.exists() {
        bail!("{}: missing (is {} a tiny-imagenet-200 directory?)", wnids_path.display(), root.display());
    }
    let wnids: Vec<String> = read_text_limited(&wnids_path, limits::TEXT, "class id list")?.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
    if wnids.len() < 2 {
        bail!("{}: {} class ids, need at least 2", wnids_path.display(), wnids.len());
    }
    // Readable names from words.txt (optional): "n01443537\tgoldfish, Carassius auratus".
    let mut names = wnids.clone();
    let words_path = root.join("words.txt");
    if words_path.exists() {
        for line in read_text_limited(&words_path, limits::TEXT, "class names file")?.lines() {
            if let Some((id, w)) = line.split_once('\t') {
                if let Some(i) = wnids.iter().position(|x| x == id) {
                    names[i] = w.split(',').next().unwrap_or(w).trim().to_string();
                }
            }
        }
    }
    let mut files = vec![];
    match split {
        "train" => {
            for (ci, id) in wnids.iter().enumerate() {
                let dir = root.join("train").join(id).join("images");
                if !dir.is_dir() {
                    bail!("{}: missing (every class of wnids.txt needs train/<wnid>/images/)", dir.display());
                }
                files.extend(sorted_dir(&dir)?.into_iter().filter(|f| f.is_file() && is_image(f)).map(|f| (f, ci as u32)));
            }
        }
        _ => {
            let ann = root.join("val").join("val_annotations.txt");
            let text = read_text_limited(&ann, limits::TEXT, "annotation list")?;
            for (ln, line) in text.lines().enumerate() {
                let mut parts = line.split('\t');
                let (Some(file), Some(id)) = (parts.next(), parts.next()) else {
                    if line.trim().is_empty() {
                        continue;
                    }
                    bail!("{}:{}: expected 'file<TAB>wnid<TAB>...'", ann.display(), ln + 1);
                };
                let ci = wnids.iter().position(|x| x == id).with_context(|| format!("{}:{}: class {id} is not in wnids.txt", ann.display(), ln + 1))?;
                files.push((root.join("val").join("images").join(file), ci as u32));
            }
        }
    }
    if files.is_empty() {
        bail!("{}: no {split} images found", root.display());
    }
    check_classes(&files, &wnids, split == "train", &root.join(split))?;
    Ok(FileList { files, classes: names })
}

/// Decodes every file (all CPU threads), resizing to res x res; returns the
/// dataset and the files that failed (with the reason), which are left out.
pub fn decode_all(list: &FileList, res: usize, progress: &dyn Fn(usize)) -> (Dataset, Vec<String>) {
    let n = list.files.len();
    let threads = std::thread::available_parallelism().map(|v| v.get()).unwrap_or(2).min(8);
    let px = res * res * 3;
    let done = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Vec<(usize, Result<Vec<u8>>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let done = &done;
                s.spawn(move || {
                    (t..n)
                        .step_by(threads)
                        .map(|i| {
                            let r = crate::preprocess::decode(&list.files[i].0).map(|img| {
                                let img = if img.width() as usize == res && img.height() as usize == res { img } else { crate::preprocess::resize_bicubic(&img, res, res) };
                                img.into_raw()
                            });
                            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            (i, r)
                        })
                        .collect()
                })
            })
            .collect();
        // Report progress from this thread while the workers run.
        loop {
            let d = done.load(std::sync::atomic::Ordering::Relaxed);
            progress(d);
            if d >= n || handles.iter().all(|h| h.is_finished()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        handles.into_iter().map(|h| h.join().expect("decoder thread panicked")).collect()
    });
    let mut slots: Vec<Option<Result<Vec<u8>>>> = (0..n).map(|_| None).collect();
    for r in results.into_iter().flatten() {
        slots[r.0] = Some(r.1);
    }
    let mut images = Vec::with_capacity(n * px);
    let mut labels = vec![];
    let mut failed = vec![];
    for (i, r) in slots.into_iter().enumerate() {
        match r.expect("every index decoded") {
            Ok(p) => {
                images.extend_from_slice(&p);
                labels.push(list.files[i].1);
            }
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    (Dataset { images, labels, height: res, width: res, channels: 3, classes: list.classes.clone() }, failed)
}
