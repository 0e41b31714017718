//! The liveness memory plan: which activation tensors share a buffer.

/// A tensor for `plan_slots`: its size, and the steps [first, last] it is used
/// in, or None for a tensor that keeps its own buffer (pinned, or never used).
pub(super) struct SlotTensor {
    pub(super) bytes: u64,
    pub(super) span: Option<(usize, usize)>,
}

pub(super) struct SlotPlan {
    pub(super) slot_size: Vec<u64>,
    pub(super) tensor_slot: Vec<usize>,
    /// Most bytes alive at once: the bound any slot plan pays at least.
    pub(super) max_live: u64,
}

/// Activation slots by liveness, offline and greedy by size: tensors from the
/// largest down, each into the smallest slot whose tensors' lifetimes it does not
/// overlap, else into a new slot of its size (so a slot is as large as its first
/// tensor). Lifetimes that meet at one step overlap: a dispatch may read one
/// tensor while writing another. Slots stay separate buffers, rather than offsets
/// in one arena, because a dispatch reads some tensors through read-only bindings
/// while writing others, and WebGPU forbids one buffer in both roles.
pub(super) fn plan_slots(tensors: &[SlotTensor]) -> SlotPlan {
    let mut slot_size: Vec<u64> = vec![];
    let mut tensor_slot = vec![usize::MAX; tensors.len()];
    let mut shared = vec![];
    for (t, x) in tensors.iter().enumerate() {
        match x.span {
            Some(_) => shared.push(t),
            None => {
                slot_size.push(x.bytes);
                tensor_slot[t] = slot_size.len() - 1;
            }
        }
    }
    let span = |t: usize| tensors[t].span.unwrap();
    let own_bytes: u64 = slot_size.iter().sum();
    let steps = shared.iter().map(|&t| span(t).1 + 2).max().unwrap_or(0);
    let mut delta = vec![0i64; steps];
    for &t in &shared {
        delta[span(t).0] += tensors[t].bytes as i64;
        delta[span(t).1 + 1] -= tensors[t].bytes as i64;
    }
    let (mut live, mut peak) = (0i64, 0i64);
    for d in &delta {
        live += d;
        peak = peak.max(live);
    }
    shared.sort_by_key(|&t| (std::cmp::Reverse(tensors[t].bytes), span(t).0));
    // Per shared slot: its index and the lifetimes in it, sorted by start.
    let mut slot_spans: Vec<(usize, Vec<(usize, usize)>)> = vec![];
    for &t in &shared {
        let (sp, need) = (span(t), tensors[t].bytes);
        let free = |spans: &Vec<(usize, usize)>| {
            let k = spans.partition_point(|s| s.0 < sp.0);
            (k == 0 || spans[k - 1].1 < sp.0) && (k == spans.len() || spans[k].0 > sp.1)
        };
        let fit = slot_spans.iter().enumerate().filter(|(_, (s, spans))| slot_size[*s] >= need && free(spans)).min_by_key(|(_, (s, _))| slot_size[*s]).map(|(i, _)| i);
        let i = fit.unwrap_or_else(|| {
            slot_size.push(need);
            slot_spans.push((slot_size.len() - 1, vec![]));
            slot_spans.len() - 1
        });
        let spans = &mut slot_spans[i].1;
        let k = spans.partition_point(|s| s.0 < sp.0);
        spans.insert(k, sp);
        tensor_slot[t] = slot_spans[i].0;
    }
    SlotPlan { slot_size, tensor_slot, max_live: own_bytes + peak as u64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(bytes: u64, span: Option<(usize, usize)>) -> SlotTensor {
        SlotTensor { bytes, span }
    }

    /// No two tensors whose lifetimes overlap share a slot, and each fits its slot.
    fn check(ts: &[SlotTensor], p: &SlotPlan) {
        for (i, a) in ts.iter().enumerate() {
            assert!(p.slot_size[p.tensor_slot[i]] >= a.bytes);
            for (j, b) in ts.iter().enumerate().skip(i + 1) {
                if p.tensor_slot[i] == p.tensor_slot[j] {
                    let (Some(x), Some(y)) = (a.span, b.span) else { panic!("own-buffer tensor {i} or {j} shares a slot") };
                    assert!(x.1 < y.0 || y.1 < x.0, "tensors {i} {x:?} and {j} {y:?} overlap in slot {}", p.tensor_slot[i]);
                }
            }
        }
    }

    #[test]
    fn chain_reuses_two_slots() {
        // x0 -> x1 -> ... : each tensor is written at step i and read at i + 1.
        let ts: Vec<SlotTensor> = (0..10).map(|i| t(100 + i as u64, Some((i, i + 1)))).collect();
        let p = plan_slots(&ts);
        check(&ts, &p);
        assert_eq!(p.slot_size.len(), 2);
        assert_eq!(p.max_live, 109 + 108);
    }

    #[test]
    fn large_first_avoids_growing_slots() {
        // A small tensor early, a large one later: the online best fit had put the
        // small one in a slot and then grown it; here both share one slot of 1000.
        let ts = vec![t(10, Some((0, 1))), t(1000, Some((2, 3))), t(500, Some((0, 3))), t(64, None)];
        let p = plan_slots(&ts);
        check(&ts, &p);
        assert_eq!(p.slot_size.iter().sum::<u64>(), 1000 + 500 + 64);
        assert_eq!(p.max_live, 1500 + 64);
    }

    #[test]
    fn meeting_lifetimes_do_not_share() {
        // One step reads a and writes b: they must not alias.
        let ts = vec![t(16, Some((0, 1))), t(16, Some((1, 2)))];
        let p = plan_slots(&ts);
        check(&ts, &p);
        assert_ne!(p.tensor_slot[0], p.tensor_slot[1]);
    }
}
