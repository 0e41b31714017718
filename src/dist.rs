//! Data parallelism: the processes of one training run and what they exchange.
//! `World::init` is one process (the default build, or a build with the `mpi`
//! feature started without `mpirun`), or an MPI job (`mpirun -n K`, `srun`) with
//! the `mpi` feature. Every collective here is a no-op in one process, so the
//! trainer runs the same code either way. docs/distributed.md says how to launch.

use anyhow::Result;

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
            let universe = mpi::initialize().ok_or_else(|| anyhow::anyhow!("MPI was initialised twice"))?;
            let world = universe.world();
            let (rank, size) = (world.rank() as usize, world.size() as usize);
            let local = world.split_shared(rank as i32);
            let local_rank = local.rank() as usize;
            return Ok(World { rank, size, local_rank, comm: Some((universe, world)) });
        }
        #[allow(unreachable_code)]
        Ok(World::single())
    }

    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Element-wise sum over the processes, in place.
    pub fn sum_f32(&self, v: &mut [f32]) {
        #[cfg(feature = "mpi")]
        if let Some((_, c)) = &self.comm {
            use mpi::collective::{CommunicatorCollectives, SystemOperation};
            let send = v.to_vec();
            c.all_reduce_into(&send[..], v, SystemOperation::sum());
        }
        let _ = v;
    }

    /// As `sum_f32` for f64 (losses and counts, exactly).
    pub fn sum_f64(&self, v: &mut [f64]) {
        #[cfg(feature = "mpi")]
        if let Some((_, c)) = &self.comm {
            use mpi::collective::{CommunicatorCollectives, SystemOperation};
            let send = v.to_vec();
            c.all_reduce_into(&send[..], v, SystemOperation::sum());
        }
        let _ = v;
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

/// Consecutive runs of parameters (indices into the optimizer's list, from the
/// last: the backward finishes the head's and the last blocks' gradients first)
/// of at most `bucket_bytes` each (a larger parameter alone).
pub fn buckets(lens: &[usize], bucket_bytes: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = vec![];
    let mut bytes = 0;
    for i in (0..lens.len()).rev() {
        let b = lens[i] * 4;
        match out.last_mut() {
            Some(cur) if bytes + b <= bucket_bytes => {
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
        let lens = [10, 3_000_000, 5, 7, 1_500_000, 1_500_000, 2];
        let b = buckets(&lens, BUCKET_BYTES);
        let flat: Vec<usize> = b.iter().flatten().copied().collect();
        assert_eq!(flat, (0..lens.len()).rev().collect::<Vec<_>>());
        for bucket in &b {
            let bytes: usize = bucket.iter().map(|&i| lens[i] * 4).sum();
            assert!(bytes <= BUCKET_BYTES || bucket.len() == 1, "{bucket:?}: {bytes} bytes");
        }
        assert_eq!(b, vec![vec![6, 5], vec![4, 3, 2], vec![1], vec![0]]);
        let w = World::single();
        let mut v = [1.5f32, -2.0];
        w.sum_f32(&mut v);
        assert_eq!(v, [1.5, -2.0]);
        assert!(w.any(true) && !w.any(false));
    }
}
