//! Data parallelism: the processes of one training run and what they exchange.
//! `World::init` is one process (the default build, or a build with the `mpi`
//! feature started without `mpirun`), or an MPI job (`mpirun -n K`, `srun`) with
//! the `mpi` feature. Every collective here is a no-op in one process, so the
//! trainer runs the same code either way. docs/distributed.md says how to launch.

use anyhow::Result;
use std::time::Instant;

pub mod exchange;

/// The processes of a run.
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// Rank among the processes on this machine (to pick an adapter).
    pub local_rank: usize,
    #[cfg(feature = "mpi")]
    comm: Option<(mpi::environment::Universe, mpi::topology::SimpleCommunicator)>,
}

/// An error every process reached together (after a collective decision: the
/// run's description differs, the loss diverged): each prints it and exits,
/// without aborting the job, so every rank's line is shown.
#[derive(Debug)]
pub struct OnEveryRank(pub String);

impl std::fmt::Display for OnEveryRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OnEveryRank {}

/// Gradient buckets of about this many bytes are all-reduced at a time: large
/// enough to amortise a collective's latency, small enough that the host copies
/// of one bucket stay small (4-25 MiB were the fastest all-reduces measured for
/// this project's 2-rank Open MPI runs).
pub const BUCKET_BYTES: usize = 8 << 20;

impl World {
    /// One process.
    pub fn single() -> World {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            #[cfg(feature = "mpi")]
            comm: None,
        }
    }

    /// The run's processes: MPI's world where the `mpi` feature is built in,
    /// else one process.
    pub fn init() -> Result<World> {
        #[cfg(feature = "mpi")]
        {
            use mpi::topology::Communicator;
            // Only this thread calls MPI, but others exist (the thread that
            // submits the backward, the driver's).
            let (universe, provided) = mpi::initialize_with_threading(mpi::Threading::Funneled).ok_or_else(|| anyhow::anyhow!("MPI was initialised twice"))?;
            let world = universe.world();
            let (rank, size) = (world.rank() as usize, world.size() as usize);
            let local = world.split_shared(rank as i32);
            let local_rank = local.rank() as usize;
            if size > 1 && rank == 0 && provided < mpi::Threading::Funneled {
                eprintln!("warning: this MPI library gives no thread support ({provided:?}); cvt-gpu calls MPI from one thread but runs others beside it");
            }
            return Ok(World { rank, size, local_rank, comm: Some((universe, world)) });
        }
        #[allow(unreachable_code)]
        Ok(World::single())
    }

    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Element-wise sum over the processes, in place (losses and counts, exactly).
    pub fn sum_f64(&self, v: &mut [f64]) {
        #[cfg(feature = "mpi")]
        if let Some((_, c)) = &self.comm {
            use mpi::collective::{CommunicatorCollectives, SystemOperation};
            let send = v.to_vec();
            c.all_reduce_into(&send[..], v, SystemOperation::sum());
        }
        let _ = v;
    }

    /// Sums each `send[i]` over the processes into `recv[i]`, bucket after
    /// bucket: bucket i's sum starts once `fill(i, &mut send[i], wait)` has
    /// filled it and returned true. While earlier sums are in flight, `fill` is
    /// asked with `wait` false (return false: not ready yet) between checks that
    /// move the sums on, so they run while the caller's later buckets are still
    /// being produced (MPI's non-blocking all-reduce; Open MPI progresses it
    /// only inside MPI calls, hence the checks). Returns when each bucket was
    /// filled and when its sum was complete.
    pub fn sum_f32_as_filled(&self, send: &mut [Vec<f32>], recv: &mut [Vec<f32>], mut fill: impl FnMut(usize, &mut [f32], bool) -> Result<bool>) -> Result<Vec<(Instant, Instant)>> {
        assert_eq!(send.len(), recv.len(), "internal: one receive buffer per bucket");
        #[cfg(feature = "mpi")]
        if let Some((_, c)) = &self.comm {
            return sum_in_flight(c, send, recv, fill);
        }
        let mut times = vec![];
        for (i, (s, r)) in send.iter_mut().zip(recv.iter_mut()).enumerate() {
            while !fill(i, s, true)? {}
            let filled = Instant::now();
            r.copy_from_slice(s);
            times.push((filled, Instant::now()));
        }
        Ok(times)
    }

    /// Rank 0's bytes on every process (its length first, then its contents).
    pub fn broadcast(&self, bytes: &mut Vec<u8>) {
        #[cfg(feature = "mpi")]
        if let Some((_, c)) = &self.comm {
            use mpi::collective::Root;
            use mpi::topology::Communicator;
            let root = c.process_at_rank(0);
            let mut len = bytes.len() as u64;
            root.broadcast_into(&mut len);
            bytes.resize(len as usize, 0);
            root.broadcast_into(&mut bytes[..]);
        }
        let _ = bytes;
    }

    /// Whether any process says `yes` (a stop request, a failure).
    pub fn any(&self, yes: bool) -> bool {
        let mut v = [yes as u8 as f64];
        self.sum_f64(&mut v);
        v[0] > 0.0
    }

    /// Ends the whole job with a message naming this rank (MPI_Abort): the other
    /// processes stop too, within the MPI library's bounded time, never hang.
    pub fn abort(&self, msg: &str) -> ! {
        // One write: the ranks share stderr, and a line written in pieces interleaves.
        let line = format!("error: rank {} of {}: {msg}\n", self.rank, self.size);
        std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes()).ok();
        #[cfg(feature = "mpi")]
        if let Some((_, c)) = &self.comm {
            use mpi::topology::Communicator;
            c.abort(1);
        }
        std::process::exit(1)
    }
}

#[cfg(feature = "mpi")]
const PAUSE_MIN: std::time::Duration = std::time::Duration::from_micros(20);
#[cfg(feature = "mpi")]
const PAUSE_MAX: std::time::Duration = std::time::Duration::from_millis(1);

/// `World::sum_f32_as_filled` over MPI: one MPI_Iallreduce per bucket, tested
/// while later buckets are awaited.
#[cfg(feature = "mpi")]
fn sum_in_flight(
    c: &mpi::topology::SimpleCommunicator,
    send: &mut [Vec<f32>],
    recv: &mut [Vec<f32>],
    mut fill: impl FnMut(usize, &mut [f32], bool) -> Result<bool>,
) -> Result<Vec<(Instant, Instant)>> {
    use mpi::collective::{CommunicatorCollectives, SystemOperation};
    let n = send.len();
    let mut filled = vec![];
    let mut done = vec![None; n];
    let (mut send, mut recv) = (send, recv);
    // Every request started in the scope is completed before it ends (its
    // buffers are borrowed until then), on the error path too. A panic here
    // with requests in flight aborts the process (rsmpi's scope cannot let
    // their buffers go), which ends the job as MPI_Abort would.
    let outcome = mpi::request::scope(|scope| {
        let mut pending = vec![];
        let mut failed = None;
        // Between looks, a pause that doubles while nothing changes (the sums
        // move on only in MPI calls; a CPU driver's GPU work shares the cores).
        let mut pause = PAUSE_MIN;
        while filled.len() < n && failed.is_none() {
            let i = filled.len();
            let took = match fill(i, &mut send[0], pending.is_empty()) {
                Ok(true) => {
                    filled.push(Instant::now());
                    let (s, s_rest) = std::mem::take(&mut send).split_first_mut().expect("a bucket per fill");
                    let (r, r_rest) = std::mem::take(&mut recv).split_first_mut().expect("a bucket per fill");
                    (send, recv) = (s_rest, r_rest);
                    pending.push((i, c.immediate_all_reduce_into(scope, &s[..], &mut r[..], SystemOperation::sum())));
                    true
                }
                Ok(false) => false,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            // Move the sums in flight on (each completion is timed here).
            let before = pending.len();
            pending = pending
                .into_iter()
                .filter_map(|(j, req)| match req.test() {
                    Ok(_) => {
                        done[j] = Some(Instant::now());
                        None
                    }
                    Err(req) => Some((j, req)),
                })
                .collect();
            if took || pending.len() < before {
                pause = PAUSE_MIN;
            } else {
                std::thread::sleep(pause);
                pause = (pause * 2).min(PAUSE_MAX);
            }
        }
        for (j, req) in pending {
            req.wait_without_status();
            done[j] = Some(Instant::now());
        }
        failed
    });
    if let Some(e) = outcome {
        return Err(e);
    }
    Ok(filled.into_iter().zip(done).map(|(f, d)| (f, d.unwrap_or(f))).collect())
}

/// The first bucket (the head's and the last block's gradients, ready first)
/// is kept to at most this, so that its all-reduce starts early even in a small
/// model whose gradients fit one bucket (PyTorch DDP's first bucket is 1 MiB
/// for the same reason).
pub const FIRST_BUCKET_BYTES: usize = 1 << 20;

/// Consecutive runs of parameters (indices into the optimizer's list, from the
/// last: the backward finishes the head's and the last blocks' gradients first)
/// of at most `bucket_bytes` each, the first of at most `FIRST_BUCKET_BYTES`
/// (a larger parameter alone).
pub fn buckets(lens: &[usize], bucket_bytes: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = vec![];
    let mut bytes = 0;
    for i in (0..lens.len()).rev() {
        let b = lens[i] * 4;
        let cap = if out.len() == 1 { bucket_bytes.min(FIRST_BUCKET_BYTES) } else { bucket_bytes };
        match out.last_mut() {
            Some(cur) if bytes + b <= cap => {
                cur.push(i);
                bytes += b;
            }
            _ => {
                out.push(vec![i]);
                bytes = b;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets: every parameter once, from the last; each within the size
    /// unless a parameter alone is larger; one process's collectives are no-ops.
    #[test]
    fn buckets_cover_every_parameter_from_the_last() {
        let lens = [10, 3_000_000, 5, 7, 1_500_000, 1_500_000, 200_000, 2];
        let b = buckets(&lens, BUCKET_BYTES);
        let flat: Vec<usize> = b.iter().flatten().copied().collect();
        assert_eq!(flat, (0..lens.len()).rev().collect::<Vec<_>>());
        for (k, bucket) in b.iter().enumerate() {
            let bytes: usize = bucket.iter().map(|&i| lens[i] * 4).sum();
            let cap = if k == 0 { FIRST_BUCKET_BYTES } else { BUCKET_BYTES };
            assert!(bytes <= cap || bucket.len() == 1, "{bucket:?}: {bytes} bytes");
        }
        assert_eq!(b, vec![vec![7, 6], vec![5], vec![4, 3, 2], vec![1], vec![0]]);
        // A small model: the first bucket is still apart.
        assert_eq!(buckets(&[1000, 300_000, 5], BUCKET_BYTES), vec![vec![2], vec![1, 0]]);
        let w = World::single();
        let mut v = [1.5f64, -2.0];
        w.sum_f64(&mut v);
        assert_eq!(v, [1.5, -2.0]);
        assert!(w.any(true) && !w.any(false));
    }
}
