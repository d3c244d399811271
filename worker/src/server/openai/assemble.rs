//! A choice's text and log-probabilities, built from the engine's events one piece at a time:
//! a stream sends each piece as a chunk, a whole response is their concatenation.

use super::schema::{Logprobs, TopLogprobs};
use crate::engine::{FinishReason, TokenInfo};

/// Text and log-probabilities to append to a choice.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Piece {
    pub text: String,
    pub logprobs: Option<Logprobs>,
}

impl Piece {
    pub fn is_empty(&self) -> bool {
        self.text.is_empty() && self.logprobs.is_none()
    }

    pub fn extend(&mut self, more: Piece) {
        self.text.push_str(&more.text);
        if let Some(more) = more.logprobs {
            let lp = self.logprobs.get_or_insert_with(Logprobs::default);
            lp.tokens.extend(more.tokens);
            lp.token_logprobs.extend(more.token_logprobs);
            lp.top_logprobs.extend(more.top_logprobs);
            lp.text_offset.extend(more.text_offset);
        }
    }
}

/// One choice's state between events.
#[derive(Debug)]
pub struct Assembler {
    /// The prompt's text, until it is sent (echo).
    echo: Option<String>,
    /// Log-probabilities asked for.
    logprobs: bool,
    /// False when only the prompt is scored: the one generated token is dropped.
    keep_tokens: bool,
    /// Characters of the echoed prompt (the choice's text starts with it): where the generated
    /// text starts.
    prompt_chars: usize,
    pub completion_tokens: usize,
}

impl Assembler {
    pub fn new(echo: Option<String>, logprobs: bool, keep_tokens: bool) -> Self {
        Assembler {
            echo,
            logprobs,
            keep_tokens,
            prompt_chars: 0,
            completion_tokens: 0,
        }
    }

    /// The echoed prompt, once: generated text starts after it.
    fn append_echo(&mut self, p: &mut Piece) {
        if let Some(echo) = self.echo.take() {
            p.text.push_str(&echo);
            self.prompt_chars = echo.chars().count();
        }
    }

    /// The prompt's tokens with their log-probabilities (only asked for with echo), and where
    /// each token's text starts in the prompt: the echoed prompt and its log-probabilities.
    pub fn prompt_tokens(&mut self, tokens: &[TokenInfo], offsets: &[usize]) -> Piece {
        let mut p = Piece::default();
        if self.echo.is_none() {
            return p;
        }
        if self.logprobs {
            let lp = p.logprobs.get_or_insert_with(Logprobs::default);
            for (t, &offset) in tokens.iter().zip(offsets) {
                push_token(lp, t, offset);
            }
        }
        self.append_echo(&mut p);
        p
    }

    /// A generated token, the text it releases, and where its own text starts in the generated
    /// text (held-back text counted: a release may carry earlier tokens' text).
    pub fn token(&mut self, t: &TokenInfo, delta: &str, offset: usize) -> Piece {
        let mut p = self.finish();
        if !self.keep_tokens {
            return p;
        }
        self.completion_tokens += 1;
        if self.logprobs {
            let at = self.prompt_chars + offset;
            push_token(p.logprobs.get_or_insert_with(Logprobs::default), t, at);
        }
        p.text.push_str(delta);
        p
    }

    /// Whatever is still owed at the end: the echoed prompt of a choice that got no event yet.
    pub fn finish(&mut self) -> Piece {
        let mut p = Piece::default();
        self.append_echo(&mut p);
        p
    }
}

/// A token in the column layout. Its alternatives, most likely first, always include the
/// token itself, as OpenAI's do (so `logprobs: 0` gives just the chosen token); of tokens that
/// read the same, the likelier one stands for them.
fn push_token(lp: &mut Logprobs, t: &TokenInfo, offset: usize) {
    lp.tokens.push(t.text.clone());
    lp.token_logprobs.push(t.logprob);
    lp.top_logprobs.push(t.logprob.map(|chosen| {
        let mut top: Vec<(String, f32)> = Vec::with_capacity(t.top.len() + 1);
        let alternatives = t.top.iter().map(|(_, text, l)| (text, *l));
        for (text, l) in alternatives.chain(std::iter::once((&t.text, chosen))) {
            if !top.iter().any(|(seen, _)| seen == text) {
                top.push((text.clone(), l));
            }
        }
        TopLogprobs(top)
    }));
    lp.text_offset.push(offset);
}

/// OpenAI's two finish reasons: `length`, or `stop` for eos, a stop sequence or a stop token.
/// A prompt that is only scored ends by length (it asked for no tokens).
pub fn finish_reason(r: FinishReason, score_only: bool) -> &'static str {
    match r {
        _ if score_only => "length",
        FinishReason::Length => "length",
        FinishReason::EosToken | FinishReason::StopSequence | FinishReason::StopToken => "stop",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(id: u32, text: &str, lp: Option<f32>, top: &[(&str, f32)]) -> TokenInfo {
        TokenInfo {
            id,
            text: text.into(),
            logprob: lp,
            top: top.iter().map(|(t, l)| (0, t.to_string(), *l)).collect(),
        }
    }

    #[test]
    fn pieces_concatenate_into_the_whole_choice_with_offsets_into_its_text() {
        let mut a = Assembler::new(Some("Hé said".into()), true, true);
        let prompt = [tok(1, "Hé", None, &[]), tok(2, " said", Some(-2.0), &[(" said", -2.0)])];
        let mut whole = a.prompt_tokens(&prompt, &[0, 2]);
        let first = a.token(&tok(3, " no", Some(-0.5), &[(" yes", -0.4)]), " no", 0);
        assert_eq!(first.text, " no");
        whole.extend(first);
        whole.extend(a.token(&tok(4, "!", Some(-1.0), &[]), "!", 3));
        whole.extend(a.finish());
        assert_eq!(whole.text, "Hé said no!");
        let lp = whole.logprobs.unwrap();
        assert_eq!(lp.tokens, ["Hé", " said", " no", "!"]);
        assert_eq!(lp.token_logprobs, [None, Some(-2.0), Some(-0.5), Some(-1.0)]);
        assert_eq!(lp.text_offset, [0, 2, 7, 10], "offsets count characters, not bytes");
        assert_eq!(lp.top_logprobs[0], None, "the first prompt token has no context");
        let top = lp.top_logprobs[2].clone().unwrap();
        assert_eq!(
            top.0,
            [(" yes".to_owned(), -0.4), (" no".to_owned(), -0.5)],
            "most likely first, the chosen token among them"
        );
        assert_eq!(lp.top_logprobs[1].clone().unwrap().0, [(" said".to_owned(), -2.0)]);
        assert_eq!(a.completion_tokens, 2);
    }

    #[test]
    fn offsets_count_text_held_back_for_a_stop_sequence() {
        // Stop sequence "\n\n": the first "\n" is held until "é" shows it was not one.
        let mut a = Assembler::new(Some("Hi".into()), true, true);
        let mut whole = a.token(&tok(1, "\n", Some(-1.0), &[]), "", 0);
        whole.extend(a.token(&tok(2, "é", Some(-1.0), &[]), "\né", 1));
        whole.extend(a.token(&tok(3, "!", Some(-1.0), &[]), "!", 2));
        assert_eq!(whole.text, "Hi\né!");
        assert_eq!(whole.logprobs.unwrap().text_offset, [2, 3, 4]);
    }

    #[test]
    fn echo_without_logprobs_comes_with_the_first_token_and_scoring_drops_the_token() {
        let mut a = Assembler::new(Some("ROMEO:".into()), false, true);
        let p = a.token(&tok(1, "\n", None, &[]), "\n", 0);
        assert_eq!(
            p,
            Piece {
                text: "ROMEO:\n".into(),
                logprobs: None
            }
        );
        assert!(a.finish().is_empty());

        let mut score = Assembler::new(Some("ROMEO:".into()), true, false);
        let p = score.prompt_tokens(&[tok(1, "ROMEO", None, &[]), tok(2, ":", Some(-3.0), &[])], &[0, 5]);
        assert_eq!(p.text, "ROMEO:");
        assert!(score.token(&tok(9, "x", Some(-1.0), &[]), "x", 0).is_empty());
        assert_eq!(score.completion_tokens, 0);
        assert_eq!(finish_reason(FinishReason::EosToken, true), "length");
        assert_eq!(finish_reason(FinishReason::StopSequence, false), "stop");
    }
}
