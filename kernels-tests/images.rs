//! Bounded image decoding and the windowed evaluation resize. This binary counts
//! every allocation and refuses any beyond a 512 MiB total (the process aborts),
//! so an extreme aspect ratio or a decompression bomb that slipped past the
//! limits fails here rather than swapping a test machine. The windowed resize is
//! checked against the full resize-then-crop it replaced (kept below as the
//! reference), and against torchvision in model.rs's fixture test.

mod scratch;
use cvt_gpu::preprocess::{self, decode_image_bytes, eval_transform, resize_bicubic, Spec};
use image::RgbImage;
use scratch::Scratch;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Mutex;

const CAP: usize = 512 << 20;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(l.size(), SeqCst) + l.size();
        if now > CAP {
            LIVE.fetch_sub(l.size(), SeqCst);
            return std::ptr::null_mut();
        }
        PEAK.fetch_max(now, SeqCst);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), SeqCst);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Tests measuring the peak run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Peak bytes allocated beyond what was live when `f` started.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(SeqCst);
    PEAK.store(base, SeqCst);
    let r = f();
    (r, PEAK.load(SeqCst) - base)
}

fn png(img: &RgbImage) -> Vec<u8> {
    let mut v = vec![];
    img.write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png).unwrap();
    v
}

fn random_image(w: u32, h: u32, seed: u64) -> RgbImage {
    let mut rng = cvt_gpu::util::Rng::new(seed);
    // Smooth gradients plus noise: both the kernel's smoothing and its overshoot clamping matter.
    RgbImage::from_fn(w, h, |x, y| {
        let n = (rng.next_u64() & 63) as u32;
        image::Rgb([((x * 7 + y * 3) % 200 + n) as u8, ((x * y) % 193 + n) as u8, if (x / 3 + y / 5) % 2 == 0 { 250 } else { n as u8 }])
    })
}

#[test]
fn extreme_aspect_costs_what_the_output_costs() {
    let _g = SERIAL.lock().unwrap();
    let spec = Spec::imagenet();
    for (w, h) in [(1u32, 60000u32), (60000, 1)] {
        let dir = Scratch::new("aspect");
        let path = dir.join(format!("{w}x{h}.png"));
        std::fs::write(&path, png(&RgbImage::from_fn(w, h, |x, y| image::Rgb([(x + y) as u8, 128, ((x + y) / 256) as u8])))).unwrap();
        let t = std::time::Instant::now();
        let (out, peak) = peak_during(|| spec.load(&path, 224, preprocess::Resize::Eval).unwrap());
        let secs = t.elapsed().as_secs_f64();
        eprintln!("{w}x{h}: {secs:.3} s, peak {:.1} MiB", peak as f64 / (1 << 20) as f64);
        assert_eq!(out.len(), 224 * 224 * 3);
        assert!(out.iter().all(|v| v.is_finite()));
        // Today's cost: a 180 KB image decoded, the 224x224 crop and its rows.
        assert!(peak < 32 << 20, "{w}x{h}: peak allocation {peak} bytes");
        assert!(secs < 1.0, "{w}x{h}: {secs} s");
        // The same at 384 (a warp, no crop): bounded too.
        let (_, peak) = peak_during(|| spec.load(&path, 384, preprocess::Resize::Eval).unwrap());
        assert!(peak < 32 << 20, "{w}x{h} at 384: peak allocation {peak} bytes");
    }
}

/// PNG bytes with the given header and a few KB of compressed zero rows: a
/// decompression bomb when the header is large.
fn png_bomb(w: u32, h: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend(kind);
        out.extend(data);
        out.extend(crc.sum().to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = vec![];
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]); // 8-bit grayscale
    chunk(&mut out, b"IHDR", &ihdr);
    let mut z = flate2::write::ZlibEncoder::new(vec![], flate2::Compression::best());
    std::io::Write::write_all(&mut z, &vec![0u8; (w as usize + 1) * 64]).unwrap();
    chunk(&mut out, b"IDAT", &z.finish().unwrap());
    chunk(&mut out, b"IEND", &[]);
    out
}

#[test]
fn oversized_images_are_refused_from_the_header() {
    let _g = SERIAL.lock().unwrap();
    // 40000 x 40000: 1.6 GB decoded from a few KB; 16000 x 16000 gray decodes to
    // 256 MB, within the decoder's limit, but its RGB copy would be 768 MB;
    // 70000 x 1: a side past the limit.
    for (w, h) in [(40000, 40000), (16000, 16000), (70000, 1)] {
        let bytes = png_bomb(w, h);
        assert!(bytes.len() < 1 << 20);
        let (r, peak) = peak_during(|| decode_image_bytes(&bytes, "bomb.png"));
        let e = format!("{:#}", r.unwrap_err());
        assert!(e.starts_with("bomb.png: image too large") && !e.contains('\n'), "{w}x{h}: {e}");
        assert!(peak < 16 << 20, "{w}x{h}: {peak} bytes allocated before refusing");
    }
    // A bomb within the limits decodes (the truncated data is an error, not a panic).
    let e = format!("{:#}", decode_image_bytes(&png_bomb(300, 3000), "short.png").unwrap_err());
    assert!(e.starts_with("short.png: cannot decode"), "{e}");
    // Through a file: the error names the path.
    let path = std::env::temp_dir().join(format!("cvt-gpu-bomb-{}.png", std::process::id()));
    std::fs::write(&path, png_bomb(40000, 40000)).unwrap();
    let e = format!("{:#}", preprocess::decode(&path).unwrap_err());
    assert!(e.contains(&path.display().to_string()) && e.contains("too large"), "{e}");
    std::fs::remove_file(&path).ok();
}

#[test]
fn garbage_bytes_give_errors() {
    let _g = SERIAL.lock().unwrap();
    let good = png(&random_image(13, 9, 1));
    assert_eq!(decode_image_bytes(&good, "x").unwrap().dimensions(), (13, 9));
    let mut rng = cvt_gpu::util::Rng::new(5);
    // Truncations and bit flips of a valid PNG: errors or images, never panics.
    for _ in 0..300 {
        let mut b = good.clone();
        let cut = (rng.next_u64() as usize) % b.len();
        if rng.uniform() < 0.5 {
            b.truncate(cut);
        } else {
            b[cut] ^= 1 << (rng.next_u64() % 8);
        }
        if let Err(e) = decode_image_bytes(&b, "fuzz") {
            assert!(format!("{e:#}").starts_with("fuzz: "), "{e:#}");
        }
    }
    assert!(format!("{:#}", decode_image_bytes(&[], "e").unwrap_err()).contains("empty"));
    assert!(format!("{:#}", decode_image_bytes(b"hello world", "t").unwrap_err()).contains("not a PNG"));
}

// The full resize-then-crop the windowed resize replaced, kept as the reference.
mod reference {
    use image::RgbImage;
    const PB: u32 = 22;

    fn bicubic(x: f64) -> f64 {
        let x = x.abs();
        if x < 1.0 {
            (1.5 * x - 2.5) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
        } else {
            0.0
        }
    }

    fn coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
        let scale = in_size as f64 / out_size as f64;
        let fs = scale.max(1.0);
        (0..out_size)
            .map(|xx| {
                let center = (xx as f64 + 0.5) * scale;
                let xmin = ((center - 2.0 * fs + 0.5) as i64).max(0) as usize;
                let xmax = ((center + 2.0 * fs + 0.5) as i64).min(in_size as i64) as usize;
                let w: Vec<f64> = (xmin..xmax).map(|x| bicubic((x as f64 - center + 0.5) / fs)).collect();
                let t: f64 = w.iter().sum();
                (xmin, w.iter().map(|&v| v / t * (1u64 << PB) as f64).map(|s| if s < 0.0 { (s - 0.5) as i32 } else { (s + 0.5) as i32 }).collect())
            })
            .collect()
    }

    /// One pass along x (`horizontal`) or y of a w x h RGB buffer.
    fn pass(src: &[u8], w: usize, h: usize, out_len: usize, horizontal: bool) -> Vec<u8> {
        let c = coeffs(if horizontal { w } else { h }, out_len);
        let (ow, oh) = if horizontal { (out_len, h) } else { (w, out_len) };
        let mut out = vec![0u8; ow * oh * 3];
        for y in 0..oh {
            for x in 0..ow {
                let (start, k) = &c[if horizontal { x } else { y }];
                for ch in 0..3 {
                    let mut ss: i64 = 1 << (PB - 1);
                    for (i, &wt) in k.iter().enumerate() {
                        let (sx, sy) = if horizontal { (start + i, y) } else { (x, start + i) };
                        ss += src[(sy * w + sx) * 3 + ch] as i64 * wt as i64;
                    }
                    out[(y * ow + x) * 3 + ch] = (ss >> PB).clamp(0, 255) as u8;
                }
            }
        }
        out
    }

    pub fn resize(img: &RgbImage, ow: usize, oh: usize) -> RgbImage {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mid = if ow != w { pass(img.as_raw(), w, h, ow, true) } else { img.as_raw().clone() };
        let out = if oh != h { pass(&mid, ow, h, oh, false) } else { mid };
        RgbImage::from_raw(ow as u32, oh as u32, out).unwrap()
    }

    pub fn eval(img: &RgbImage, res: usize) -> RgbImage {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let short = (res as f64 / 0.875) as usize;
        let (nw, nh) = if w <= h { (short, (short as f64 * h as f64 / w as f64) as usize) } else { ((short as f64 * w as f64 / h as f64) as usize, short) };
        let r = resize(img, nw, nh);
        // Half-to-even rounding of the offsets, as torchvision's CenterCrop.
        let off = |d: f64| {
            let r = d.round();
            (if (d - d.trunc()).abs() == 0.5 && (r as i64) % 2 != 0 { r - d.signum() } else { r }).max(0.0) as u32
        };
        image::imageops::crop_imm(&r, off((nw as f64 - res as f64) / 2.0), off((nh as f64 - res as f64) / 2.0), res as u32, res as u32).to_image()
    }
}

#[test]
fn windowed_resize_equals_full_resize_then_crop() {
    let _g = SERIAL.lock().unwrap();
    let mut rng = cvt_gpu::util::Rng::new(11);
    let mut sizes = vec![(451, 300), (300, 451), (256, 256), (257, 255), (224, 224), (37, 300), (900, 120), (16, 16), (1, 40), (333, 1)];
    for _ in 0..8 {
        sizes.push((20 + (rng.next_u64() % 500) as u32, 20 + (rng.next_u64() % 500) as u32));
    }
    for (i, &(w, h)) in sizes.iter().enumerate() {
        let img = random_image(w, h, i as u64);
        for res in [224, 96, 30] {
            assert_eq!(eval_transform(&img, res), reference::eval(&img, res), "{w}x{h} at {res}");
        }
        assert_eq!(eval_transform(&img, 384), reference::resize(&img, 384, 384), "{w}x{h} warp 384");
        assert_eq!(resize_bicubic(&img, 61, 47), reference::resize(&img, 61, 47), "{w}x{h} to 61x47");
    }
}
