//! A set of disjoint half-open `u64` ranges, used to account for every
//! cluster of every drive exactly once.

use std::collections::BTreeMap;
use std::ops::Range;

/// Disjoint, merged half-open ranges. Cheap when ranges arrive in order
/// (one entry); out-of-order input costs one map entry per gap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end, non-overlapping and non-adjacent.
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `r`; if any part of it is already present, returns the first
    /// overlapping sub-range and leaves the set unchanged.
    pub fn insert(&mut self, r: Range<u64>) -> Result<(), Range<u64>> {
        if r.is_empty() {
            return Ok(());
        }
        // The range starting at or before r.start.
        if let Some((_, &e)) = self.map.range(..=r.start).next_back() {
            if e > r.start {
                return Err(r.start..e.min(r.end));
            }
        }
        // A range starting inside r.
        if let Some((&s, &e)) = self.map.range(r.start..r.end).next() {
            return Err(s..e.min(r.end));
        }
        let mut start = r.start;
        let mut end = r.end;
        if let Some((&s, &e)) = self.map.range(..=r.start).next_back() {
            if e == r.start {
                start = s;
                self.map.remove(&s);
            }
        }
        if let Some(&e) = self.map.get(&r.end) {
            self.map.remove(&r.end);
            end = e;
        }
        self.map.insert(start, end);
        Ok(())
    }

    /// True when `r` is entirely contained.
    pub fn contains(&self, r: Range<u64>) -> bool {
        if r.is_empty() {
            return true;
        }
        matches!(self.map.range(..=r.start).next_back(), Some((_, &e)) if e >= r.end)
    }

    /// The parts of `0..end` not in the set.
    pub fn gaps(&self, end: u64) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut pos = 0;
        for (&s, &e) in &self.map {
            if s >= end {
                break;
            }
            if s > pos {
                out.push(pos..s);
            }
            pos = pos.max(e);
        }
        if pos < end {
            out.push(pos..end);
        }
        out
    }

    /// Total length covered.
    pub fn len(&self) -> u64 {
        self.map.iter().map(|(s, e)| e - s).sum()
    }

    /// True when nothing is covered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The covered ranges in order.
    pub fn iter(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.map.iter().map(|(&s, &e)| s..e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn basic() {
        let mut s = RangeSet::new();
        s.insert(10..20).unwrap();
        s.insert(0..5).unwrap();
        s.insert(5..10).unwrap();
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0..20]);
        assert_eq!(s.insert(15..25), Err(15..20));
        assert_eq!(s.insert(19..20), Err(19..20));
        s.insert(30..40).unwrap();
        assert_eq!(s.insert(25..35), Err(30..35));
        assert_eq!(s.gaps(50), vec![20..30, 40..50]);
        assert!(s.contains(31..40));
        assert!(!s.contains(19..21));
        assert_eq!(s.len(), 30);
    }

    proptest! {
        #[test]
        fn matches_a_bitmap(ops in proptest::collection::vec((0u64..200, 1u64..20), 1..60)) {
            let mut set = RangeSet::new();
            let mut bits = vec![false; 220];
            for (start, len) in ops {
                let r = start..start + len;
                let overlap = bits[r.start as usize..r.end as usize].iter().any(|&b| b);
                let res = set.insert(r.clone());
                prop_assert_eq!(res.is_err(), overlap);
                if !overlap {
                    for b in &mut bits[r.start as usize..r.end as usize] { *b = true; }
                }
            }
            let covered = bits.iter().filter(|&&b| b).count() as u64;
            prop_assert_eq!(set.len(), covered);
            let gap_len: u64 = set.gaps(220).iter().map(|g| g.end - g.start).sum();
            prop_assert_eq!(gap_len, 220 - covered);
        }
    }
}
