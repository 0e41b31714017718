//! The gradient exchange of a data-parallel step, overlapped with the backward.
//!
//! The step's last micro-batch runs its recorded forward + backward in
//! segments, one per gradient bucket (`dist::buckets`, last parameters first,
//! which is the order the backward finishes them). A segment ends at the
//! plan's last use of its bucket's gradients (`Plan::last_use`), and its
//! submission goes on to add those gradients into their accumulators and copy
//! the bucket into one host-visible staging buffer. Every segment is submitted
//! at once; the host then takes the buckets as their copies land and starts
//! each one's all-reduce (`World::sum_f32_as_filled`) while the GPU runs the
//! rest of the backward. The sums are written back into the accumulators, which
//! AdamW reads.
//!
//! Segments are whole steps of the plan, recorded in order, so the GPU does the
//! same work as `Plan::run` with a submission boundary between buckets: the
//! gradients are the same bits, overlapped or not.

use anyhow::{bail, Result};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::World;
use crate::gpu::Gpu;
use crate::graph::Plan;
use crate::models::step::{accumulate_plan, Accumulator, StepPlan};

/// One bucket: its parameters' accumulators, where its segment of the step
/// plan ends, its accumulation plans, and its staging buffer.
struct Bucket {
    params: Vec<Accumulator>,
    /// The step plan's steps before this index have run when the bucket's
    /// gradients are read (the previous bucket's `end` to this one).
    end: usize,
    /// Copies (a step's first micro-batch) or adds the gradients into the accumulators.
    first: Plan,
    add: Plan,
    staging: wgpu::Buffer,
    /// The staging buffer's mapping: PENDING, MAPPED, FAILED or IDLE.
    mapped: Arc<AtomicU8>,
}

const PENDING: u8 = 0;
const MAPPED: u8 = 1;
const FAILED: u8 = 2;
/// Read and unmapped (or never mapped).
const IDLE: u8 = 3;

/// Per-step figures of the exchange, summed over the steps of this run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub steps: u64,
    /// Time some bucket's all-reduce was under way: bucket i's from when it was
    /// on the host, or the previous bucket's sum was done if later (the sums
    /// complete in order), to its own sum.
    pub comm_s: f64,
    /// Of that, the time before the backward's end (when the first bucket of
    /// the last segment was ready): what the backward hid.
    pub hidden_s: f64,
    /// From the backward's end to the last sum: what the step waits for the
    /// exchange (the all-reduce not hidden, and the host copies after the end).
    pub wait_s: f64,
}

impl Stats {
    /// Adds a step: per bucket, (on the host, summed) times, when its staging
    /// buffer was seen ready, and its segment's end.
    fn add(&mut self, times: &[(Instant, Instant)], ready: &[Instant], ends: &[usize]) {
        let Some(&last_end) = ends.last() else { return };
        let Some(backward_end) = ready.iter().zip(ends).filter(|(_, &e)| e == last_end).map(|(t, _)| *t).min() else { return };
        let mut prev_done: Option<Instant> = None;
        for &(filled, done) in times {
            let from = prev_done.map_or(filled, |p| p.max(filled));
            self.comm_s += done.saturating_duration_since(from).as_secs_f64();
            self.hidden_s += backward_end.min(done).saturating_duration_since(from).as_secs_f64();
            prev_done = Some(prev_done.map_or(done, |p| p.max(done)));
        }
        if let Some(done) = prev_done {
            self.wait_s += done.saturating_duration_since(backward_end).as_secs_f64();
        }
        self.steps += 1;
    }
}

/// A step plan's buckets, their segments and staging, for one training run.
pub struct Exchange {
    gpu: Arc<Gpu>,
    buckets: Vec<Bucket>,
    send: Vec<Vec<f32>>,
    recv: Vec<Vec<f32>>,
    pub stats: Stats,
    pub bytes: usize,
}

impl Exchange {
    /// The buckets of `accs` (the optimizer's accumulators) over `step`'s plan,
    /// of about `bucket_bytes` (`dist::BUCKET_BYTES`). `overlap` false: every
    /// segment ends with the backward (one submission, then the all-reduces),
    /// for comparison.
    pub fn new(gpu: &Arc<Gpu>, step: &StepPlan, accs: &[Accumulator], overlap: bool, bucket_bytes: usize) -> Result<Exchange> {
        let lens: Vec<usize> = accs.iter().map(|a| a.len).collect();
        let total = step.plan.steps.len();
        let mut buckets = vec![];
        let mut end = 0;
        // A bucket's staging buffer is one buffer.
        let bucket_bytes = bucket_bytes.min(gpu.limits.max_buffer_size as usize);
        for idx in super::buckets(&lens, bucket_bytes) {
            let params: Vec<Accumulator> = idx.iter().map(|&i| accs[i].clone()).collect();
            // Segments stay in the plan's order: a bucket whose gradients end
            // earlier than the previous bucket's waits for that one.
            let last = params.iter().filter_map(|a| step.plan.last_use(&a.grad)).max().map_or(0, |i| i + 1);
            end = if overlap { end.max(last) } else { total };
            let len: usize = params.iter().map(|a| a.len).sum();
            let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("gradient bucket staging"),
                size: (len * 4) as u64,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let (first, add) = (accumulate_plan(gpu, &params, true)?, accumulate_plan(gpu, &params, false)?);
            buckets.push(Bucket { params, end, first, add, staging, mapped: Arc::new(AtomicU8::new(IDLE)) });
        }
        let sizes = || buckets.iter().map(|b| vec![0f32; b.params.iter().map(|a| a.len).sum()]);
        let (send, recv) = (sizes().collect(), sizes().collect());
        Ok(Exchange { gpu: gpu.clone(), send, recv, stats: Stats::default(), bytes: lens.iter().sum::<usize>() * 4, buckets })
    }

    /// Buckets per step.
    pub fn buckets(&self) -> usize {
        self.buckets.len()
    }

    /// Where each bucket's segment of the step plan ends (tests, reports).
    pub fn segment_ends(&self) -> Vec<usize> {
        self.buckets.iter().map(|b| b.end).collect()
    }

    /// Runs a step's last micro-batch on `step` with its gradient exchange:
    /// afterwards every accumulator holds the sum over the processes of their
    /// sums over their micro-batches (`first`: this is the step's only one).
    /// Returns the micro-batch's mean loss and logits, as `StepPlan::run`.
    pub fn run(&mut self, world: &World, step: &StepPlan, images: &[f32], targets: &[f32], first: bool) -> Result<(f32, Vec<f32>)> {
        let Exchange { gpu, buckets, send, recv, stats, .. } = self;
        step.write_inputs(images, targets)?;
        for b in buckets.iter() {
            b.mapped.store(PENDING, Ordering::SeqCst);
        }
        // The segments are submitted from a thread of their own: a driver that
        // runs the work inside the submit call (CPU drivers such as lavapipe)
        // would otherwise hold this thread, and with it the all-reduces, for the
        // whole backward. While it submits, this thread does not poll the
        // device (a poll would wait on the submission's locks): the submitting
        // thread polls after each submit; once it is done, this thread polls.
        let submitted = AtomicBool::new(false);
        let mut ready = vec![];
        let (tx, rx) = std::sync::mpsc::channel();
        let times = std::thread::scope(|sc| {
            let (gpu, buckets, submitted) = (&*gpu, &*buckets, &submitted);
            let submitter = sc.spawn(move || {
                let mut start = 0;
                for b in buckets.iter() {
                    let mut enc = gpu.device.create_command_encoder(&Default::default());
                    step.plan.encode(&mut enc, start..b.end);
                    start = b.end;
                    let acc = if first { &b.first } else { &b.add };
                    acc.encode(&mut enc, 0..acc.steps.len());
                    let mut off = 0;
                    for a in &b.params {
                        enc.copy_buffer_to_buffer(&a.sum, 0, &b.staging, off, (a.len * 4) as u64);
                        off += (a.len * 4) as u64;
                    }
                    let index = gpu.queue.submit([enc.finish()]);
                    let flag = b.mapped.clone();
                    b.staging.map_async(wgpu::MapMode::Read, .., move |r| flag.store(if r.is_ok() { MAPPED } else { FAILED }, Ordering::SeqCst));
                    // Resolves the map at once where the submit ran the work,
                    // before the main thread is woken to look at it.
                    gpu.device.poll(wgpu::PollType::Poll).ok();
                    tx.send(index).ok();
                }
                let mut enc = gpu.device.create_command_encoder(&Default::default());
                step.plan.encode(&mut enc, start..step.plan.steps.len());
                gpu.queue.submit([enc.finish()]);
                submitted.store(true, Ordering::SeqCst);
            });
            let mut indices = vec![];
            let ready = &mut ready;
            let times = world.sum_f32_as_filled(send, recv, |i, host, wait| {
                let b = &buckets[i];
                loop {
                    match b.mapped.load(Ordering::SeqCst) {
                        MAPPED => break,
                        FAILED => bail!("reading gradient bucket {i} back from the GPU failed"),
                        _ => {}
                    }
                    // `submitted` before the channel: the submitter sends every
                    // index before it says it is done.
                    let done = submitted.load(Ordering::SeqCst);
                    indices.extend(rx.try_iter());
                    if done && indices.len() <= i {
                        bail!("internal: gradient bucket {i} was never submitted");
                    }
                    match (done, wait) {
                        (true, true) => {
                            gpu.device.poll(wgpu::PollType::Wait { submission_index: Some(indices[i].clone()), timeout: None }).map_err(|e| anyhow::anyhow!("GPU poll failed: {e}"))?;
                            if b.mapped.load(Ordering::SeqCst) == PENDING {
                                bail!("internal: gradient bucket {i} not mapped after its submission completed");
                            }
                        }
                        (true, false) => {
                            gpu.device.poll(wgpu::PollType::Poll).map_err(|e| anyhow::anyhow!("GPU poll failed: {e}"))?;
                            if b.mapped.load(Ordering::SeqCst) == PENDING {
                                return Ok(false);
                            }
                        }
                        // Nothing else to do: sleep until the next submission.
                        (false, true) => match rx.recv() {
                            Ok(index) => indices.push(index),
                            // The submitter ended without saying it was done.
                            Err(_) if !submitted.load(Ordering::SeqCst) => bail!("internal: the thread submitting the backward stopped early"),
                            Err(_) => {}
                        },
                        (false, false) => return Ok(false),
                    }
                }
                ready.push(Instant::now());
                host.copy_from_slice(bytemuck::cast_slice(&b.staging.get_mapped_range(..)?));
                b.staging.unmap();
                b.mapped.store(IDLE, Ordering::SeqCst);
                Ok(true)
            });
            // A failed bucket leaves the others to finish before the error is
            // returned: the scope waits for the submitting thread either way.
            if submitter.join().is_err() {
                bail!("internal: the thread submitting the backward panicked");
            }
            times
        });
        let times = match times {
            Ok(t) => t,
            Err(e) => {
                // Leave no staging buffer mapped (the next step copies into them).
                gpu.device.poll(wgpu::PollType::wait_indefinitely()).ok();
                for b in buckets.iter() {
                    if b.mapped.swap(IDLE, Ordering::SeqCst) == MAPPED {
                        b.staging.unmap();
                    }
                }
                return Err(e);
            }
        };
        gpu.check_error()?;
        for (b, sum) in buckets.iter().zip(recv.iter()) {
            let mut off = 0;
            for a in &b.params {
                gpu.queue.write_buffer(&a.sum, 0, bytemuck::cast_slice(&sum[off..off + a.len]));
                off += a.len;
            }
        }
        stats.add(&times, &ready, &buckets.iter().map(|b| b.end).collect::<Vec<_>>());
        step.results()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The step's all-reduce time counts each moment once (the sums complete in
    /// order), and only what follows the backward's end counts as not hidden.
    #[test]
    fn stats_count_all_reduce_time_once_and_split_it_at_the_backward_end() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Overlapped: buckets on the host at 10, 20, 100 (the last segment ends
        // at 100); sums done at 15, 40 (waits for the previous one), 130.
        let mut s = Stats::default();
        s.add(&[(at(10), at(15)), (at(20), at(40)), (at(100), at(130))], &[at(9), at(19), at(99)], &[5, 8, 12]);
        assert_eq!(s.steps, 1);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(s.comm_s, 0.055) && close(s.hidden_s, 0.025) && close(s.wait_s, 0.031), "{s:?}");
        // Not overlapped: every bucket ready when the backward ends (at 50), taken
        // one after the other: nothing hidden, and the copies add to the wait.
        let mut s = Stats::default();
        s.add(&[(at(52), at(60)), (at(61), at(70)), (at(72), at(75))], &[at(50), at(60), at(71)], &[12, 12, 12]);
        assert!(close(s.comm_s, 0.020) && close(s.hidden_s, 0.0) && close(s.wait_s, 0.025), "{s:?}");
    }
}
