//! Data-parallel training over MPI (`--features mpi`; `scripts/test-mpi.sh` runs
//! these): `mpirun -n 2 cvt-gpu train --batch B` equals one process with
//! `--batch B --accum-steps 2` on the learned tensors; processes that disagree on
//! the run stop at once; a killed rank ends the job within seconds, and its last
//! checkpoint resumes in one process.

mod scratch;
use scratch::Scratch;
mod cli_common;

use cli_common::{image_folder, run, tensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn bin() -> String {
    env!("CARGO_BIN_EXE_cvt-gpu").to_string()
}

fn mpirun(n: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-n", &n.to_string(), "--oversubscribe"]).env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c
}

fn tmp(tag: &str) -> Scratch {
    Scratch::new(&format!("mpi-{tag}"))
}

/// A tiny CvT for 16x16 images (BatchNorm in every block: statistics per micro-batch).
fn tiny_cvt(dir: &Path) -> PathBuf {
    let p = dir.join("tiny.json");
    std::fs::write(&p, r#"{"name":"tiny","num_classes":2,"dims":[8,16,24],"heads":[1,2,2],"depths":[1,1,1],"image_size":16}"#).unwrap();
    p
}

/// `train` on the tiny CvT and the image folder in `d`, with `seed` and `epochs`.
fn train_args(d: &Path, cfg: &Path, out: &Path, seed: u64, epochs: usize) -> Vec<String> {
    let mut v: Vec<String> = vec!["train".into(), "--image-folder".into(), d.join("data").display().to_string(), "--model".into(), cfg.display().to_string()];
    v.extend(["--seed".into(), seed.to_string(), "--epochs".into(), epochs.to_string()]);
    v.extend(["--res", "16", "--batch", "4", "--lr", "3e-3", "--warmup-steps", "2", "--drop-path", "0.2", "--json", "--out"].map(String::from));
    v.push(out.display().to_string());
    v
}

fn floats(p: &Path) -> HashMap<String, Vec<f32>> {
    tensors(p).into_iter().map(|(n, b)| (n, bytemuck::pod_collect_to_vec::<u8, f32>(&b))).collect()
}

#[test]
fn two_ranks_equal_one_process_accumulating_two_micro_batches() {
    let d = tmp("equal");
    image_folder(&d.join("data"), &["a", "b"], 12);
    let cfg = tiny_cvt(&d);
    // Small buckets (the tiny model's gradients are 2 KiB to 30 KiB a tensor), so
    // that several all-reduces are in flight while the backward runs.
    let (ok, out, err) = run(mpirun(2).arg(bin()).args(train_args(&d, &cfg, &d.join("ranks"), 5, 2)).args(["--bucket-mb", "0.02"]));
    assert!(ok, "mpirun -n 2: {err}");
    let last: serde_json::Value = serde_json::from_str(out.lines().last().expect("an epoch record")).unwrap();
    let x = &last["allreduce"];
    eprintln!("{x}");
    assert_eq!((x["processes"].as_u64(), x["overlap"].as_bool()), (Some(2), Some(true)), "{last}");
    // Something overlapped: a bucket's all-reduce was under way before the
    // backward ended (the first bucket's segment ends long before it).
    assert!(x["buckets"].as_u64().unwrap() >= 4 && x["hidden_ms_per_step"].as_f64().unwrap() > 0.0, "{x}");
    // The same job with one all-reduce after the backward: the same bits.
    let (ok, _, err) = run(mpirun(2).arg(bin()).args(train_args(&d, &cfg, &d.join("after"), 5, 2)).arg("--no-overlap"));
    assert!(ok, "mpirun -n 2 --no-overlap: {err}");
    assert_eq!(floats(&d.join("ranks/model.safetensors")), floats(&d.join("after/model.safetensors")), "overlapped and not");
    let (ok, _, err) = run(Command::new(bin()).args(train_args(&d, &cfg, &d.join("accum"), 5, 2)).args(["--accum-steps", "2"]));
    assert!(ok, "one process: {err}");
    let (a, b) = (floats(&d.join("ranks/model.safetensors")), floats(&d.join("accum/model.safetensors")));
    assert_eq!(a.len(), b.len());
    for (name, x) in &a {
        // Not compared: BatchNorm's running statistics (rank 0's, as DDP keeps;
        // one process updates them with both micro-batches), and the key
        // projection's and its BatchNorm's biases, whose gradients are zero
        // analytically (softmax ignores a per-query constant), so that AdamW
        // moves them by rounding noise alone. The 1e-5 absolute term covers the
        // stage-1 LayerNorm bias for the same reason (its values stay under 1e-5:
        // the BatchNorm after its convolution removes nearly all of its effect);
        // it is 1/300 of one step's AdamW move at this learning rate, so a real
        // divergence of any parameter still fails.
        if name.contains("running_") || name.ends_with("proj_k.bias") || name.ends_with("conv_proj_k.bn.bias") {
            continue;
        }
        let scale = x.iter().map(|v| v.abs()).fold(0f32, f32::max).max(1e-12);
        let diff = x.iter().zip(&b[name]).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-4 * scale + 1e-5, "{name}: max |ranks - accumulated| = {diff:e}, max |w| = {scale:e}");
    }
    let evals = |p: &Path| std::fs::read_to_string(p.join("metrics.jsonl")).unwrap().lines().filter(|l| l.contains("\"kind\":\"eval\"")).count();
    assert_eq!((evals(&d.join("ranks")), evals(&d.join("accum"))), (2, 2), "both evaluate each epoch");
}

#[test]
fn processes_that_disagree_stop_at_once() {
    let d = tmp("disagree");
    image_folder(&d.join("data"), &["a", "b"], 12);
    let cfg = tiny_cvt(&d);
    // MPMD: rank 1 with another seed.
    let mut c = mpirun(1);
    c.arg(bin()).args(train_args(&d, &cfg, &d.join("out"), 5, 2)).args([":", "-n", "1", &bin()]).args(train_args(&d, &cfg, &d.join("out"), 6, 2));
    let (ok, _, err) = run(&mut c);
    assert!(!ok, "{err}");
    // One line from each rank, and no abort.
    for r in 0..2 {
        assert!(err.lines().any(|l| l.starts_with(&format!("error: rank {r} of 2: the processes disagree on the run"))), "rank {r}: {err}");
    }
    assert!(!err.contains("MPI_ABORT"), "{err}");
}

#[test]
fn a_killed_rank_ends_the_job_and_its_checkpoint_resumes() {
    let d = tmp("kill");
    image_folder(&d.join("data"), &["a", "b"], 200);
    let cfg = tiny_cvt(&d);
    let out = d.join("out");
    let mut job = mpirun(2).arg(bin()).args(train_args(&d, &cfg, &out, 5, 1000)).args(["--save-every", "3"]).stderr(std::process::Stdio::null()).stdout(std::process::Stdio::null()).spawn().unwrap();
    let t = Instant::now();
    while !out.join("checkpoint.safetensors").exists() {
        assert!(t.elapsed() < Duration::from_secs(120), "no checkpoint within 2 minutes");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The ranks: mpirun's children running the binary. Kill the last one.
    let kids = String::from_utf8(Command::new("pgrep").args(["-P", &job.id().to_string()]).output().unwrap().stdout).unwrap();
    let ranks: Vec<String> = kids.lines().map(|l| l.trim().to_string()).collect();
    let victim = ranks.last().expect("mpirun's ranks").clone();
    assert!(Command::new("kill").args(["-9", &victim]).status().unwrap().success());
    // mpirun and every rank (any process whose command line names this run's
    // directory) are gone within 30 s.
    let t = Instant::now();
    let needle = out.display().to_string();
    let running = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            !stat.contains(") Z ") && String::from_utf8_lossy(&cmd).replace('\0', " ").contains(&needle)
        })
    };
    loop {
        if job.try_wait().unwrap().is_some() && !running() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "processes outlived the killed rank ({ranks:?}) by 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("every process of the job ended {:.1} s after the kill", t.elapsed().as_secs_f64());
    assert!(!job.wait().unwrap().success(), "the job must fail when a rank dies");
    // A rank's exit can still be closing its files (the run directory's lock)
    // after its command line is gone: the resume waits for the lock, as a user would.
    let resume = || run(Command::new(bin()).args(["train", "--image-folder"]).arg(d.join("data")).arg("--resume").arg(&out).args(["--max-steps", "2"]));
    let (mut ok, _, mut err) = resume();
    while !ok && err.contains("another training run") && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
        (ok, _, err) = resume();
    }
    assert!(ok && err.contains("stopped at step"), "resume in one process: {err}");
}
