//! Speculative decoding by prompt lookup: draft tokens come from the sequence itself.
//!
//! A decoding sequence whose last few tokens appeared earlier (in its prompt or its output)
//! guesses that what followed them then follows now: code being edited, a document being
//! quoted or summarised, a model stuck in a loop. The engine feeds the guesses after the
//! sequence's real last token in one step and samples every row as it would have sampled one
//! token per step; it keeps the guesses up to the first one the sampler disagrees with, plus
//! the sampler's own token there. Output and seeded sampling are exactly those of plain
//! decoding (the rows are sampled with the same contexts and the same draws); a step that
//! would only read the weights once per token reads them once for several.
//!
//! No draft model: proposing costs a scan of the sequence's tokens.

/// How drafts are proposed (`serve --speculative-tokens`, `--speculative-ngram`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpeculationConfig {
    /// Most draft tokens per sequence and step (0: no speculation).
    pub max_tokens: usize,
    /// The longest suffix looked up; shorter ones are tried down to `min_ngram`.
    pub max_ngram: usize,
    pub min_ngram: usize,
    /// Speculate only while at most this many sequences decode in a step: bigger batches
    /// already use what a step reads, and verification rows then cost compute.
    pub max_batch: usize,
}

impl SpeculationConfig {
    pub fn enabled(&self) -> bool {
        self.max_tokens > 0 && self.max_batch > 0
    }
}

/// The tokens that followed the latest earlier occurrence of the longest suffix of `tokens`
/// (from `max_ngram` down to `min_ngram` tokens long) that occurred before, at most `max`.
/// Where those run out before `max` (the occurrence is near the end) they repeat: text that
/// recurs that closely is a loop. Empty when no suffix recurs.
pub fn propose(tokens: &[u32], cfg: &SpeculationConfig, max: usize) -> Vec<u32> {
    let len = tokens.len();
    if max == 0 {
        return Vec::new();
    }
    for n in (cfg.min_ngram.max(1)..=cfg.max_ngram).rev() {
        if n >= len {
            continue;
        }
        let suffix = &tokens[len - n..];
        // Latest first: recent text predicts the next tokens best. A match ending at `end`
        // proposes tokens[end..]; `end < len` keeps at least one.
        let found = (n..len).rev().find(|&end| &tokens[end - n..end] == suffix);
        if let Some(end) = found {
            let period = len - end;
            return (0..max).map(|i| tokens[end + i % period]).collect();
        }
    }
    Vec::new()
}

/// Verifications in a row that keep no draft before a sequence stops drafting for a while.
const MISSES_BEFORE_PAUSE: u32 = 3;
/// The first pause, in steps; each pause while drafts keep failing doubles it.
const FIRST_PAUSE: u32 = 4;
/// The longest pause, in steps: a sequence whose text starts to repeat is looked at again soon.
const MAX_PAUSE: u32 = 64;

/// A sequence's draft length, adapted to how its drafts fare (as HF's assisted generation
/// does): two more after a draft accepted whole, one fewer after a rejection. A sequence whose
/// drafts keep failing outright (text whose word pairs recur with other continuations) pauses
/// drafting for 4 steps, then 8, 16, … up to 64 while it keeps failing, since each rejected
/// row costs compute; any kept draft ends the back-off.
#[derive(Debug, Clone, Copy)]
pub struct DraftLength {
    current: usize,
    /// Verifications in a row that kept nothing.
    misses: u32,
    /// Steps left without drafts, and the next pause's length.
    paused: u32,
    next_pause: u32,
}

impl DraftLength {
    pub fn new(max: usize) -> Self {
        Self {
            current: max,
            misses: 0,
            paused: 0,
            next_pause: FIRST_PAUSE,
        }
    }

    /// The most drafts to propose this step (0 while paused); called once per decode step.
    pub fn take(&mut self) -> usize {
        if self.paused > 0 {
            self.paused -= 1;
            return 0;
        }
        self.current
    }

    /// Records a verification of `proposed` tokens of which `accepted` were kept.
    pub fn record(&mut self, proposed: usize, accepted: usize, max: usize) {
        self.current = if accepted == proposed {
            (self.current + 2).min(max)
        } else {
            self.current.saturating_sub(1).max(1)
        };
        if accepted > 0 {
            self.misses = 0;
            self.next_pause = FIRST_PAUSE;
            return;
        }
        self.misses += 1;
        if self.misses >= MISSES_BEFORE_PAUSE {
            self.misses = 0;
            self.paused = self.next_pause;
            self.next_pause = (self.next_pause * 2).min(MAX_PAUSE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(min: usize, max: usize) -> SpeculationConfig {
        SpeculationConfig {
            max_tokens: 8,
            max_ngram: max,
            min_ngram: min,
            max_batch: 4,
        }
    }

    #[test]
    fn proposes_what_followed_the_latest_earlier_occurrence() {
        // "1 2 3" recurs at the end; its latest earlier occurrence is followed by 7 8.
        let t = [1, 2, 3, 4, 5, 1, 2, 3, 7, 8, 9, 1, 2, 3];
        assert_eq!(propose(&t, &cfg(2, 3), 2), vec![7, 8]);
        assert_eq!(propose(&t, &cfg(2, 3), 6), vec![7, 8, 9, 1, 2, 3]);
        assert_eq!(propose(&t, &cfg(2, 3), 0), Vec::<u32>::new());
    }

    #[test]
    fn prefers_the_longest_suffix() {
        // "3 9" (two tokens) last occurred followed by 5; "9" alone last occurred followed by 6.
        let t = [3, 9, 5, 9, 6, 3, 9];
        assert_eq!(propose(&t, &cfg(1, 2), 1), vec![5]);
        assert_eq!(propose(&t, &cfg(1, 1), 1), vec![6]);
    }

    #[test]
    fn proposes_nothing_without_a_recurring_suffix() {
        assert!(propose(&[1, 2, 3, 4], &cfg(1, 3), 4).is_empty());
        assert!(propose(&[], &cfg(1, 3), 4).is_empty());
        assert!(propose(&[5], &cfg(1, 3), 4).is_empty());
        // Only a 1-token match exists, below the minimum.
        assert!(propose(&[1, 2, 3, 2], &cfg(2, 3), 4).is_empty());
    }

    #[test]
    fn a_loop_proposes_its_own_continuation() {
        // A period-2 loop: the suffix recurs one period earlier, and the loop goes on.
        let t = [1, 2, 1, 2, 1, 2];
        assert_eq!(propose(&t, &cfg(2, 3), 5), vec![1, 2, 1, 2, 1]);
        assert_eq!(propose(&[7, 7, 7], &cfg(1, 2), 3), vec![7, 7, 7]);
        // A match near the end of other text repeats what followed it.
        assert_eq!(propose(&[4, 5, 6, 8, 5, 6], &cfg(2, 2), 4), vec![8, 5, 6, 8]);
    }

    #[test]
    fn draft_length_grows_on_success_and_shrinks_on_failure() {
        let mut d = DraftLength::new(5);
        assert_eq!(d.take(), 5);
        d.record(5, 2, 5);
        assert_eq!(d.take(), 4);
        d.record(4, 1, 5);
        d.record(3, 1, 5);
        d.record(2, 1, 5);
        assert_eq!(d.take(), 1, "partial matches shrink it, never below 1");
        d.record(1, 1, 5);
        assert_eq!(d.take(), 3);
        d.record(3, 3, 5);
        d.record(5, 5, 5);
        assert_eq!(d.take(), 5);
    }

    /// Steps until the next draft (0: drafts this step), taking a step each time.
    fn steps_paused(d: &mut DraftLength) -> usize {
        (0..).find(|_| d.take() > 0).unwrap()
    }

    #[test]
    fn drafts_that_keep_failing_pause_drafting_for_longer_and_longer() {
        let mut d = DraftLength::new(4);
        let mut pauses = Vec::new();
        for _ in 0..6 {
            for _ in 0..MISSES_BEFORE_PAUSE {
                assert!(d.take() > 0);
                d.record(1, 0, 4);
            }
            pauses.push(steps_paused(&mut d));
            d.record(1, 0, 4); // that draft failed too: the count starts again
            d.record(1, 0, 4);
            d.record(1, 0, 4);
            pauses.push(steps_paused(&mut d));
        }
        assert_eq!(&pauses[..5], &[4, 8, 16, 32, 64]);
        assert!(pauses[5..].iter().all(|&p| p == 64), "{pauses:?}");
        // Any kept draft ends the back-off.
        d.record(1, 1, 4);
        for _ in 0..MISSES_BEFORE_PAUSE {
            d.record(1, 0, 4);
        }
        assert_eq!(steps_paused(&mut d), 4);
        // Misses that are not in a row never pause.
        let mut d = DraftLength::new(4);
        for _ in 0..20 {
            d.record(2, 0, 4);
            d.record(2, 1, 4);
            assert!(d.take() > 0);
        }
    }
}
