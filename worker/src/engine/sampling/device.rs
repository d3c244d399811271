//! Sampling a whole step's rows where the logits are, so on a GPU only the chosen ids (and
//! the logprobs a request asked for) cross to the host, in one copy per step.
//!
//! The filters are the host sampler's (`Sampler::sample`), expressed without a sort (candle's
//! GPU sort handles at most 1024 columns, a vocabulary has ~50k): top-k, typical-p and top-p
//! each keep "the best first until the target is reached" as a threshold found per row by
//! bisection, with the entries tied at it taken in id order, as the host breaks ties. The draw
//! walks the kept tokens in id order, as the host does, with one uniform per row from the
//! request's seeded generator: a seed gives the same tokens on either path, up to f32
//! rounding at a cumulative-probability boundary. Prefix sums are two-level (within blocks
//! of ~sqrt(vocab), then over blocks), each a small triangular matmul.

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::ops::log_softmax;

use super::{Sampled, SamplingParams};

/// Bisection steps per threshold: the bracket (at most 110 nats, see [`bisect`]) over 2^24 is
/// below f32 resolution there, so more steps would not move the threshold.
const BISECTION_STEPS: usize = 24;

/// One row of a step to sample.
pub struct DeviceRow<'a> {
    pub params: &'a SamplingParams,
    /// Prompt and generated tokens (repetition penalty).
    pub context: &'a [u32],
    /// Generated tokens (frequency and presence penalties).
    pub generated: &'a [u32],
    /// The row's uniform draw in [0, 1); unused when greedy.
    pub uniform: f64,
    /// Whether the chosen token's logprob is wanted.
    pub want_logprob: bool,
}

/// Picks one token per row of `logits` (`[rows, >= vocab]`, any float dtype, any device);
/// only the first `vocab` columns are candidates.
pub fn sample_rows(logits: &Tensor, vocab: usize, rows: &[DeviceRow<'_>]) -> Result<Vec<Sampled>> {
    let (n, cols) = logits.dims2()?;
    if n != rows.len() || vocab == 0 || vocab > cols {
        candle_core::bail!(
            "{n} logits rows of {cols} columns for {} requests over {vocab} tokens",
            rows.len()
        );
    }
    // Ids travel back as f32 alongside the logprobs: exact below 2^24.
    if vocab >= 1 << 24 {
        candle_core::bail!("a vocabulary of {vocab} tokens is too large to sample on the device");
    }
    let raw = logits.narrow(1, 0, vocab)?.to_dtype(DType::F32)?.contiguous()?;
    let scores = apply_penalties(&raw, rows)?;
    let greedy = first_max_index(&scores)?;
    let ids = if rows.iter().all(|r| r.params.is_greedy()) {
        greedy
    } else {
        let probs = filtered_probs(&scores, rows)?;
        let uniforms: Vec<f32> = rows
            .iter()
            .map(|r| (r.uniform as f32).clamp(0.0, 1.0 - f32::EPSILON))
            .collect();
        let drawn = draw(&probs, &uniforms)?;
        let is_greedy: Vec<u8> = rows.iter().map(|r| u8::from(r.params.is_greedy())).collect();
        Tensor::from_vec(is_greedy, n, raw.device())?.where_cond(&greedy, &drawn)?
    };
    let top_n = rows.iter().map(|r| r.params.top_n_tokens).max().unwrap_or(0).min(vocab);
    let want_logprobs = top_n > 0 || rows.iter().any(|r| r.want_logprob);
    let mut columns = vec![ids.to_dtype(DType::F32)?.unsqueeze(1)?];
    if want_logprobs {
        let lsm = log_softmax(&raw, D::Minus1)?;
        let ids = ids.unsqueeze(1)?;
        columns.push(lsm.gather(&ids, 1)?);
        // The top alternatives, best first, by repeatedly taking the first maximum out.
        let index = column_index(n, vocab, raw.device())?;
        let gone = Tensor::new(f32::NEG_INFINITY, raw.device())?.broadcast_as((n, vocab))?;
        let mut rest = raw.clone();
        for _ in 0..top_n {
            let best = first_max_index(&rest)?.unsqueeze(1)?;
            columns.push(best.to_dtype(DType::F32)?);
            columns.push(lsm.gather(&best, 1)?);
            let taken = index.broadcast_eq(&best.to_dtype(DType::F32)?)?;
            rest = taken.where_cond(&gone, &rest)?;
        }
    }
    let table: Vec<Vec<f32>> = Tensor::cat(&columns, 1)?.to_vec2()?;
    Ok(table
        .into_iter()
        .zip(rows)
        .map(|(t, r)| {
            let (logprob, top) = if want_logprobs {
                let top = t[2..]
                    .chunks_exact(2)
                    .take(r.params.top_n_tokens)
                    .map(|c| (c[0] as u32, c[1]))
                    .collect();
                (t[1], top)
            } else {
                (f32::NAN, Vec::new())
            };
            Sampled {
                id: t[0] as u32,
                logprob,
                top,
            }
        })
        .collect())
}

/// The log-probability of `targets[j]` under row `j` of `logits` (`[>= targets, >= vocab]`),
/// normalised over the first `vocab` columns and computed on the logits' device, so only
/// one value per row crosses to the host (prompt logprobs, perplexity). A target outside
/// those columns (a padding id) gets -inf, as on the host.
pub fn token_logprobs(logits: &Tensor, vocab: usize, targets: &[u32]) -> Result<Vec<f32>> {
    let (rows, cols) = logits.dims2()?;
    if targets.len() > rows || vocab == 0 || vocab > cols {
        candle_core::bail!(
            "{} targets over {rows} logits rows of {cols} columns ({vocab} tokens)",
            targets.len()
        );
    }
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    let l = logits
        .narrow(0, 0, targets.len())?
        .narrow(1, 0, vocab)?
        .to_dtype(DType::F32)?;
    let inside: Vec<u32> = targets.iter().map(|&t| t.min(vocab as u32 - 1)).collect();
    let at = Tensor::from_vec(inside, (targets.len(), 1), logits.device())?;
    let lps: Vec<f32> = log_softmax(&l, D::Minus1)?.gather(&at, 1)?.squeeze(1)?.to_vec1()?;
    Ok(lps
        .into_iter()
        .zip(targets)
        .map(|(lp, &t)| if (t as usize) < vocab { lp } else { f32::NEG_INFINITY })
        .collect())
}

/// Row-wise index (u32) of the first maximum, from element-wise ops only: candle's CUDA
/// argmax does not say which of equal values it returns, and half-precision logits do tie.
/// A row without a maximum (NaN from an overflow) gets its last index, never one past it.
pub(super) fn first_max_index(l: &Tensor) -> Result<Tensor> {
    let l = l.to_dtype(DType::F32)?;
    let (rows, n) = l.dims2()?;
    let max = l.max_keepdim(1)?;
    let index = column_index(rows, n, l.device())?;
    let past_end = Tensor::new(n as f32, l.device())?.broadcast_as((rows, n))?;
    l.broadcast_eq(&max)?
        .where_cond(&index, &past_end)?
        .min(1)?
        .minimum((n - 1) as f32)?
        .to_dtype(DType::U32)
}

/// `[rows, n]` whose every row is 0, 1, .. n-1 (f32).
fn column_index(rows: usize, n: usize, device: &Device) -> Result<Tensor> {
    Tensor::arange(0u32, n as u32, device)?
        .to_dtype(DType::F32)?
        .unsqueeze(0)?
        .broadcast_as((rows, n))
}

/// The host sampler's penalties (repetition: HF; frequency and presence: OpenAI), applied
/// with one gather and one scatter over the tokens each row has seen.
fn apply_penalties(raw: &Tensor, rows: &[DeviceRow<'_>]) -> Result<Tensor> {
    let (n, vocab) = raw.dims2()?;
    let (mut at, mut factor, mut minus) = (Vec::new(), Vec::new(), Vec::new());
    for (r, row) in rows.iter().enumerate() {
        let p = row.params;
        // token -> (repetition factor, amount subtracted)
        let mut seen = std::collections::BTreeMap::<u32, (f32, f32)>::new();
        if p.repetition_penalty != 1.0 {
            for &t in row.context.iter().filter(|&&t| (t as usize) < vocab) {
                seen.entry(t).or_insert((1.0, 0.0)).0 = p.repetition_penalty;
            }
        }
        // Penalties less any bias, as the host subtracts them.
        for (t, m) in p.subtracted(row.generated) {
            if (t as usize) < vocab {
                seen.entry(t).or_insert((1.0, 0.0)).1 = m;
            }
        }
        for (t, (f, m)) in seen {
            at.push((r * vocab + t as usize) as u32);
            factor.push(f);
            minus.push(m);
        }
    }
    if at.is_empty() {
        return Ok(raw.clone());
    }
    let dev = raw.device();
    let len = at.len();
    let at = Tensor::from_vec(at, len, dev)?;
    let factor = Tensor::from_vec(factor, len, dev)?;
    let minus = Tensor::from_vec(minus, len, dev)?;
    let flat = raw.flatten_all()?;
    let old = flat.index_select(&at, 0)?;
    let repeated = old.gt(0f32)?.where_cond(&(&old / &factor)?, &(&old * &factor)?)?;
    // Written, not added, so the values are bit for bit the host's.
    flat.scatter(&at, &(repeated - &minus)?, 0)?.reshape((n, vocab))
}

/// `[rows, 1]` f32 from one value per row.
fn per_row(values: Vec<f32>, device: &Device) -> Result<Tensor> {
    let n = values.len();
    Tensor::from_vec(values, (n, 1), device)
}

/// The distribution each row draws from: temperature, then top-k, typical-p and top-p, each
/// renormalising, as the host sampler does. Greedy rows get temperature 1 (their draw is
/// discarded). Returns `[rows, vocab]` probabilities, zero outside the kept tokens.
pub(super) fn filtered_probs(scores: &Tensor, rows: &[DeviceRow<'_>]) -> Result<Tensor> {
    let dev = scores.device();
    let temps: Vec<f32> = rows
        .iter()
        .map(|r| {
            if r.params.is_greedy() {
                1.0
            } else {
                r.params.temperature
            }
        })
        .collect();
    // The best token at 0 before dividing: a tiny temperature sends the others to -inf, not
    // the best to +inf; a huge one keeps the order at full f32 resolution (the thresholds of
    // top-k and top-p are found on these values, not on log-probabilities near -ln(vocab)).
    let scaled = scores
        .broadcast_sub(&scores.max_keepdim(1)?)?
        .broadcast_div(&per_row(temps, dev)?)?;
    let mut kept = scaled.ones_like()?;
    if rows.iter().any(|r| r.params.top_k > 0) {
        let k = rows
            .iter()
            .map(|r| (r.params.top_k > 0).then_some(r.params.top_k as f32))
            .collect();
        kept = (&kept * keep_best(&scaled, &kept, k)?)?;
    }
    let mut probs = renormalise(&(scaled.exp()? * &kept)?)?;
    if rows.iter().any(|r| r.params.typical_p < 1.0) {
        // Keep the tokens whose surprisal is closest to the entropy, up to the mass asked for.
        let log_probs = probs.log()?;
        let zeros = probs.zeros_like()?;
        let entropy = probs
            .gt(0f32)?
            .where_cond(&(&probs * &log_probs)?, &zeros)?
            .sum_keepdim(1)?
            .neg()?;
        let closeness = log_probs.neg()?.broadcast_sub(&entropy)?.abs()?.neg()?;
        let mass = rows
            .iter()
            .map(|r| (r.params.typical_p < 1.0).then_some(r.params.typical_p))
            .collect();
        probs = renormalise(&(&probs * keep_best(&closeness, &probs, mass)?)?)?;
    }
    if rows.iter().any(|r| r.params.top_p < 1.0) {
        let mass = rows
            .iter()
            .map(|r| (r.params.top_p < 1.0).then_some(r.params.top_p))
            .collect();
        probs = renormalise(&(&probs * keep_best(&scaled, &probs, mass)?)?)?;
    }
    Ok(probs)
}

fn renormalise(p: &Tensor) -> Result<Tensor> {
    p.broadcast_div(&p.sum_keepdim(1)?)
}

/// The host's "best first until the target is reached" as a `[rows, vocab]` f32 mask: per row
/// with a target, the entries of highest `values` whose `weights` sum to the target (top-k:
/// unit weights and k; top-p and typical-p: probabilities and the mass), the one crossing it
/// included; a row without a target keeps everything. Found without a sort: a threshold by
/// bisection, then the entries tied at it taken in id order as far as the target still needs.
fn keep_best(values: &Tensor, weights: &Tensor, targets: Vec<Option<f32>>) -> Result<Tensor> {
    let dev = values.device();
    let filtered: Vec<u8> = targets.iter().map(|t| u8::from(t.is_some())).collect();
    let targets: Vec<f32> = targets.into_iter().map(|t| t.unwrap_or(f32::INFINITY)).collect();
    let target = per_row(targets, dev)?;
    let threshold = bisect(values, weights, &target)?;
    // Only entries of positive weight compete (the others were filtered out before).
    let candidate = weights.gt(0f32)?;
    let shape = values.shape();
    let values = candidate.where_cond(values, &Tensor::new(f32::NEG_INFINITY, dev)?.broadcast_as(shape)?)?;
    // The smallest competing value at or above the threshold: the one the boundary ties on.
    let edge = values
        .broadcast_ge(&threshold)?
        .where_cond(&values, &Tensor::new(f32::INFINITY, dev)?.broadcast_as(shape)?)?
        .min_keepdim(1)?;
    let zeros = weights.zeros_like()?;
    let above = values.broadcast_gt(&edge)?;
    let above_weight = above.where_cond(weights, &zeros)?.sum_keepdim(1)?;
    let tied = values.broadcast_eq(&edge)?.to_dtype(DType::F32)?;
    let tied_weight = (&tied * weights)?;
    let before = (prefix_sum(&tied_weight)? - &tied_weight)?;
    let still_needed = before.broadcast_add(&above_weight)?.broadcast_lt(&target)?;
    let keep = (above.to_dtype(DType::F32)? + (tied * still_needed.to_dtype(DType::F32)?)?)?;
    let filtered = Tensor::from_vec(filtered, (values.dim(0)?, 1), dev)?;
    filtered.broadcast_as(shape)?.where_cond(&keep, &weights.ones_like()?)
}

/// Per row, the largest `t` (to bisection precision) such that the `weights` of the entries
/// with `values >= t` still sum to `target` or more; the bracket's floor when no `t` reaches
/// it. The floor is 110 below the row's best (exp(-110) is 0 even as an f32 subnormal: nothing
/// that could be drawn lies under it), so the bracket stays narrow whatever the spread, -inf
/// included.
fn bisect(values: &Tensor, weights: &Tensor, target: &Tensor) -> Result<Tensor> {
    let best = values.max_keepdim(1)?;
    let mut lo = values.min_keepdim(1)?.maximum(&(&best - 110.0)?)?;
    let span = (&best - &lo)?;
    let mut hi = ((&best + (span * 1e-6)?)? + (best.abs()? * 1e-6)?)?.affine(1.0, 1e-30)?;
    let zeros = weights.zeros_like()?;
    for _ in 0..BISECTION_STEPS {
        let mid = ((&lo + &hi)? * 0.5)?;
        let mass = values.broadcast_ge(&mid)?.where_cond(weights, &zeros)?.sum_keepdim(1)?;
        let reached = mass.ge(target)?;
        lo = reached.where_cond(&mid, &lo)?;
        hi = reached.where_cond(&hi, &mid)?;
    }
    Ok(lo)
}

/// Inclusive prefix sums along each row, in two levels (within blocks of ~sqrt(n) columns,
/// then over the block sums) so each level is a small triangular matmul.
fn prefix_sum(x: &Tensor) -> Result<Tensor> {
    let (n, cols) = x.dims2()?;
    let dev = x.device();
    let block = ((cols as f64).sqrt().ceil().max(1.0) as usize).div_ceil(32) * 32;
    let blocks = cols.div_ceil(block);
    let padded = if blocks * block > cols {
        Tensor::cat(&[x, &Tensor::zeros((n, blocks * block - cols), DType::F32, dev)?], 1)?
    } else {
        x.clone()
    };
    let upper = Tensor::triu2(block, DType::F32, dev)?;
    let within = padded
        .reshape((n * blocks, block))?
        .matmul(&upper)?
        .reshape((n, blocks, block))?;
    let sums = within.narrow(2, block - 1, 1)?.squeeze(2)?.contiguous()?;
    let before = (sums.matmul(&upper.narrow(0, 0, blocks)?.narrow(1, 0, blocks)?.contiguous()?)? - &sums)?;
    within
        .broadcast_add(&before.unsqueeze(2)?)?
        .reshape((n, blocks * block))?
        .narrow(1, 0, cols)
}

/// Per row, the first token in id order whose inclusive cumulative probability exceeds
/// `uniform` x the row's mass (inverse CDF, `[rows]` u32), as the host walks its candidates;
/// only tokens of nonzero probability can be drawn, and if rounding leaves the target past
/// the end, the last of them is.
pub(super) fn draw(probs: &Tensor, uniforms: &[f32]) -> Result<Tensor> {
    let (n, vocab) = probs.dims2()?;
    let dev = probs.device();
    let cdf = prefix_sum(probs)?;
    let total = cdf.narrow(1, vocab - 1, 1)?;
    let target = (total * per_row(uniforms.to_vec(), dev)?)?;
    let index = column_index(n, vocab, dev)?;
    let possible = probs.gt(0f32)?;
    let none = Tensor::new(vocab as f32, dev)?.broadcast_as((n, vocab))?;
    let first = cdf
        .broadcast_gt(&target)?
        .where_cond(&possible.where_cond(&index, &none)?, &none)?
        .min(1)?;
    let last = possible
        .where_cond(&index, &Tensor::new(-1f32, dev)?.broadcast_as((n, vocab))?)?
        .max(1)?
        .maximum(0f32)?;
    first.lt(vocab as f32)?.where_cond(&first, &last)?.to_dtype(DType::U32)
}

#[cfg(test)]
mod tests {
    //! The host sampler is the oracle: same penalties, same filters, same logprobs.
    use super::*;
    use crate::engine::sampling::Sampler;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn random_rows(rows: usize, vocab: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..rows)
            .map(|_| (0..vocab).map(|_| rng.random_range(-6.0f32..6.0)).collect())
            .collect()
    }

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    fn row<'a>(params: &'a SamplingParams, context: &'a [u32], generated: &'a [u32], uniform: f64) -> DeviceRow<'a> {
        DeviceRow {
            params,
            context,
            generated,
            uniform,
            want_logprob: true,
        }
    }

    #[test]
    fn greedy_with_penalties_logprobs_and_top_n_match_the_host() {
        let vocab = 300;
        // Wider than the sampleable vocabulary: the extra columns are never candidates.
        let mut logits = random_rows(4, vocab + 20, 1);
        logits[0][vocab + 3] = 100.0;
        let all = [
            params(|_| {}),
            params(|p| p.repetition_penalty = 1.8),
            params(|p| {
                p.frequency_penalty = 0.7;
                p.presence_penalty = 0.4;
                p.top_n_tokens = 3;
                // A bias that decides the row, one on a penalised token, one past the vocabulary.
                p.logit_bias = vec![(5, 50.0), (17, -3.0), (vocab as u32 + 3, 9.0)].into();
            }),
            params(|p| {
                p.repetition_penalty = 0.6;
                p.presence_penalty = -0.5;
                p.top_n_tokens = 5;
            }),
        ];
        let mut rng = StdRng::seed_from_u64(2);
        let contexts: Vec<Vec<u32>> = (0..4)
            .map(|_| (0..40).map(|_| rng.random_range(0..vocab as u32 + 20)).collect())
            .collect();
        let generated: Vec<Vec<u32>> = contexts.iter().map(|c| c[30..].to_vec()).collect();
        let rows: Vec<DeviceRow<'_>> = (0..4).map(|i| row(&all[i], &contexts[i], &generated[i], 0.0)).collect();
        let t = Tensor::new(logits.clone(), &Device::Cpu).unwrap();
        let got = sample_rows(&t, vocab, &rows).unwrap();
        assert_eq!(got[2].id, 5, "the bias decides row 2");
        for i in 0..4 {
            let want = Sampler::new(all[i].clone()).sample(&logits[i], vocab, &contexts[i], &generated[i]);
            assert_eq!(got[i].id, want.id, "row {i}");
            assert!(
                (got[i].logprob - want.logprob).abs() < 1e-5,
                "row {i}: {got:?} vs {want:?}"
            );
            assert_eq!(got[i].top.len(), want.top.len(), "row {i}");
            for (g, w) in got[i].top.iter().zip(&want.top) {
                assert_eq!(g.0, w.0, "row {i}");
                assert!((g.1 - w.1).abs() < 1e-5, "row {i}");
            }
        }
    }

    #[test]
    fn filters_keep_the_host_distribution() {
        let vocab = 500;
        let all = [
            params(|p| p.temperature = 0.7),
            params(|p| {
                p.temperature = 1.3;
                p.top_k = 17;
            }),
            params(|p| {
                p.temperature = 0.9;
                p.top_p = 0.6;
            }),
            params(|p| {
                p.temperature = 1.0;
                p.typical_p = 0.5;
            }),
            params(|p| {
                p.temperature = 0.5;
                p.top_k = 40;
                p.typical_p = 0.9;
                p.top_p = 0.8;
            }),
            // Greedy rows ride along at temperature 1; their draw is discarded.
            params(|_| {}),
        ];
        let logits = random_rows(all.len(), vocab, 3);
        let rows: Vec<DeviceRow<'_>> = all.iter().map(|p| row(p, &[], &[], 0.5)).collect();
        let t = Tensor::new(logits.clone(), &Device::Cpu).unwrap();
        let probs: Vec<Vec<f32>> = filtered_probs(&t, &rows).unwrap().to_vec2().unwrap();
        for (i, p) in all.iter().enumerate().take(all.len() - 1) {
            let (cand, want) = Sampler::new(p.clone()).distribution(&logits[i]);
            let mut dense = vec![0.0f64; vocab];
            for (c, q) in cand.iter().zip(&want) {
                dense[*c as usize] = *q;
            }
            let kept = probs[i].iter().filter(|&&q| q > 0.0).count();
            assert_eq!(kept, cand.len(), "row {i} keeps another number of tokens");
            for (t, (&g, &w)) in probs[i].iter().zip(&dense).enumerate() {
                assert!((g as f64 - w).abs() < 1e-5, "row {i} token {t}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn overflowed_logits_still_give_tokens_inside_the_vocabulary() {
        let mut logits = random_rows(3, 64, 7);
        logits[0] = vec![f32::NAN; 64];
        logits[1][5] = f32::INFINITY;
        logits[2][9] = f32::NAN;
        let greedy = params(|p| p.top_n_tokens = 2);
        let filtered = params(|p| {
            p.temperature = 0.9;
            p.top_k = 8;
            p.top_p = 0.9;
            p.top_n_tokens = 2;
        });
        let t = Tensor::new(logits, &Device::Cpu).unwrap();
        for p in [&greedy, &filtered] {
            let rows: Vec<DeviceRow<'_>> = (0..3).map(|_| row(p, &[1, 2], &[2], 0.3)).collect();
            for s in sample_rows(&t, 64, &rows).unwrap() {
                assert!(s.id < 64 && s.top.iter().all(|t| t.0 < 64), "{s:?}");
            }
        }
    }

    #[test]
    fn token_logprobs_equal_the_host_log_softmax() {
        let logits = random_rows(5, 90, 6);
        let targets = [3u32, 0, 79, 85, 41];
        let t = Tensor::new(logits.clone(), &Device::Cpu).unwrap();
        // Columns past 80 are padding: a target there has no probability.
        let got = token_logprobs(&t, 80, &targets[..4]).unwrap();
        for (j, (&g, &target)) in got.iter().zip(&targets).enumerate() {
            let want = crate::engine::sampling::log_softmax_at(&logits[j][..80], std::iter::once(target))[0];
            assert!(g == want || (g - want).abs() < 1e-5, "row {j}: {g} vs {want}");
        }
        assert_eq!(got[3], f32::NEG_INFINITY);
        assert!(token_logprobs(&t, 80, &[0; 6]).is_err(), "more targets than rows");
    }

    #[test]
    fn ties_at_a_threshold_are_broken_by_id_as_on_the_host() {
        // Half-precision-like logits on a coarse grid: many exact ties.
        let vocab = 200;
        let logits: Vec<Vec<f32>> = random_rows(4, vocab, 8)
            .into_iter()
            .map(|r| r.into_iter().map(|x| (x * 2.0).round() / 2.0).collect())
            .collect();
        let all = [
            params(|p| {
                p.temperature = 1.0;
                p.top_k = 7;
            }),
            params(|p| {
                p.temperature = 0.8;
                p.top_p = 0.5;
            }),
            params(|p| {
                p.temperature = 1.2;
                p.top_k = 1;
            }),
            params(|p| {
                p.temperature = 0.9;
                p.top_k = 30;
                p.top_p = 0.7;
            }),
        ];
        assert_same_distribution(&logits, &all);
    }

    /// The device's filtered distribution of each row equals the host's (kept set and
    /// probabilities).
    fn assert_same_distribution(logits: &[Vec<f32>], all: &[SamplingParams]) {
        let vocab = logits[0].len();
        let rows: Vec<DeviceRow<'_>> = all.iter().map(|p| row(p, &[], &[], 0.5)).collect();
        let t = Tensor::new(logits.to_vec(), &Device::Cpu).unwrap();
        let probs: Vec<Vec<f32>> = filtered_probs(&t, &rows).unwrap().to_vec2().unwrap();
        for (i, p) in all.iter().enumerate() {
            let (cand, want) = Sampler::new(p.clone()).distribution(&logits[i]);
            let mut dense = vec![0.0f64; vocab];
            for (c, q) in cand.iter().zip(&want) {
                dense[*c as usize] = *q;
            }
            for (t, (&g, &w)) in probs[i].iter().zip(&dense).enumerate() {
                assert!((g as f64 - w).abs() < 1e-5, "row {i} ({p:?}) token {t}: {g} vs {w}");
                assert_eq!(g > 0.0, w > 0.0, "row {i} ({p:?}) token {t} kept on one side only");
            }
        }
    }

    #[test]
    fn seeded_draws_equal_the_host_samplers_even_for_extreme_parameters() {
        use crate::engine::sampling::{sample_batch, SampleRow, SamplingPlace};
        let vocab = 400;
        let all = [
            params(|p| p.temperature = 1.0),
            params(|p| {
                p.temperature = 0.7;
                p.top_k = 20;
                p.top_p = 0.9;
                p.repetition_penalty = 1.3;
            }),
            // A tiny temperature is greedy; a huge one is uniform over the top k.
            params(|p| p.temperature = 1e-30),
            params(|p| {
                p.temperature = 1e5;
                p.top_k = 5;
            }),
            // Penalties that overflow a logit to -inf.
            params(|p| {
                p.temperature = 1.0;
                p.top_k = 3;
                p.repetition_penalty = 1e38;
            }),
            params(|p| {
                p.temperature = 1.0;
                p.typical_p = 0.9;
                p.repetition_penalty = 1e38;
            }),
            params(|p| {
                p.temperature = 2.0;
                p.typical_p = 0.3;
                p.frequency_penalty = 1.5;
                p.presence_penalty = 1.0;
            }),
        ];
        let logits = random_rows(all.len(), vocab, 9);
        let context: Vec<u32> = (0..vocab as u32).step_by(3).collect();
        let run = |place: SamplingPlace| -> Vec<Vec<u32>> {
            let tensors: Vec<Tensor> = logits
                .iter()
                .map(|r| Tensor::new(r.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap())
                .collect();
            let mut samplers: Vec<Sampler> = all
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let mut p = p.clone();
                    p.seed = 100 + i as u64;
                    Sampler::new(p)
                })
                .collect();
            (0..30)
                .map(|_| {
                    let mut rows = SampleRow::alike(&tensors, &mut samplers, &context, &context[..10], false);
                    sample_batch(&mut rows, vocab, place)
                        .unwrap()
                        .into_iter()
                        .map(|s| s.id)
                        .collect()
                })
                .collect()
        };
        let (host, device) = (run(SamplingPlace::Host), run(SamplingPlace::Device));
        for (step, (h, d)) in host.iter().zip(&device).enumerate() {
            assert_eq!(h, d, "step {step}: host and device draws differ");
        }
        // The draws are not constant (the uniforms really are used).
        assert!(
            host.iter()
                .map(|s| s[0])
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 5
        );
    }

    #[test]
    fn the_draw_inverts_the_cdf_in_index_order() {
        // A vocabulary that is not a multiple of the block, zeros included.
        let vocab = 1037;
        let mut rng = StdRng::seed_from_u64(4);
        let mut p: Vec<f32> = (0..vocab)
            .map(|i| if i % 7 == 0 { 0.0 } else { rng.random_range(0.0f32..1.0) })
            .collect();
        let sum: f32 = p.iter().sum();
        p.iter_mut().for_each(|q| *q /= sum);
        let cdf: Vec<f64> = p
            .iter()
            .scan(0.0f64, |acc, &q| {
                *acc += q as f64;
                Some(*acc)
            })
            .collect();
        let mut uniforms: Vec<f32> = (0..200).map(|_| rng.random_range(0.0f32..1.0)).collect();
        uniforms.extend([0.0, 1.0 - f32::EPSILON]);
        let rows = Tensor::new(p.clone(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .broadcast_as((uniforms.len(), vocab))
            .unwrap()
            .contiguous()
            .unwrap();
        let ids: Vec<u32> = draw(&rows, &uniforms).unwrap().to_vec1().unwrap();
        for (&u, &id) in uniforms.iter().zip(&ids) {
            let id = id as usize;
            assert!(p[id] > 0.0, "u {u} drew token {id} of probability 0");
            let below = if id == 0 { 0.0 } else { cdf[id - 1] };
            // The f32 prefix sums may move a boundary by a few ulps.
            let u = u as f64;
            assert!(
                below <= u + 1e-5 && u < cdf[id] + 1e-5,
                "u {u} drew {id}: [{below}, {})",
                cdf[id]
            );
        }
    }

    #[test]
    fn draws_follow_the_filtered_distribution() {
        let logits = [2.0f32, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0];
        let p = params(|p| {
            p.temperature = 0.8;
            p.top_k = 6;
            p.top_p = 0.9;
        });
        let (cand, want) = Sampler::new(p.clone()).distribution(&logits);
        let n = 6000;
        let mut rng = StdRng::seed_from_u64(5);
        let rows: Vec<DeviceRow<'_>> = (0..n).map(|_| row(&p, &[], &[], rng.random())).collect();
        let t = Tensor::new(&logits, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .broadcast_as((n, logits.len()))
            .unwrap()
            .contiguous()
            .unwrap();
        let got = sample_rows(&t, logits.len(), &rows).unwrap();
        let mut counts = [0usize; 8];
        for s in &got {
            counts[s.id as usize] += 1;
        }
        for (t, &c) in counts.iter().enumerate() {
            let q = cand
                .iter()
                .position(|&x| x as usize == t)
                .map(|j| want[j])
                .unwrap_or(0.0);
            let sigma = (n as f64 * q * (1.0 - q)).sqrt();
            assert!(
                (c as f64 - n as f64 * q).abs() <= 4.0 * sigma + 1.0,
                "token {t}: {c} draws of {n}, expected p {q}"
            );
        }
    }
}
