//! Mutation fuzzing of every reader of untrusted files, on stable Rust. Seeds
//! (the real fixtures and small generated files) are mutated with a seeded PRNG
//! and fed to the bytes-level entry points; every input must end in Ok or an
//! error: never a panic, an abort (the allocator in `craft` refuses past 1 GiB
//! live), more than SOFT_CAP of heap growth or more than BUDGET of time.
//!
//! A failing input is written to target/fuzz-failures/ and named with its target
//! and iteration; a run is reproducible from FUZZ_SEED (default fixed).
//! FUZZ_SCALE multiplies the iteration counts for longer runs, FUZZ_ONLY=<target>
//! runs one target, and FUZZ_SAVE=<target>:<iteration> saves that input before
//! running it (for one that aborts the process: the abort message names it).
//! Inputs that once failed live in kernels-tests/fuzz-regressions/<target>-*.bin
//! and are replayed first.

mod craft;

use craft::{gzip, idx, pk, zip_entries, zip_stored};
use cvt_gpu::models::cvt::config::CvtConfig;
use cvt_gpu::models::cvt::weights::read_checkpoint_bytes;
use cvt_gpu::models::pth;
use cvt_gpu::util::Rng;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Heap growth one input may cause: the largest seed is under 1 MB.
const SOFT_CAP: usize = 256 << 20;
/// Time one input may take (the slowest real one takes milliseconds).
const BUDGET: Duration = Duration::from_secs(2);

type Run = fn(&[u8]) -> anyhow::Result<()>;
/// Turns a mutated seed into the file the reader sees (a zip rebuilt around a
/// mutated pickle, a gzipped IDX).
type Wrap = Rc<dyn Fn(&[u8]) -> Vec<u8>>;

struct Target {
    name: &'static str,
    iters: usize,
    seeds: Vec<(Vec<u8>, Option<Wrap>)>,
    /// Fragments of the format the mutator inserts, often many times over.
    tokens: &'static [&'static [u8]],
    run: Run,
}

/// Pickle opcodes that nest, share and build (tuples, lists, dicts, the memo, calls).
const PICKLE: &[&[u8]] = &[
    b"(",
    b")",
    b"t",
    b"\x85",
    b"\x86",
    b"]",
    b"a",
    b"e",
    b"l",
    b"}",
    b"s",
    b"u",
    b"d",
    b"q\x00",
    b"h\x00",
    b"\x94",
    b"2",
    b"0",
    b"R",
    b"Q",
    b"b",
    b"N",
    b"K\x00",
    b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f",
];
const ZIP: &[&[u8]] = &[b"PK\x01\x02", b"PK\x03\x04", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07", b"\xff\xff\xff\xff"];
const JSON: &[&[u8]] = &[b"[", b"]", b"{", b"}", b",", b"0", b"-1", b"1e309", b"18446744073709551616", b"null", b"\"dtype\":\"F16\"", b"\"shape\":[", b"\"data_offsets\":["];

fn fixture(rel: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels-tests/reference/fixtures").join(rel)).unwrap()
}

fn plain(seeds: Vec<Vec<u8>>) -> Vec<(Vec<u8>, Option<Wrap>)> {
    seeds.into_iter().map(|s| (s, None)).collect()
}

// ---- the targets ----

fn run_checkpoint(b: &[u8]) -> anyhow::Result<()> {
    read_checkpoint_bytes(b, "fuzz").map(drop)
}

/// A torch archive counts as accepted when `pth::read` takes it (some seeds do
/// not use CvT names); the name mapping then runs on it as well.
fn run_torch(b: &[u8]) -> anyhow::Result<()> {
    pth::read(b)?;
    let _ = read_checkpoint_bytes(b, "fuzz");
    Ok(())
}

fn run_idx(b: &[u8]) -> anyhow::Result<()> {
    let a = cvt_gpu::data::idx::parse_idx(b)?;
    assert_eq!(a.dims.iter().product::<usize>(), a.data.len());
    Ok(())
}

fn run_config(b: &[u8]) -> anyhow::Result<()> {
    let cfg: CvtConfig = serde_json::from_str(std::str::from_utf8(b)?)?;
    cfg.validate()
}

fn run_labels(b: &[u8]) -> anyhow::Result<()> {
    let labels = cvt_gpu::labels::parse_labels(std::str::from_utf8(b)?)?;
    cvt_gpu::labels::for_head(labels.len(), None, Some(labels)).map(drop)
}

fn safetensors_seed() -> Vec<u8> {
    use safetensors::{tensor::TensorView, Dtype};
    let f32s = craft::f32s(&[1.0, -2.0, 0.5, 3.0, 0.0, 7.0]);
    let halves: Vec<u8> = [1.0f32, 2.0, -0.25, 9.0].iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
    let count = 7i64.to_le_bytes();
    let views = vec![
        ("stage0.a", TensorView::new(Dtype::F32, vec![2, 3], &f32s).unwrap()),
        ("stage0.b", TensorView::new(Dtype::F16, vec![4], &halves).unwrap()),
        ("stage0.c", TensorView::new(Dtype::BF16, vec![2, 2], &halves).unwrap()),
        ("stage0.bn.num_batches_tracked", TensorView::new(Dtype::I64, vec![], &count).unwrap()),
        ("optim.step", TensorView::new(Dtype::I64, vec![1], &count).unwrap()),
    ];
    let meta = Some([("format".to_string(), "pt".to_string())].into());
    safetensors::tensor::serialize(views, &meta).unwrap()
}

/// Small state dicts with views, nesting under `state_dict` and a parameter.
fn pickle_seeds() -> Vec<(Vec<u8>, Vec<Vec<u8>>)> {
    let data = vec![craft::f32s(&(0..12).map(|i| i as f32).collect::<Vec<_>>()), craft::f32s(&[5.0, 6.0])];
    let views = pk::state_dict(&[
        ("stage0.t", pk::tensor(0, 0, &[3, 4], &[1, 3])),
        ("stage0.tail", pk::tensor(0, 6, &[6], &[1])),
        ("stage0.p", [pk::global("torch._utils", "_rebuild_parameter"), pk::tuple(&[pk::tensor(1, 0, &[2], &[1]), b"\x88".to_vec(), pk::ordered_dict()]), b"R".to_vec()].concat()),
        ("stage0.s", pk::tensor(1, 1, &[], &[])),
    ]);
    let inner = &views[2..views.len() - 1];
    let wrapped = [&b"\x80\x02}"[..], &pk::str("epoch"), b"K\x03s", &pk::str("state_dict"), inner, b"s."].concat();
    vec![(views, data.clone()), (wrapped, data)]
}

/// `data.pkl` of a torch archive as the seed; the wrap rebuilds the archive.
fn pickle_in(archive: Vec<(String, Vec<u8>)>) -> (Vec<u8>, Option<Wrap>) {
    let at = archive.iter().position(|(n, _)| n.ends_with("data.pkl")).unwrap();
    let pkl = archive[at].1.clone();
    let wrap: Wrap = Rc::new(move |p: &[u8]| {
        let mut e = archive.clone();
        e[at].1 = p.to_vec();
        zip_stored(&e, None)
    });
    (pkl, Some(wrap))
}

fn run_image(b: &[u8]) -> anyhow::Result<()> {
    let img = cvt_gpu::preprocess::decode_image_bytes(b, "fuzz")?;
    // What `infer` does next: the evaluation resize and crop.
    cvt_gpu::preprocess::eval_transform(&img, 32);
    Ok(())
}

/// Small images in every format the engine decodes.
fn image_seeds() -> Vec<Vec<u8>> {
    let img = image::RgbImage::from_fn(13, 9, |x, y| image::Rgb([(x * 19) as u8, (y * 27) as u8, ((x + y) * 7) as u8]));
    let mut out = vec![fixture("tiny/chelsea64.png"), std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/samples/fmnist-bag.png")).unwrap()];
    for f in [image::ImageFormat::Png, image::ImageFormat::Jpeg, image::ImageFormat::WebP, image::ImageFormat::Bmp] {
        let mut v = std::io::Cursor::new(vec![]);
        img.write_to(&mut v, f).unwrap();
        out.push(v.into_inner());
    }
    out
}

fn targets() -> Vec<Target> {
    let torch_files = ["tiny/official.pth", "tiny/pytorch_model.bin", "torch/wrapped.pth", "torch/views.pth"].map(fixture);
    let small_torch: Vec<Vec<u8>> = pickle_seeds().iter().map(|(p, d)| craft::torch_zip(p, d)).collect();
    let mut pickles: Vec<(Vec<u8>, Option<Wrap>)> = torch_files.iter().map(|f| pickle_in(zip_entries(f))).collect();
    pickles.extend(small_torch.iter().map(|f| pickle_in(zip_entries(f))));
    let mut rng = Rng::new(7);
    let idx_raw: Vec<Vec<u8>> =
        [&[5u32][..], &[2, 3, 4], &[3, 6, 6], &[1, 1, 1, 1]].iter().map(|d| idx(d, &(0..d.iter().product::<u32>()).map(|_| rng.next_u64() as u8 % 10).collect::<Vec<_>>())).collect();
    let gz: Wrap = Rc::new(|b: &[u8]| gzip(b));
    let mut idx_seeds = plain(idx_raw.iter().map(|b| gzip(b)).collect());
    idx_seeds.extend(idx_raw.iter().flat_map(|b| [(b.clone(), None), (b.clone(), Some(gz.clone()))]));
    let json = |c: CvtConfig| serde_json::to_vec(&c).unwrap();
    vec![
        Target { name: "safetensors", iters: 60000, seeds: plain(vec![fixture("tiny/official.safetensors"), fixture("tiny/hf.safetensors"), safetensors_seed()]), tokens: JSON, run: run_checkpoint },
        Target { name: "torch-archive", iters: 60000, seeds: plain([torch_files.to_vec(), small_torch].concat()), tokens: ZIP, run: run_torch },
        Target { name: "pickle", iters: 45000, seeds: pickles, tokens: PICKLE, run: run_torch },
        Target { name: "idx", iters: 300000, seeds: idx_seeds, tokens: &[], run: run_idx },
        Target {
            name: "config",
            iters: 300000,
            seeds: plain(vec![fixture("tiny/config.json"), json(CvtConfig::cvt13()), json(CvtConfig::cvt_w24()), json(CvtConfig::cvt_fmnist())]),
            tokens: JSON,
            run: run_config,
        },
        Target {
            name: "labels",
            iters: 30000,
            seeds: plain(vec![b"cat\ndog\r\nbird \n\n".to_vec(), "\u{e9}t\u{e9}\nx\n".into(), include_bytes!("../src/imagenet_classes.txt").to_vec()]),
            tokens: &[b"\n", b"\r", b"\xff", b"\xc3"],
            run: run_labels,
        },
        Target { name: "image", iters: 100000, seeds: plain(image_seeds()), tokens: &[b"IHDR", b"IDAT", b"\xff\xd8", b"\xff\xc0", b"VP8 ", b"BM"], run: run_image },
    ]
}

// ---- the mutator ----

/// Integers that sit on the edges parsers get wrong.
const INTERESTING: [u64; 16] = [0, 1, 2, 0x7f, 0x80, 0xff, 0x7fff, 0xffff, 1 << 31, (1 << 31) - 1, (1 << 32) - 1, 1 << 32, 1 << 62, 1 << 63, (1 << 63) - 1, u64::MAX];

fn below(rng: &mut Rng, n: usize) -> usize {
    (rng.next_u64() % n.max(1) as u64) as usize
}

/// An offset in `0..=len`, near the start or the end half the time (headers,
/// zip directories), over a window of random (log-uniform) size.
fn offset(rng: &mut Rng, len: usize) -> usize {
    let w = (1usize << below(rng, 17)).min(len + 1);
    match below(rng, 4) {
        0 => below(rng, w),
        1 => len - below(rng, w),
        _ => below(rng, len + 1),
    }
}

/// One to four stacked mutations: bit flips, byte changes, inserts, deletes,
/// duplicated chunks, interesting integers, chunks spliced in from `donors`,
/// truncation, a token (or a chunk) repeated up to 16K times, and (for pickles)
/// an integer opcode replaced by a LONG1 holding an interesting value.
fn mutate(rng: &mut Rng, v: &mut Vec<u8>, donors: &[&[u8]], tokens: &[&[u8]]) {
    for _ in 0..1 + below(rng, 4) {
        let at = offset(rng, v.len());
        let long = below(rng, 4) == 0;
        let n = 1 + below(rng, if long { 256 } else { 16 });
        match below(rng, 11) {
            0 if at < v.len() => v[at] ^= 1 << below(rng, 8),
            1 if at < v.len() => v[at] = rng.next_u64() as u8,
            2 if at < v.len() => v[at] = v[at].wrapping_add(below(rng, 33) as u8).wrapping_sub(16),
            3 => {
                let bytes: Vec<u8> = (0..n.min(8)).map(|_| rng.next_u64() as u8).collect();
                v.splice(at..at, bytes);
            }
            4 => drop(v.drain(at..(at + n).min(v.len()))),
            5 => {
                let from = offset(rng, v.len());
                let chunk = v[from..(from + n).min(v.len())].to_vec();
                v.splice(at..at, chunk);
            }
            6 => {
                let width = 1 << below(rng, 4);
                let x = INTERESTING[below(rng, INTERESTING.len())].wrapping_add(below(rng, 3) as u64).wrapping_sub(1);
                let mut b = x.to_le_bytes()[..width].to_vec();
                if below(rng, 2) == 0 {
                    b.reverse();
                }
                let end = (at + width).min(v.len());
                v.splice(at..end, b);
            }
            7 => {
                let d = donors[below(rng, donors.len())];
                let from = offset(rng, d.len());
                let chunk = &d[from..(from + n).min(d.len())];
                let end = if below(rng, 2) == 0 { at } else { (at + chunk.len()).min(v.len()) };
                v.splice(at..end, chunk.iter().copied());
            }
            8 => v.truncate(at),
            10 if tokens == PICKLE => {
                // BININT1, BININT2, BININT: shapes, strides, offsets, memo-free ints.
                if let Some(i) = v[at..].iter().position(|b| b"KMJ".contains(b)).map(|i| at + i) {
                    let end = (i + [2, 3, 5][b"KMJ".iter().position(|&b| b == v[i]).unwrap()]).min(v.len());
                    let x = INTERESTING[below(rng, INTERESTING.len())].wrapping_add(below(rng, 3) as u64).wrapping_sub(1);
                    v.splice(i..end, [0x8a, 8].into_iter().chain(x.to_le_bytes()));
                }
            }
            9 => {
                let token = match tokens {
                    [] => v[at.min(v.len())..(at + 1 + below(rng, 8)).min(v.len())].to_vec(),
                    t => t[below(rng, t.len())].to_vec(),
                };
                let times = 1 << below(rng, 15);
                v.splice(at..at, token.iter().copied().cycle().take(token.len() * times).collect::<Vec<_>>());
            }
            _ => {}
        }
    }
}

// ---- the harness ----

struct Stats {
    iters: usize,
    accepted: usize,
    errors: usize,
    took: Duration,
    slowest: Duration,
    peak: usize,
}

fn failures_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("fuzz-failures");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs one input; Err says what went wrong (a panic, memory, time).
fn check(run: Run, input: &[u8], stats: &mut Stats) -> Result<(), String> {
    let (res, peak, took) = craft::measure(|| catch_unwind(AssertUnwindSafe(|| run(input))));
    stats.iters += 1;
    stats.slowest = stats.slowest.max(took);
    stats.peak = stats.peak.max(peak);
    match res {
        Ok(Ok(())) => stats.accepted += 1,
        // (An error may quote a name holding a newline: the CLI prints errors
        // on one line whatever they hold.)
        Ok(Err(e)) if e.to_string().is_empty() => return Err("an empty error".into()),
        Ok(Err(_)) => stats.errors += 1,
        Err(p) => return Err(format!("panic: {}", p.downcast_ref::<String>().map(String::as_str).or(p.downcast_ref::<&str>().copied()).unwrap_or("?"))),
    }
    if peak > SOFT_CAP {
        return Err(format!("{} MiB of heap", peak >> 20));
    }
    if took > BUDGET {
        return Err(format!("took {took:?}"));
    }
    Ok(())
}

fn fuzz_target(t: &Target, seed: u64, scale: f64, save: Option<usize>) -> (Stats, Vec<String>) {
    let mut stats = Stats { iters: 0, accepted: 0, errors: 0, took: Duration::ZERO, slowest: Duration::ZERO, peak: 0 };
    let mut failed = vec![];
    let mut fail = |what: String, input: &[u8], tag: String| {
        let path = failures_dir().join(format!("{}-{tag}.bin", t.name));
        std::fs::write(&path, input).unwrap();
        failed.push(format!("{} {tag}: {what} (input saved to {})", t.name, path.display()));
    };
    let start = Instant::now();
    // Inputs that once failed, replayed as they are.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels-tests/fuzz-regressions");
    let mut kept: Vec<PathBuf> = std::fs::read_dir(&dir).map(|d| d.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
    kept.retain(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("{}-", t.name)));
    kept.sort();
    for p in kept {
        let input = std::fs::read(&p).unwrap();
        if let Err(what) = check(t.run, &input, &mut stats) {
            fail(what, &input, format!("regression-{}", p.file_stem().unwrap().to_string_lossy()));
        }
    }
    let donors: Vec<&[u8]> = t.seeds.iter().map(|(s, _)| s.as_slice()).collect();
    // Accepted mutants join the corpus (bounded), so mutations can stack up.
    let mut corpus: Vec<(Vec<u8>, usize)> = t.seeds.iter().enumerate().map(|(i, (s, _))| (s.clone(), i)).collect();
    let mut rng = Rng::new(seed ^ t.name.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)));
    let iters = ((t.iters as f64 * scale) as usize).max(1);
    for i in 0..iters {
        // Half the time an original seed, so the real fixtures stay in play.
        let from = if below(&mut rng, 2) == 0 { t.seeds.len() } else { corpus.len() };
        let pick = below(&mut rng, from);
        let (mut input, origin) = (corpus[pick].0.clone(), corpus[pick].1);
        mutate(&mut rng, &mut input, &donors, t.tokens);
        let file = match &t.seeds[origin].1 {
            Some(wrap) => wrap(&input),
            None => input.clone(),
        };
        craft::set_current(t.name, i);
        if save == Some(i) {
            fail("saved on request".into(), &file, format!("seed{seed}-iter{i}"));
        }
        let before = stats.accepted;
        if let Err(what) = check(t.run, &file, &mut stats) {
            fail(what, &file, format!("seed{seed}-iter{i}"));
        } else if stats.accepted > before && corpus.len() < 64 && below(&mut rng, 4) == 0 {
            corpus.push((input, origin));
        }
    }
    stats.took = start.elapsed();
    (stats, failed)
}

#[test]
fn fuzz_all_readers() {
    let _g = craft::serial();
    let seed = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    let scale: f64 = std::env::var("FUZZ_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    // A panic's message comes with the input's number.
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        eprintln!("a fuzz input panicked (the list at the end names it):");
        default(info)
    }));
    let only = std::env::var("FUZZ_ONLY").ok();
    let save = std::env::var("FUZZ_SAVE").ok();
    let save = save.as_deref().and_then(|s| s.split_once(':'));
    let mut failed = vec![];
    let all = Instant::now();
    println!("fuzz seed {seed}, scale {scale}");
    for t in targets().iter().filter(|t| only.as_deref().is_none_or(|o| o == t.name)) {
        let (s, f) = fuzz_target(t, seed, scale, save.filter(|s| s.0 == t.name).and_then(|s| s.1.parse().ok()));
        println!(
            "{:14} {:6} inputs {:8.0}/s  accepted {:6}  errors {:6}  slowest {:7.2?}  peak heap {:4} MiB  ({:.1?})",
            t.name,
            s.iters,
            s.iters as f64 / s.took.as_secs_f64(),
            s.accepted,
            s.errors,
            s.slowest,
            s.peak >> 20,
            s.took
        );
        failed.extend(f);
    }
    println!("fuzz total {:.1?}", all.elapsed());
    assert!(failed.is_empty(), "{} failing inputs:\n{}", failed.len(), failed.join("\n"));
}
