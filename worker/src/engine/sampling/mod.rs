//! Turning a row of logits into the next token: penalties, temperature, top-k, top-p,
//! typical-p, and a seeded generator so the same seed and request give the same output.
//! This module samples one row on the host; [`device`] samples a whole step where the logits
//! are (the GPU), and [`sample_batch`] picks between them.

mod batch;
pub mod device;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use batch::{sample_batch, SampleRow, SamplingPlace};
pub use device::token_logprobs;

/// Validated sampling parameters of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0: greedy.
    pub temperature: f32,
    /// 0: disabled.
    pub top_k: usize,
    /// 1: disabled.
    pub top_p: f32,
    /// 1: disabled.
    pub typical_p: f32,
    /// 1: disabled (HF semantics: divide positive logits, multiply negative ones).
    pub repetition_penalty: f32,
    /// OpenAI semantics over generated tokens.
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub seed: u64,
    /// How many top alternatives to report per token.
    pub top_n_tokens: usize,
    /// Added to these tokens' logits before sampling (OpenAI semantics), sorted by id; shared,
    /// as a sequence's parameters are cloned for every row it samples.
    pub logit_bias: std::sync::Arc<[(u32, f32)]>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            typical_p: 1.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
            top_n_tokens: 0,
            logit_bias: std::sync::Arc::new([]),
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Whether a penalty or a bias changes the logits before the choice.
    pub fn adjusts_logits(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
            || !self.logit_bias.is_empty()
    }

    /// The amount subtracted from each token's logit after the repetition penalty: the
    /// frequency and presence penalties (OpenAI's) less any logit bias. The host and device
    /// samplers both take it from here, so they adjust by the same values bit for bit.
    pub(super) fn subtracted(&self, generated: &[u32]) -> std::collections::BTreeMap<u32, f32> {
        let mut minus = std::collections::BTreeMap::new();
        if self.frequency_penalty != 0.0 || self.presence_penalty != 0.0 {
            let mut counts = std::collections::BTreeMap::<u32, u32>::new();
            for &t in generated {
                *counts.entry(t).or_default() += 1;
            }
            for (t, c) in counts {
                minus.insert(t, self.frequency_penalty * c as f32 + self.presence_penalty);
            }
        }
        for &(t, bias) in self.logit_bias.iter() {
            *minus.entry(t).or_insert(0.0) -= bias;
        }
        minus
    }
}

/// The chosen token with its log-probability under the model and the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Per-sequence sampler state.
#[derive(Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// `log_softmax` of `logits` at `ids`, from one pass for the normaliser.
pub fn log_softmax_at(logits: &[f32], ids: impl Iterator<Item = u32>) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32;
    ids.map(|i| logits.get(i as usize).map(|&l| l - lse).unwrap_or(f32::NEG_INFINITY))
        .collect()
}

/// Index of the largest value; the first one on ties, as torch's argmax.
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// Token `id`'s log-probability in a row, and the row's `n` most likely tokens with theirs,
/// most likely first: all from one normaliser, so `id`'s equals its own entry among them.
pub fn logprob_and_top(logits: &[f32], id: u32, n: usize) -> (f32, Vec<(u32, f32)>) {
    let top_ids = top_n(logits, n);
    let mut lps = log_softmax_at(logits, std::iter::once(id).chain(top_ids.iter().copied()));
    let logprob = lps.remove(0);
    (logprob, top_ids.into_iter().zip(lps).collect())
}

fn top_n(logits: &[f32], n: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(idx.len());
    if n == 0 {
        return Vec::new();
    }
    let cmp = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, cmp);
        idx.truncate(n);
    }
    idx.sort_by(cmp);
    idx
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    /// Whether the next token is just the argmax of the raw logits (greedy, no penalties, no
    /// alternatives to report), so the logits need not leave their device.
    pub fn needs_only_argmax(&self) -> bool {
        let p = &self.params;
        p.is_greedy() && !p.adjusts_logits() && p.top_n_tokens == 0
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (only the first `vocab` entries are candidates),
    /// given every token so far (`context`) and the generated ones (`generated`).
    pub fn sample(&mut self, logits: &[f32], vocab: usize, context: &[u32], generated: &[u32]) -> Sampled {
        let vocab = vocab.min(logits.len()).max(1);
        let raw = &logits[..vocab];
        let p = self.params.clone();
        let mut adjusted: Vec<f32>;
        let scores: &[f32] = if p.adjusts_logits() {
            adjusted = raw.to_vec();
            if p.repetition_penalty != 1.0 {
                let mut seen = vec![false; vocab];
                for &t in context {
                    if let Some(s) = seen.get_mut(t as usize) {
                        if !*s {
                            *s = true;
                            let l = &mut adjusted[t as usize];
                            *l = if *l > 0.0 {
                                *l / p.repetition_penalty
                            } else {
                                *l * p.repetition_penalty
                            };
                        }
                    }
                }
            }
            for (t, m) in p.subtracted(generated) {
                if let Some(l) = adjusted.get_mut(t as usize) {
                    *l -= m;
                }
            }
            &adjusted
        } else {
            raw
        };
        let id = if p.is_greedy() {
            argmax(scores)
        } else {
            self.draw(scores)
        };
        let (logprob, top) = logprob_and_top(raw, id, p.top_n_tokens);
        Sampled { id, logprob, top }
    }

    /// This sampler as it will be once it has sampled one token: speculative decoding samples
    /// several positions of a sequence in one batch, each with the draws plain decoding would
    /// have used there.
    pub fn successor(&self) -> Sampler {
        let mut next = self.clone();
        if !self.params.is_greedy() {
            next.next_uniform();
        }
        next
    }

    /// The next uniform draw of this sequence's seeded generator (one per sampled token,
    /// on the host or the device path alike).
    pub fn next_uniform(&mut self) -> f64 {
        self.rng.random()
    }

    fn draw(&mut self, scores: &[f32]) -> u32 {
        let (cand, probs) = self.distribution(scores);
        let r = self.next_uniform();
        // Walk the candidates in id order, as the device sampler does (it has no sort), so one
        // seed draws the same tokens on either path.
        let mut by_id = vec![0.0f64; scores.len()];
        for (&c, &q) in cand.iter().zip(&probs) {
            by_id[c as usize] = q;
        }
        let mut acc = 0.0;
        let mut last = cand[0];
        for (id, &q) in by_id.iter().enumerate().filter(|(_, &q)| q > 0.0) {
            acc += q;
            last = id as u32;
            if r < acc {
                return last;
            }
        }
        last
    }

    /// The tokens a non-greedy draw chooses from (best first) and their probabilities after
    /// temperature, top-k, typical-p and top-p.
    fn distribution(&self, scores: &[f32]) -> (Vec<u32>, Vec<f64>) {
        let p = &self.params;
        // Candidates in descending order of score; top-k and top-p keep a prefix of it.
        let keep = if p.top_k > 0 {
            p.top_k.min(scores.len())
        } else {
            scores.len()
        };
        let mut cand = top_n(scores, keep);
        let t = p.temperature as f64;
        let max = scores[cand[0] as usize] as f64;
        let mut probs: Vec<f64> = cand
            .iter()
            .map(|&i| ((scores[i as usize] as f64 - max) / t).exp())
            .collect();
        normalise(&mut probs);
        if p.typical_p < 1.0 {
            // Typical decoding: keep tokens whose surprisal is closest to the entropy.
            let entropy: f64 = probs.iter().filter(|&&q| q > 0.0).map(|&q| -q * q.ln()).sum();
            let mut order: Vec<usize> = (0..probs.len()).collect();
            order.sort_by(|&a, &b| {
                let da = (-probs[a].ln() - entropy).abs();
                let db = (-probs[b].ln() - entropy).abs();
                da.total_cmp(&db)
            });
            let mut mass = 0.0;
            let mut kept = Vec::new();
            for i in order {
                kept.push(i);
                mass += probs[i];
                if mass >= p.typical_p as f64 {
                    break;
                }
            }
            kept.sort_unstable();
            cand = kept.iter().map(|&i| cand[i]).collect();
            probs = kept.iter().map(|&i| probs[i]).collect();
            normalise(&mut probs);
        }
        if p.top_p < 1.0 {
            let mut mass = 0.0;
            let mut n = 0;
            for q in &probs {
                n += 1;
                mass += q;
                if mass >= p.top_p as f64 {
                    break;
                }
            }
            cand.truncate(n);
            probs.truncate(n);
            normalise(&mut probs);
        }
        (cand, probs)
    }
}

fn normalise(p: &mut [f64]) {
    let s: f64 = p.iter().sum();
    if s > 0.0 {
        p.iter_mut().for_each(|q| *q /= s);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn device_argmax_takes_the_first_of_equal_maxima() {
        use candle_core::{Device, Tensor};
        let rows = [
            [0.5f32, 2.0, 1.0, 2.0, -1.0],
            [3.0, 3.0, 3.0, 0.0, 9.0],
            [-4.0, -2.0, -2.0, -3.0, -5.0],
        ];
        let t = Tensor::new(&rows, &Device::Cpu).unwrap();
        // The element-wise form (the device sampler's) agrees with the host's `argmax`.
        let generic: Vec<u32> = super::device::first_max_index(&t).unwrap().to_vec1().unwrap();
        assert_eq!(generic, [1, 4, 1]);
        let host: Vec<u32> = rows.iter().map(|r| super::argmax(r)).collect();
        assert_eq!(generic, host);
    }

    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    #[test]
    fn greedy_takes_argmax_within_vocab() {
        let mut s = Sampler::new(SamplingParams::default());
        // Index 3 is larger but beyond the sampleable vocabulary.
        let out = s.sample(&[0.1, 2.0, 0.5, 9.0], 3, &[], &[]);
        assert_eq!(out.id, 1);
        assert!(out.logprob < 0.0);
    }

    #[test]
    fn logprob_matches_log_softmax() {
        let logits = [1.0f32, 2.0, 3.0];
        let mut s = Sampler::new(params(|p| p.top_n_tokens = 2));
        let out = s.sample(&logits, 3, &[], &[]);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((out.logprob - (3.0f32.exp() / z).ln()).abs() < 1e-6);
        assert_eq!(out.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
    }

    #[test]
    fn same_seed_same_draws_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(|p| {
                p.temperature = 1.0;
                p.seed = seed;
            }));
            (0..20).map(|_| s.sample(&logits, 50, &[], &[]).id).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let mut s = Sampler::new(params(|p| {
            p.temperature = 5.0;
            p.top_k = 1;
        }));
        assert_eq!(s.sample(&logits, 50, &[], &[]).id, argmax(&logits));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // One token holds ~88% of the mass: top_p 0.5 must always pick it.
        let logits = [5.0f32, 3.0, 0.0, 0.0];
        let mut s = Sampler::new(params(|p| {
            p.temperature = 1.0;
            p.top_p = 0.5;
            p.seed = 3;
        }));
        for _ in 0..50 {
            assert_eq!(s.sample(&logits, 4, &[], &[]).id, 0);
        }
    }

    #[test]
    fn logit_bias_bans_and_forces_tokens_but_logprobs_stay_the_models() {
        let logits = [3.0f32, 2.0, 1.0, 0.5];
        let mut banned = Sampler::new(params(|p| p.logit_bias = vec![(0, -100.0)].into()));
        assert_eq!(banned.sample(&logits, 4, &[], &[]).id, 1);
        let mut forced = Sampler::new(params(|p| p.logit_bias = vec![(3, 100.0), (9, 100.0)].into()));
        let s = forced.sample(&logits, 4, &[], &[]);
        assert_eq!(s.id, 3, "id 9 is past the vocabulary and never a candidate");
        let want = log_softmax_at(&logits, std::iter::once(3)).remove(0);
        assert!((s.logprob - want).abs() < 1e-6, "{} vs the model's {want}", s.logprob);
        // Sampling too: a banned token is never drawn.
        let mut hot = Sampler::new(params(|p| {
            p.temperature = 1.0;
            p.seed = 9;
            p.logit_bias = vec![(0, -100.0), (1, -100.0)].into();
        }));
        for _ in 0..200 {
            assert!(hot.sample(&logits, 4, &[], &[]).id >= 2);
        }
    }

    #[test]
    fn repetition_penalty_follows_hf() {
        let mut s = Sampler::new(params(|p| p.repetition_penalty = 10.0));
        // Token 0 (logit 2.0 → 0.2) is in the context; token 1 (1.0) wins.
        assert_eq!(s.sample(&[2.0, 1.0, -1.0], 3, &[0], &[]).id, 1);
        let mut s = Sampler::new(params(|p| p.presence_penalty = 5.0));
        assert_eq!(s.sample(&[2.0, 1.0, -1.0], 3, &[], &[0]).id, 1);
    }
}
