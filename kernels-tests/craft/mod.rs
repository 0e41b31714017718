//! Shared by the fuzz and hostile-input tests: an allocator that bounds and
//! measures memory, and builders for crafted files (stored zips with lying
//! sizes, torch pickles, IDX arrays).
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Live heap bytes above which an allocation fails (and the process aborts,
/// loudly): far above anything a parser may need for the small inputs here.
pub const HARD_CAP: usize = 1 << 30;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// What is running (a name and an input number), for the abort message.
static NAME: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static NAME_LEN: AtomicUsize = AtomicUsize::new(0);
static INPUT: AtomicUsize = AtomicUsize::new(0);

pub fn set_current(name: &'static str, input: usize) {
    NAME.store(name.as_ptr().cast_mut(), Relaxed);
    NAME_LEN.store(name.len(), Relaxed);
    INPUT.store(input, Relaxed);
}

struct Counting;

#[global_allocator]
static ALLOC: Counting = Counting;

impl Counting {
    fn grow(&self, by: usize) -> bool {
        let live = LIVE.fetch_add(by, Relaxed) + by;
        if live > HARD_CAP {
            LIVE.fetch_sub(by, Relaxed);
            over_cap(by);
            return false;
        }
        PEAK.fetch_max(live, Relaxed);
        true
    }
}

/// Says what failed without allocating (the allocator is the one refusing).
fn over_cap(size: usize) {
    let mut buf = [0u8; 160];
    let mut n = 0;
    let mut put = |b: &[u8]| {
        let k = b.len().min(buf.len() - n);
        buf[n..n + k].copy_from_slice(&b[..k]);
        n += k;
    };
    put(b"\nallocation of ");
    put(digits(size as u64, &mut [0; 20]));
    put(b" bytes refused (live heap over 1 GiB)");
    let name = NAME.load(Relaxed);
    if !name.is_null() {
        put(b" in ");
        put(unsafe { std::slice::from_raw_parts(name, NAME_LEN.load(Relaxed)) });
        put(b" input #");
        put(digits(INPUT.load(Relaxed) as u64, &mut [0; 20]));
    }
    put(b"\n");
    unsafe { libc::write(2, buf.as_ptr().cast(), n) };
}

fn digits(mut v: u64, out: &mut [u8; 20]) -> &[u8] {
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &out[i..];
        }
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if self.grow(l.size()) {
            System.alloc(l)
        } else {
            std::ptr::null_mut()
        }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if self.grow(l.size()) {
            System.alloc_zeroed(l)
        } else {
            std::ptr::null_mut()
        }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > l.size() && !self.grow(new - l.size()) {
            return std::ptr::null_mut();
        }
        let q = System.realloc(p, l, new);
        if q.is_null() {
            LIVE.fetch_sub(new.saturating_sub(l.size()), Relaxed);
        } else if new < l.size() {
            LIVE.fetch_sub(l.size() - new, Relaxed);
        }
        q
    }
}

/// Tests in one binary share the counters: each holds this while it measures.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f`, returning its result, the peak heap growth it caused and its time.
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, usize, Duration) {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    let t = Instant::now();
    let out = f();
    let took = t.elapsed();
    (out, PEAK.load(Relaxed).saturating_sub(base), took)
}

/// CRC-32 as zip wants it.
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(data);
    c.sum()
}

/// A stored (uncompressed) zip of `entries`, written by hand so a test can lie:
/// `declared` replaces one entry's uncompressed size in the central directory
/// (as a zip64 extra field when it does not fit 32 bits).
pub fn zip_stored(entries: &[(String, Vec<u8>)], declared: Option<(usize, u64)>) -> Vec<u8> {
    let (mut out, mut cd) = (vec![], vec![]);
    for (i, (name, data)) in entries.iter().enumerate() {
        let (crc, len, offset) = (crc32(data), data.len() as u32, out.len() as u32);
        out.extend(b"PK\x03\x04");
        out.extend([20u16, 0, 0, 0, 0].iter().flat_map(|v| v.to_le_bytes())); // version, flags, stored, time, date
        out.extend([crc, len, len].iter().flat_map(|v| v.to_le_bytes()));
        out.extend([name.len() as u16, 0].iter().flat_map(|v| v.to_le_bytes()));
        out.extend(name.as_bytes());
        out.extend(data);
        let size = declared.filter(|d| d.0 == i).map_or(data.len() as u64, |d| d.1);
        let (size32, extra) = match u32::try_from(size) {
            Ok(s) if s != u32::MAX => (s, vec![]),
            _ => (u32::MAX, [1u16.to_le_bytes(), 8u16.to_le_bytes()].concat().into_iter().chain(size.to_le_bytes()).collect()),
        };
        cd.extend(b"PK\x01\x02");
        cd.extend([45u16, 45, 0, 0, 0, 0].iter().flat_map(|v| v.to_le_bytes())); // made by, needed, flags, stored, time, date
        cd.extend([crc, len, size32].iter().flat_map(|v| v.to_le_bytes()));
        cd.extend([name.len() as u16, extra.len() as u16, 0, 0, 0].iter().flat_map(|v| v.to_le_bytes())); // name, extra, comment, disk, internal attributes
        cd.extend([0u32, offset].iter().flat_map(|v| v.to_le_bytes())); // external attributes, local header
        cd.extend(name.as_bytes());
        cd.extend(extra);
    }
    let (cd_at, n) = (out.len() as u32, entries.len() as u16);
    out.extend(&cd);
    out.extend(b"PK\x05\x06");
    out.extend([0u16, 0, n, n].iter().flat_map(|v| v.to_le_bytes()));
    out.extend([cd.len() as u32, cd_at].iter().flat_map(|v| v.to_le_bytes()));
    out.extend(0u16.to_le_bytes());
    out
}

/// The entries of a zip (read with the zip crate), to rebuild it around a changed entry.
pub fn zip_entries(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut v = vec![];
            f.read_to_end(&mut v).unwrap();
            (f.name().to_string(), v)
        })
        .collect()
}

/// A torch.save archive `archive/` of a pickle and float storages `data/<i>`.
pub fn torch_zip(pkl: &[u8], storages: &[Vec<u8>]) -> Vec<u8> {
    let mut e = vec![("archive/data.pkl".to_string(), pkl.to_vec()), ("archive/byteorder".to_string(), b"little".to_vec())];
    e.extend(storages.iter().enumerate().map(|(i, s)| (format!("archive/data/{i}"), s.clone())));
    zip_stored(&e, None)
}

/// Pickle opcodes, enough to write the state dicts torch.save writes.
pub mod pk {
    pub fn global(module: &str, name: &str) -> Vec<u8> {
        [b"c", module.as_bytes(), b"\n", name.as_bytes(), b"\n"].concat()
    }
    pub fn str(s: &str) -> Vec<u8> {
        [b"X", &(s.len() as u32).to_le_bytes()[..], s.as_bytes()].concat()
    }
    /// LONG1 of 8 bytes: any i64.
    pub fn int(v: i64) -> Vec<u8> {
        [&[0x8a, 8][..], &v.to_le_bytes()].concat()
    }
    pub fn tuple(items: &[Vec<u8>]) -> Vec<u8> {
        [b"(".to_vec(), items.concat(), b"t".to_vec()].concat()
    }
    pub fn ints(v: &[i64]) -> Vec<u8> {
        tuple(&v.iter().map(|&i| int(i)).collect::<Vec<_>>())
    }
    /// `_rebuild_tensor_v2(FloatStorage key, offset, shape, stride, False, OrderedDict())`.
    pub fn tensor(key: usize, offset: i64, shape: &[i64], stride: &[i64]) -> Vec<u8> {
        let pid = tuple(&[str("storage"), global("torch", "FloatStorage"), str(&key.to_string()), str("cpu"), int(0)]);
        let args = tuple(&[[pid, b"Q".to_vec()].concat(), int(offset), ints(shape), ints(stride), b"\x89".to_vec(), ordered_dict()]);
        [global("torch._utils", "_rebuild_tensor_v2"), args, b"R".to_vec()].concat()
    }
    pub fn ordered_dict() -> Vec<u8> {
        [global("collections", "OrderedDict"), b")R".to_vec()].concat()
    }
    /// A whole program: an OrderedDict of `(name, value)` items, then STOP.
    pub fn state_dict(items: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let body: Vec<u8> = items.iter().flat_map(|(k, v)| [str(k), v.clone(), b"s".to_vec()].concat()).collect();
        [&b"\x80\x02"[..], &ordered_dict(), &body, b"."].concat()
    }
}

/// An IDX array of bytes with the given dimensions (sizes as written, so a test
/// can declare any).
pub fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    v.extend(dims.iter().flat_map(|d| d.to_be_bytes()));
    v.extend(data);
    v
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(vec![], flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Float32 little-endian bytes.
pub fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
