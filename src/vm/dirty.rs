//! The dirty-page tracker: which guest pages a reset must rewind, and which
//! to write-protect again afterwards. Pure bookkeeping over bitmaps (one
//! bit per 4 KiB page); the VM feeds it KVM's dirty log and applies what it
//! returns, so it is tested here against a naive model without a VM.
//!
//! A reset is two-phase: [`DirtyTracker::pending`] lists the pages to
//! rewind *without forgetting them*; only [`DirtyTracker::commit`], called
//! after every page was copied, starts a new set. A reset that fails
//! half-way therefore leaves every page in the set, and a retried reset
//! rewinds them all.
//!
//! Pages written in two successive sets (a call's stack, the ABI page, the
//! runtime's own data, a buffer every call fills) are left writable instead
//! of being write-protected again, up to [`HOT_PAGES`] (lowest addresses
//! first): KVM keeps reporting them dirty, so they are always rewound, and
//! the guest's next write to them costs no write-protection fault (about
//! 2 µs under KVM without VT-x, against a fraction of a µs to copy a page).
//! A hot page is copied back without looking at it, except every
//! [`HOT_CHECK`] sets ([`DirtyTracker::checks_hot`]): then it is compared
//! with the snapshot first, and one found unchanged is protected again
//! (demoted). Every [`HOT_PERIOD`] sets all of them are protected again.
//! Whatever a guest writes, a reset copies at most [`HOT_PAGES`] pages it
//! did not write since the last reset.

/// Most pages kept writable between resets (4 MiB): bounds the copy every
/// reset does for pages a call may not have written.
pub(crate) const HOT_PAGES: usize = 1024;
/// Sets after which the hot pages are compared with the snapshot, and the
/// unchanged ones write-protected again.
pub(crate) const HOT_CHECK: u64 = 16;
/// Resets after which the kept-writable pages are write-protected again.
pub(crate) const HOT_PERIOD: u64 = 256;

/// Pages written since the tracked snapshot, and the hot-page state.
#[derive(Debug, Default)]
pub(crate) struct DirtyTracker {
    /// Pages (one bit each) written since the last commit.
    acc: Vec<u64>,
    /// The pages of the previous commit, to find hot pages.
    prev: Vec<u64>,
    /// Indices of the non-zero words of `acc` and `prev`, so the work
    /// follows the pages written, not the memory size.
    acc_words: Vec<usize>,
    prev_words: Vec<usize>,
    /// Bits set in `acc`.
    count: u64,
    /// Guest ranges (address, length) the host wrote (KVM's log only sees
    /// guest writes).
    host: Vec<(u64, u64)>,
    /// From the last `pending`: hot pages to leave writable, sorted.
    hot: Vec<u64>,
    /// Commits so far, for [`HOT_PERIOD`].
    round: u64,
}

impl DirtyTracker {
    /// Adds a dirty-log bitmap (pages written since they were last
    /// write-protected) and returns how many of its pages are new to the
    /// set.
    pub(crate) fn absorb(&mut self, log: &[u64]) -> u64 {
        if self.acc.len() < log.len() {
            self.acc.resize(log.len(), 0);
            self.prev.resize(log.len(), 0);
        }
        let mut new_pages = 0;
        for (i, &word) in log.iter().enumerate() {
            if word != 0 {
                let acc = &mut self.acc[i];
                if *acc == 0 {
                    self.acc_words.push(i);
                }
                let new = u64::from((word & !*acc).count_ones());
                new_pages += new;
                *acc |= word;
            }
        }
        self.count += new_pages;
        new_pages
    }

    /// Records a host write of `len` bytes at guest address `addr`.
    pub(crate) fn note_host_write(&mut self, addr: u64, len: u64) {
        if len > 0 {
            self.host.push((addr, len));
        }
    }

    /// How many host writes are recorded: a mark for [`Self::host_since`].
    pub(crate) fn host_mark(&self) -> usize {
        self.host.len()
    }

    /// The host writes (address, length) recorded after `mark`.
    pub(crate) fn host_since(&self, mark: usize) -> &[(u64, u64)] {
        self.host.get(mark..).unwrap_or(&[])
    }

    /// Guest pages written since the last commit (as absorbed so far).
    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    /// The pages to rewind: every page in the set, host writes and
    /// `always` (a page every call writes), sorted and without duplicates.
    /// Also decides which of them stay writable ([`Self::hot`]). Forgets
    /// nothing: call [`Self::commit`] once the pages were rewound.
    pub(crate) fn pending(&mut self, always: u64, page_size: u64) -> Vec<u64> {
        let mut pages = Vec::with_capacity(self.count as usize + 1 + self.host.len());
        pages.push(always);
        let rehot = (self.round + 1) % HOT_PERIOD == 0;
        self.hot.clear();
        let mut hot_left = HOT_PAGES;
        // Lowest addresses first (the stack and ABI page below the program
        // are among them), whatever order the log was read in.
        self.acc_words.sort_unstable();
        for &i in &self.acc_words {
            let word = self.acc[i];
            let mut hot = if rehot { 0 } else { word & self.prev[i] };
            while hot.count_ones() as usize > hot_left {
                hot &= hot - 1;
            }
            hot_left -= hot.count_ones() as usize;
            push_bits(&mut self.hot, i, hot);
            push_bits(&mut pages, i, word);
        }
        for &(addr, len) in &self.host {
            let last = addr.saturating_add(len - 1) / page_size;
            pages.extend(addr / page_size..=last);
        }
        pages.sort_unstable();
        pages.dedup();
        self.hot.sort_unstable();
        pages
    }

    /// The pages of the last [`Self::pending`] that stay writable, sorted.
    pub(crate) fn hot(&self) -> &[u64] {
        &self.hot
    }

    /// Whether the coming commit is one where hot pages are compared with
    /// the snapshot and the unchanged ones demoted (every [`HOT_CHECK`]
    /// sets); in the others they are copied back unconditionally.
    pub(crate) fn checks_hot(&self) -> bool {
        (self.round + 1) % HOT_CHECK == 0
    }

    /// Starts a new set after the pages of the last [`Self::pending`] were
    /// rewound. Returns the pages to write-protect again, as a bitmap whose
    /// word 0 covers pages `first_word * 64..`: every page of the set but
    /// the hot ones, plus the hot pages in `demote` (found unchanged, so no
    /// longer written by calls).
    pub(crate) fn commit(&mut self, demote: &[u64]) -> Option<(usize, Vec<u64>)> {
        self.round += 1;
        for &i in &self.prev_words {
            self.prev[i] = 0;
        }
        self.prev_words.clear();
        let words = self
            .acc_words
            .iter()
            .copied()
            .chain(demote.iter().map(|&page| (page / 64) as usize));
        let range = words.fold(None, |range: Option<(usize, usize)>, i| match range {
            None => Some((i, i)),
            Some((lo, hi)) => Some((lo.min(i), hi.max(i))),
        });
        let mut protect = range.map(|(lo, hi)| (lo, vec![0u64; hi - lo + 1]));
        if let Some((lo, bitmap)) = &mut protect {
            for &i in &self.acc_words {
                let word = std::mem::take(&mut self.acc[i]);
                bitmap[i - *lo] |= word;
                self.prev[i] = word;
                self.prev_words.push(i);
            }
            // Hot pages stay writable (their bits stay set in KVM's log,
            // so the next set has them again).
            for &page in &self.hot {
                if let Some(bits) = bitmap.get_mut(((page / 64) as usize).wrapping_sub(*lo)) {
                    *bits &= !(1 << (page % 64));
                }
            }
            for &page in demote {
                let i = (page / 64) as usize;
                let bit = 1u64 << (page % 64);
                if let Some(prev) = self.prev.get_mut(i) {
                    *prev &= !bit;
                }
                bitmap[i - *lo] |= bit;
            }
        }
        self.acc_words.clear();
        self.count = 0;
        self.host.clear();
        self.hot.clear();
        protect
    }

    /// Forgets every recorded write (after memory was rewound wholesale and
    /// the dirty log cleared).
    pub(crate) fn clear(&mut self) {
        self.acc.iter_mut().for_each(|w| *w = 0);
        self.prev.iter_mut().for_each(|w| *w = 0);
        self.acc_words.clear();
        self.prev_words.clear();
        self.count = 0;
        self.host.clear();
        self.hot.clear();
    }
}

fn push_bits(out: &mut Vec<u64>, word_index: usize, mut bits: u64) {
    while bits != 0 {
        out.push(word_index as u64 * 64 + u64::from(bits.trailing_zeros()));
        bits &= bits - 1;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    const PAGES: u64 = 4096;
    const WORDS: usize = (PAGES / 64) as usize;
    /// Written by every call: more pages than can stay writable.
    const EVERY_CALL: std::ops::Range<u64> = 1000..1000 + HOT_PAGES as u64 + 300;
    /// Written by every other call.
    const EVERY_OTHER: std::ops::Range<u64> = 3000..3100;

    /// KVM's dirty log with manual protection: a page's bit is set by a
    /// guest write and stays set until it is cleared (write-protected).
    struct Kvm {
        log: Vec<u64>,
    }

    impl Kvm {
        fn write(&mut self, page: u64) {
            self.log[(page / 64) as usize] |= 1 << (page % 64);
        }
        fn clear(&mut self, first_word: usize, bitmap: &[u64]) {
            for (i, bits) in bitmap.iter().enumerate() {
                self.log[first_word + i] &= !bits;
            }
        }
    }

    /// One reset round: guest writes, host writes, whether the copy
    /// succeeds, and which hot pages are found unchanged.
    #[derive(Debug, Clone)]
    struct Round {
        guest: Vec<u64>,
        host: Vec<(u64, u64)>,
        /// Writes [`EVERY_CALL`] (most rounds do) and, on even rounds,
        /// [`EVERY_OTHER`].
        spans: bool,
        /// Writes the pages demoted by the previous commit again.
        rewrite_demoted: bool,
        copy_fails: bool,
        demote_every: u64,
    }

    fn round() -> impl Strategy<Value = Round> {
        (
            // Mostly a recurring working set (hot pages), some random ones.
            proptest::collection::vec(prop_oneof![3 => 0..80u64, 1 => 0..PAGES], 0..100),
            proptest::collection::vec((0..PAGES * 4096 - 8192, 1..8192u64), 0..3),
            proptest::bool::weighted(0.8),
            proptest::bool::weighted(0.5),
            proptest::bool::weighted(0.1),
            1..5u64,
        )
            .prop_map(
                |(guest, host, spans, rewrite_demoted, copy_fails, demote_every)| Round {
                    guest,
                    host,
                    spans,
                    rewrite_demoted,
                    copy_fails,
                    demote_every,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8))]

        /// Over many hundreds of rounds (past the re-protect period), every
        /// page written since the last successful reset is rewound, the hot
        /// set stays bounded, a reset rewinds at most [`HOT_PAGES`] pages
        /// that were not written, and after a commit the only pages KVM
        /// still reports are the hot ones kept writable. The guest writes
        /// more pages every call than can stay writable, a region every
        /// other call, and pages right after they were protected again.
        #[test]
        fn never_skips_a_written_page(rounds in proptest::collection::vec(round(), 600..700)) {
            let mut kvm = Kvm { log: vec![0; WORDS] };
            let mut tracker = DirtyTracker::default();
            // The naive model: pages written since the last successful reset.
            let mut written: BTreeSet<u64> = BTreeSet::new();
            let mut demoted: Vec<u64> = Vec::new();
            for (n, r) in rounds.into_iter().enumerate() {
                let mut guest = r.guest.clone();
                if r.spans {
                    guest.extend(EVERY_CALL);
                    if n % 2 == 0 {
                        guest.extend(EVERY_OTHER);
                    }
                }
                if r.rewrite_demoted {
                    guest.extend(&demoted);
                }
                // Written in this round (a hot page not in it is unchanged).
                let this_round: BTreeSet<u64> = guest.iter().copied().collect();
                for &page in &guest {
                    kvm.write(page);
                    written.insert(page);
                }
                for &(addr, len) in &r.host {
                    tracker.note_host_write(addr, len);
                    written.extend(addr / 4096..=(addr + len - 1) / 4096);
                }
                tracker.absorb(&kvm.log);
                let pending = tracker.pending(1, 4096);
                let pending_set: BTreeSet<u64> = pending.iter().copied().collect();
                prop_assert!(pending.windows(2).all(|w| w[0] < w[1]), "sorted, unique");
                prop_assert!(written.is_subset(&pending_set), "a written page was skipped");
                prop_assert!(pending_set.contains(&1));
                prop_assert!(tracker.hot().len() <= HOT_PAGES);
                prop_assert!(tracker.hot().iter().all(|p| pending_set.contains(p)));
                // Bounded work: besides the written pages, only the pages
                // left writable by the last commit (and the ABI page).
                prop_assert!(pending_set.difference(&written).count() <= HOT_PAGES + 1);
                if r.copy_fails {
                    // Nothing committed: the next round must still rewind all.
                    continue;
                }
                // Only a checking reset compares hot pages: it demotes the
                // unchanged ones (not written this round, or rewritten with
                // the same bytes).
                demoted = if tracker.checks_hot() {
                    tracker
                        .hot()
                        .iter()
                        .copied()
                        .filter(|p| !this_round.contains(p) || p % r.demote_every == 0)
                        .collect()
                } else {
                    Vec::new()
                };
                let hot: BTreeSet<u64> = tracker.hot().iter().copied().collect();
                if let Some((lo, bitmap)) = tracker.commit(&demoted) {
                    kvm.clear(lo, &bitmap);
                }
                written.clear();
                // Pages still reported dirty: only hot ones left writable.
                for (i, &word) in kvm.log.iter().enumerate() {
                    let mut bits = word;
                    while bits != 0 {
                        let page = i as u64 * 64 + u64::from(bits.trailing_zeros());
                        prop_assert!(hot.contains(&page) && !demoted.contains(&page));
                        bits &= bits - 1;
                    }
                }
                prop_assert_eq!(tracker.count(), 0);
            }
        }
    }

    /// Words absorbed by several reads of the log in one set arrive out of
    /// order; the hot pages among them still stay writable.
    #[test]
    fn hot_pages_stay_writable_when_the_log_is_read_several_times() {
        let mut kvm = Kvm {
            log: vec![0; WORDS],
        };
        let mut tracker = DirtyTracker::default();
        for round in 0..4 {
            kvm.write(900);
            tracker.absorb(&kvm.log);
            kvm.write(100);
            tracker.absorb(&kvm.log);
            tracker.pending(1, 4096);
            if round > 0 {
                assert_eq!(tracker.hot(), [100, 900], "round {round}");
            }
            if let Some((lo, bitmap)) = tracker.commit(&[]) {
                kvm.clear(lo, &bitmap);
            }
            if round > 0 {
                // Both stay writable: KVM still reports them.
                assert_ne!(kvm.log[100 / 64] & (1 << (100 % 64)), 0, "round {round}");
                assert_ne!(kvm.log[900 / 64] & (1 << (900 % 64)), 0, "round {round}");
            }
        }
    }

    #[test]
    fn hot_pages_are_protected_again_every_period() {
        let mut kvm = Kvm {
            log: vec![0; WORDS],
        };
        let mut tracker = DirtyTracker::default();
        for round in 1..=HOT_PERIOD * 2 {
            kvm.write(100);
            tracker.absorb(&kvm.log);
            tracker.pending(1, 4096);
            let hot = tracker.hot().to_vec();
            if round % HOT_PERIOD == 0 || round == 1 {
                assert!(hot.is_empty(), "round {round}: {hot:?}");
            } else {
                assert_eq!(hot, [100], "round {round}");
            }
            if let Some((lo, bitmap)) = tracker.commit(&[]) {
                kvm.clear(lo, &bitmap);
            }
        }
    }
}
