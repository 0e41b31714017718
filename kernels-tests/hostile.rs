//! Crafted files that once crashed, hung or exhausted memory in the readers.
//! Each must give a clean error, quickly and within a small heap (the counting
//! allocator in `craft` aborts the process past 1 GiB).

mod scratch;
use scratch::Scratch;
mod craft;

use craft::{gzip, idx, pk, torch_zip, zip_stored};
use cvt_gpu::data::idx::{parse_idx, read_idx};
use cvt_gpu::models::cvt::weights::{read_checkpoint, read_checkpoint_bytes};
use std::path::Path;
use std::time::Duration;

/// Runs `f` under the allocator's eye: it must fail within `mem` bytes of heap
/// growth and a second, with an error containing `needle`. (Each test holds
/// `craft::serial()` throughout, so no other test allocates meanwhile.)
fn refused<T>(what: &str, mem: usize, needle: &str, f: impl FnOnce() -> anyhow::Result<T>) {
    let (res, peak, took) = craft::measure(f);
    let err = match res {
        Ok(_) => panic!("{what}: accepted"),
        Err(e) => format!("{e:#}"),
    };
    println!("{what}: {err} ({} KiB peak, {took:?})", peak >> 10);
    assert!(err.contains(needle), "{what}: {err:?} does not mention {needle:?}");
    assert!(!err.contains('\n'), "{what}: not one line: {err:?}");
    assert!(peak <= mem, "{what}: {peak} bytes of heap (at most {mem})");
    assert!(took < Duration::from_secs(1), "{what}: took {took:?}");
}

const MIB: usize = 1 << 20;

fn pth(pkl: &[u8], storages: &[Vec<u8>]) -> Vec<u8> {
    torch_zip(pkl, storages)
}

fn checkpoint(bytes: &[u8]) -> anyhow::Result<()> {
    read_checkpoint_bytes(bytes, "crafted.pth").map(drop)
}

#[test]
fn pickle_nested_a_million_deep() {
    let _g = craft::serial();
    // Built bottom-up (TUPLE1 around TUPLE1 ...): stopped by the depth limit.
    let mut p = b"\x80\x02)".to_vec();
    p.extend(std::iter::repeat_n(0x85, 1_000_000));
    p.push(b'.');
    let bytes = pth(&p, &[]);
    refused("tuples nested 10^6 deep", 16 * MIB, "more than 1000 deep", || checkpoint(&bytes));
    // Built top-down through the memo (each new list appended to the previous
    // one, which then leaves the stack): no depth is seen growing, so dropping
    // the chain must not recurse (it overflowed the stack).
    let mut p = b"\x80\x02]q\x00".to_vec();
    for _ in 0..900_000 {
        p.extend(b"]q\x01a0h\x01");
    }
    p.extend(b"0h\x00.");
    let bytes = pth(&p, &[]);
    refused("lists chained 900 000 deep", 256 * MIB, "holds a list, not a state dict", || checkpoint(&bytes));
}

#[test]
fn memo_doubling() {
    let _g = craft::serial();
    // Each round puts the top in the memo, gets it back and pairs the copies:
    // deep copies would hold 2^40 tuples after 40 rounds.
    let mut p = b"\x80\x02)".to_vec();
    for _ in 0..40 {
        p.extend(b"q\x00h\x00\x86");
    }
    p.push(b'.');
    let bytes = pth(&p, &[]);
    refused("memo doubling 40 rounds", MIB, "holds a tuple, not a state dict", || checkpoint(&bytes));
    // MEMOIZE one value forever: every entry counts against the value budget.
    let mut p = b"\x80\x02N".to_vec();
    p.extend(std::iter::repeat_n(0x94, 5_000_000));
    let bytes = pth(&p, &[]);
    refused("5M memo entries", 256 * MIB, "more than 2000000 values", || checkpoint(&bytes));
}

#[test]
fn zip_entries_declaring_huge_sizes() {
    let _g = craft::serial();
    let pkl = pk::state_dict(&[("stage0.w", pk::tensor(0, 0, &[2], &[1]))]);
    let entries = vec![("archive/data.pkl".to_string(), pkl), ("archive/data/0".to_string(), craft::f32s(&[1.0, 2.0]))];
    assert!(checkpoint(&zip_stored(&entries, None)).is_ok(), "the honest archive must read");
    for (i, size) in [(0, 1u64 << 40), (1, 1 << 40), (0, u64::MAX), (1, u64::MAX - 1), (0, 1 << 33)] {
        let bytes = zip_stored(&entries, Some((i, size)));
        refused(&format!("entry {i} declaring {size} bytes"), MIB, "crafted.pth: PyTorch checkpoint", || checkpoint(&bytes));
    }
}

#[test]
fn zip_claiming_more_entries_than_bytes() {
    let _g = craft::serial();
    let mut bytes = torch_zip(&pk::state_dict(&[]), &[]);
    let n = bytes.len();
    // End of central directory: entry counts at 8 and 10, directory size at 12.
    bytes[n - 14..n - 10].copy_from_slice(&[0xff; 4]);
    refused("65535 entries in a small zip", MIB, "not a readable zip archive", || checkpoint(&bytes));
    bytes[n - 10..n - 6].copy_from_slice(&[0xff; 4]);
    refused("and a 4 GiB directory", MIB, "not a readable zip archive", || checkpoint(&bytes));
}

#[test]
fn views_beyond_their_storage() {
    let _g = craft::serial();
    let data = craft::f32s(&[1.0, 2.0, 3.0, 4.0]);
    let view = |shape: &[i64], stride: &[i64]| pth(&pk::state_dict(&[("stage0.w", pk::tensor(0, 0, shape, stride))]), &[data.clone()]);
    let ok = view(&[2, 2], &[1, 2]);
    let ck = read_checkpoint_bytes(&ok, "ok").unwrap();
    assert_eq!(ck.tensors["stage0.w"].data, [1.0, 3.0, 2.0, 4.0], "a transposed view reads back");
    // Zero strides over a huge shape: one stored element, 2^40 in the view.
    let bytes = view(&[1 << 20, 1 << 20], &[0, 0]);
    refused("zero strides, 2^40 elements", MIB, "more elements than its storage", || checkpoint(&bytes));
    // Products that overflow: the shape, and the offsets (4 * 2^62 wraps to 0).
    let bytes = view(&[1 << 32, 1 << 32, 1 << 32], &[0, 0, 0]);
    refused("shape product overflows", MIB, "more elements than its storage", || checkpoint(&bytes));
    let bytes = view(&[5, 1], &[1 << 62, 1]);
    refused("wrapping stride arithmetic", MIB, "view offsets overflow", || checkpoint(&bytes));
    let bytes = view(&[3, 3], &[i64::MAX, i64::MAX]);
    refused("strides of 2^63 - 1", MIB, "view offsets overflow", || checkpoint(&bytes));
    let bytes = pth(&pk::state_dict(&[("stage0.w", pk::tensor(0, i64::MAX, &[1], &[1]))]), &[data.clone()]);
    refused("offset far past the storage", MIB, "view reaches element", || checkpoint(&bytes));
    // One small storage read back by many tensors.
    let items: Vec<(String, Vec<u8>)> = (0..3000).map(|i| (format!("stage0.w{i}"), pk::tensor(0, 0, &[1 << 14], &[1]))).collect();
    let items: Vec<(&str, Vec<u8>)> = items.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let bytes = pth(&pk::state_dict(&items), &[vec![0; 4 << 14]]);
    refused("3000 tensors over one storage", 64 * MIB, "many times more elements", || checkpoint(&bytes));
}

#[test]
fn legacy_torch_file() {
    let _g = craft::serial();
    // What torch.save wrote before 1.6: the magic number as a pickled LONG1,
    // the protocol version, then more pickles.
    let bytes = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.\x80\x02}q\x00.";
    refused("legacy torch.save", MIB, "crafted.pth: a legacy (before PyTorch 1.6) PyTorch checkpoint; re-save it", || checkpoint(bytes));
}

#[test]
fn duplicate_names_after_mapping() {
    let _g = craft::serial();
    let st = |names: &[&str]| {
        let data = craft::f32s(&[1.0]);
        let views: Vec<(String, safetensors::tensor::TensorView)> =
            names.iter().map(|n| (n.to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &data).unwrap())).collect();
        safetensors::tensor::serialize(views, &None).unwrap()
    };
    let bytes = st(&["stage0.x", "head.bias", "module.head.bias"]);
    refused("head.bias twice", MIB, "holds both head.bias and module.head.bias", || read_checkpoint_bytes(&bytes, "dup.safetensors").map(drop));
    let bytes = st(&["cvt.encoder.stages.0.cls_token", "encoder.stages.0.cls_token"]);
    refused("HF names mapping to one", MIB, "which are the same parameter stage0.cls_token", || read_checkpoint_bytes(&bytes, "dup.safetensors").map(drop));
    assert!(read_checkpoint_bytes(&st(&["stage0.x", "module.head.bias"]), "one").is_ok());
}

#[test]
fn idx_sizes_that_wrap_or_lie() {
    let _g = craft::serial();
    // 2^16 to the 4th is 2^64: wrapped to 0, the header declared an empty array.
    let bytes = idx(&[1 << 16; 4], &[]);
    refused("IDX size product wraps to 0", MIB, "declare more than", || parse_idx(&bytes));
    refused("IDX of 2^32 - 1 cubed", MIB, "declare more than", || parse_idx(&idx(&[u32::MAX; 3], &[1])));
    refused("IDX with 255 dimensions", MIB, "255 dimensions", || parse_idx(&idx(&[1; 255], &[1])));
    refused("IDX with a zero dimension", MIB, "dimension 1 is 0", || parse_idx(&idx(&[3, 0, 2], &[])));
    refused("IDX with trailing bytes", MIB, "more data than dimensions [2, 2]", || parse_idx(&idx(&[2, 2], &[0; 5])));
    refused("gzipped IDX with trailing bytes", MIB, "more data than dimensions [2]", || parse_idx(&gzip(&idx(&[2], &[0; 3]))));
    let ok = parse_idx(&gzip(&idx(&[2, 3], &[1, 2, 3, 4, 5, 6]))).unwrap();
    assert_eq!((ok.dims, ok.data), (vec![2, 3], vec![1, 2, 3, 4, 5, 6]));
}

#[test]
fn idx_gzip_bomb() {
    let _g = craft::serial();
    use std::io::Write;
    // 1 GiB of zeros behind a header declaring 10 images of 28x28, compressed
    // as a stream (about 1 MB): inflating stops one byte past the 7840 declared.
    let head = idx(&[10, 28, 28], &[]);
    let mut e = flate2::write::GzEncoder::new(vec![], flate2::Compression::fast());
    e.write_all(&head).unwrap();
    let zeros = vec![0u8; MIB];
    for _ in 0..1024 {
        e.write_all(&zeros).unwrap();
    }
    let bomb = e.finish().unwrap();
    drop(zeros);
    assert!(bomb.len() < 8 * MIB, "{} compressed bytes", bomb.len());
    refused("gzip bomb", MIB, "more data than dimensions [10, 28, 28]", || parse_idx(&bomb));
    // A header may not declare more than any IDX file this program reads.
    refused("header declaring 2^60 bytes", MIB, "declare more than", || parse_idx(&gzip(&idx(&[1 << 30, 1 << 30, 1], &[]))));
}

fn tmpdir() -> Scratch {
    Scratch::new("hostile")
}

/// Runs a read on another thread: a reader that opens a FIFO blocks forever.
fn within_a_second<T: Send + 'static>(what: &str, f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(f().map(drop).map_err(|e| format!("{e:#}"))));
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Err(e)) => e,
        Ok(Ok(())) => panic!("{what}: accepted"),
        Err(_) => panic!("{what}: still blocked after 5 s"),
    }
}

#[test]
fn devices_and_fifos_are_refused_at_once() {
    let _g = craft::serial();
    let dir = tmpdir();
    let fifo = dir.join("fifo");
    let _ = std::fs::remove_file(&fifo);
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let zero = Path::new("/dev/zero").to_path_buf();
    for p in [zero, fifo] {
        let shown = p.display().to_string();
        let q = p.clone();
        let e = within_a_second("weights", move || read_checkpoint(&q));
        assert!(e.starts_with(&shown) && e.contains("not a regular file"), "{e}");
        let q = p.clone();
        let e = within_a_second("labels", move || cvt_gpu::labels::read_labels(&q));
        assert!(e.starts_with(&shown) && e.contains("not a regular file") && e.contains("labels file"), "{e}");
        let q = p.clone();
        let e = within_a_second("IDX", move || read_idx(&q));
        assert!(e.contains("not a regular file"), "{e}");
        let e = within_a_second("config", move || cvt_gpu::models::cvt::config::CvtConfig::by_name(&p.display().to_string()));
        assert!(e.contains("not a regular file"), "{e}");
    }
}
