//! Which offset of each partition may be committed.
//!
//! Messages of a partition are handled concurrently and finish in any order, but a committed
//! offset says "everything before this is done". So the offset to commit only moves over the
//! contiguous run of settled messages at the front of what is in flight: with offsets 4, 5, 6
//! in flight and 5, 6 settled, nothing moves until 4 settles, then the commit offset jumps to 7.
//! A message that is never settled (acceld stopped while handling it) holds its partition's
//! commit offset before it, so the message is read again.
//!
//! A partition taken away by a rebalance is forgotten at once; work of it that settles later
//! carries the old assignment's epoch and is ignored, so it cannot commit a stale offset over
//! the new owner's progress.

use std::collections::{BTreeMap, HashMap};

/// A topic and partition.
pub type Partition = (String, i32);

/// One message being handled; settle it with [`Offsets::settle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub partition: Partition,
    pub offset: i64,
    epoch: u64,
}

#[derive(Debug, Default)]
struct Tracked {
    epoch: u64,
    /// Offsets in flight; `true` once settled.
    in_flight: BTreeMap<i64, bool>,
    /// Next offset to commit: the end of the settled prefix so far.
    upto: Option<i64>,
    /// Whether `upto` moved since the last [`Offsets::take_commits`].
    dirty: bool,
}

/// Offsets of the partitions this consumer holds.
#[derive(Debug, Default)]
pub struct Offsets {
    partitions: HashMap<Partition, Tracked>,
    next_epoch: u64,
}

impl Offsets {
    pub fn new() -> Offsets {
        Offsets::default()
    }

    /// The partition is (newly) assigned: its tracking starts afresh.
    pub fn assign(&mut self, p: Partition) {
        self.next_epoch += 1;
        self.partitions.insert(p, Tracked { epoch: self.next_epoch, ..Default::default() });
    }

    /// The partition is taken away: returns its commit offset (the end of the settled prefix,
    /// if anything settled; committing it again is harmless) and forgets it.
    pub fn revoke(&mut self, p: &Partition) -> Option<i64> {
        self.partitions.remove(p).and_then(|t| t.upto)
    }

    /// The commit offset of every held partition where something settled, for a final commit.
    pub fn settled(&self) -> Vec<(Partition, i64)> {
        let mut out: Vec<(Partition, i64)> = self.partitions.iter().filter_map(|(p, t)| t.upto.map(|o| (p.clone(), o))).collect();
        out.sort();
        out
    }

    /// Whether the partition is held.
    pub fn holds(&self, p: &Partition) -> bool {
        self.partitions.contains_key(p)
    }

    /// A message read at `offset`. `None` when the partition is not held (a message fetched
    /// before a rebalance took the partition away): do not handle it.
    pub fn begin(&mut self, p: Partition, offset: i64) -> Option<Ticket> {
        let t = self.partitions.get_mut(&p)?;
        t.in_flight.insert(offset, false);
        Some(Ticket { partition: p, offset, epoch: t.epoch })
    }

    /// The message of `ticket` is done. Returns the partition's new commit offset when it
    /// moved; `None` when it did not, or the ticket is of a partition no longer held (or held
    /// again since, under a newer assignment).
    pub fn settle(&mut self, ticket: &Ticket) -> Option<i64> {
        let t = self.partitions.get_mut(&ticket.partition)?;
        if t.epoch != ticket.epoch {
            return None;
        }
        match t.in_flight.get_mut(&ticket.offset) {
            Some(done) => *done = true,
            None => return None,
        }
        let mut moved = None;
        while let Some(entry) = t.in_flight.first_entry() {
            if !*entry.get() {
                break;
            }
            let (offset, _) = entry.remove_entry();
            moved = Some(offset + 1);
        }
        if moved.is_some() {
            t.upto = moved;
            t.dirty = true;
        }
        moved
    }

    /// Messages in flight over all partitions (settled ones waiting behind an unsettled one
    /// included).
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|t| t.in_flight.values().filter(|done| !**done).count()).sum()
    }

    /// Offsets to commit: each partition whose commit offset moved since the last call.
    pub fn take_commits(&mut self) -> Vec<(Partition, i64)> {
        let mut out: Vec<(Partition, i64)> =
            self.partitions.iter_mut().filter_map(|(p, t)| if std::mem::take(&mut t.dirty) { t.upto.map(|o| (p.clone(), o)) } else { None }).collect();
        out.sort();
        out
    }

    /// Puts back commits that failed, unless the partition moved on or went away meanwhile.
    pub fn retry_commits(&mut self, commits: Vec<(Partition, i64)>) {
        for (p, o) in commits {
            if let Some(t) = self.partitions.get_mut(&p) {
                if t.upto == Some(o) {
                    t.dirty = true;
                }
            }
        }
    }

    /// Partitions held.
    pub fn held(&self) -> Vec<Partition> {
        let mut v: Vec<Partition> = self.partitions.keys().cloned().collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: i32) -> Partition {
        ("t".to_string(), n)
    }

    #[test]
    fn the_commit_offset_moves_over_the_settled_prefix_only() {
        let mut o = Offsets::new();
        o.assign(p(0));
        let t: Vec<Ticket> = (4..=6).map(|i| o.begin(p(0), i).unwrap()).collect();
        assert_eq!(o.in_flight(), 3);
        assert_eq!(o.settle(&t[1]), None);
        assert_eq!(o.settle(&t[2]), None);
        assert!(o.take_commits().is_empty());
        assert_eq!(o.settle(&t[0]), Some(7));
        assert_eq!(o.take_commits(), vec![(p(0), 7)]);
        assert!(o.take_commits().is_empty(), "a commit is handed out once");
        assert_eq!(o.in_flight(), 0);
        // Settling twice changes nothing.
        assert_eq!(o.settle(&t[0]), None);
    }

    #[test]
    fn gaps_in_offsets_do_not_hold_the_commit() {
        // Compacted topics and transaction markers leave offsets out.
        let mut o = Offsets::new();
        o.assign(p(0));
        let a = o.begin(p(0), 10).unwrap();
        let b = o.begin(p(0), 13).unwrap();
        assert_eq!(o.settle(&a), Some(11));
        assert_eq!(o.settle(&b), Some(14));
    }

    #[test]
    fn an_unsettled_message_holds_its_partition_only() {
        let mut o = Offsets::new();
        o.assign(p(0));
        o.assign(p(1));
        let stuck = o.begin(p(0), 0).unwrap();
        let later = o.begin(p(0), 1).unwrap();
        let other = o.begin(p(1), 5).unwrap();
        assert_eq!(o.settle(&later), None);
        assert_eq!(o.settle(&other), Some(6));
        assert_eq!(o.take_commits(), vec![(p(1), 6)]);
        assert_eq!(o.in_flight(), 1);
        // Never settled (acceld stops): the partition is revoked with nothing to commit.
        assert_eq!(o.revoke(&p(0)), None);
        let _ = stuck;
    }

    #[test]
    fn revoked_partitions_forget_their_work() {
        let mut o = Offsets::new();
        o.assign(p(0));
        let a = o.begin(p(0), 0).unwrap();
        let b = o.begin(p(0), 1).unwrap();
        assert_eq!(o.settle(&a), Some(1));
        assert_eq!(o.settled(), vec![(p(0), 1)]);
        // Revoked: the revocation hands over the offset to commit.
        assert_eq!(o.revoke(&p(0)), Some(1));
        assert!(!o.holds(&p(0)));
        assert_eq!(o.settle(&b), None, "work of a revoked partition commits nothing");
        assert!(o.begin(p(0), 2).is_none(), "messages of a partition not held are not handled");
        // Assigned again: the old ticket stays stale even though the offset is tracked anew.
        o.assign(p(0));
        let b2 = o.begin(p(0), 1).unwrap();
        assert_eq!(o.settle(&b), None);
        assert!(o.take_commits().is_empty());
        assert_eq!(o.settle(&b2), Some(2));
    }

    #[test]
    fn failed_commits_are_retried_unless_overtaken() {
        let mut o = Offsets::new();
        o.assign(p(0));
        let a = o.begin(p(0), 0).unwrap();
        o.settle(&a);
        let c = o.take_commits();
        o.retry_commits(c.clone());
        assert_eq!(o.take_commits(), c);
        let b = o.begin(p(0), 1).unwrap();
        o.settle(&b);
        o.retry_commits(c);
        assert_eq!(o.take_commits(), vec![(p(0), 2)]);
        o.retry_commits(vec![(p(9), 3)]);
        assert!(o.take_commits().is_empty(), "a partition not held gets no commit");
    }
}
