//! Stop sequences matched on the decoded text, across token boundaries.
//!
//! Text that might be the start of a stop sequence is held back until it is known not to
//! be one, so a stop sequence never leaks into a stream.

#[derive(Debug, Default, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Generated text not yet released to the client.
    pending: String,
}

/// What to do with new text.
#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Release this text (may be empty) and go on.
    Continue(String),
    /// A stop sequence matched: release this text (before the match) and stop.
    Stop(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Continue(text.to_owned());
        }
        self.pending.push_str(text);
        let first = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min();
        if let Some(at) = first {
            let out = self.pending[..at].to_owned();
            self.pending.clear();
            return StopOutcome::Stop(out);
        }
        // Hold back the longest suffix that is a proper prefix of some stop sequence.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.pending.ends_with(&s[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        StopOutcome::Continue(out)
    }

    /// Text held back when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_across_pushes_and_holds_back_prefixes() {
        let mut m = StopMatcher::new(vec!["\n\nSCENE".into()]);
        assert_eq!(m.push("I am"), StopOutcome::Continue("I am".into()));
        assert_eq!(m.push(" here.\n"), StopOutcome::Continue(" here.".into()));
        assert_eq!(m.push("\nSC"), StopOutcome::Continue("".into()));
        assert_eq!(m.push("ENE II"), StopOutcome::Stop("".into()));
        let mut m = StopMatcher::new(vec!["ab".into()]);
        assert_eq!(m.push("xa"), StopOutcome::Continue("x".into()));
        assert_eq!(m.push("c"), StopOutcome::Continue("ac".into()));
        assert_eq!(m.push("za"), StopOutcome::Continue("z".into()));
        assert_eq!(m.flush(), "a");
    }

    #[test]
    fn earliest_of_several_stops_wins_and_multibyte_is_safe() {
        let mut m = StopMatcher::new(vec!["—end".into(), "é".into()]);
        assert_eq!(m.push("café—end"), StopOutcome::Stop("caf".into()));
        let mut m = StopMatcher::new(vec!["—x".into()]);
        assert_eq!(m.push("a—"), StopOutcome::Continue("a".into()));
        assert_eq!(m.push("y"), StopOutcome::Continue("—y".into()));
    }
}
