//! Class names: the ImageNet-1k list embedded in the binary (index = sorted
//! WordNet-id order, the standard class index of the released checkpoints), or a
//! user's file with one label per line.

use anyhow::{anyhow, bail, Result};
use std::path::Path;

const IMAGENET: &str = include_str!("imagenet_classes.txt");

/// The 1000 ImageNet-1k class names.
pub fn imagenet() -> Vec<String> {
    IMAGENET.lines().map(str::to_string).collect()
}

/// Reads one label per line (blank trailing lines ignored).
pub fn read_labels(path: &Path) -> Result<Vec<String>> {
    let text = crate::util::read_text_limited(path, crate::util::limits::TEXT, "labels file")?;
    parse_labels(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// `read_labels` of a file's text. Errors are bare reasons.
pub fn parse_labels(text: &str) -> Result<Vec<String>> {
    let labels: Vec<String> = text.lines().map(|l| l.trim().to_string()).collect::<Vec<_>>();
    let n = labels.iter().rposition(|l| !l.is_empty()).map_or(0, |i| i + 1);
    if n == 0 {
        bail!("labels file is empty");
    }
    Ok(labels[..n].to_vec())
}

/// Labels for a head of `classes` outputs: the explicit file, else the
/// checkpoint's own, else ImageNet for 1000 classes, else "class N".
pub fn for_head(classes: usize, file: Option<&Path>, from_checkpoint: Option<Vec<String>>) -> Result<Vec<String>> {
    let labels = match (file, from_checkpoint) {
        (Some(f), _) => read_labels(f)?,
        (None, Some(l)) => l,
        (None, None) if classes == 1000 => imagenet(),
        (None, None) => (0..classes).map(|i| format!("class {i}")).collect(),
    };
    if labels.len() != classes {
        let from = file.map(|f| format!("{}: ", f.display())).unwrap_or_else(|| "the checkpoint's metadata: ".into());
        bail!("{from}{} labels for a head with {classes} classes", labels.len());
    }
    Ok(labels)
}
