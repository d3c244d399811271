//! Sampling every sequence of a step at once, on the host or where the logits are.

use candle_core::{Result, Tensor};

use super::device::{self, DeviceRow};
use super::{Sampled, Sampler};

/// Where a step's tokens are sampled (`serve --sampling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SamplingPlace {
    /// The host for CPU models. On a GPU: the device, unless a few rows (at most
    /// [`HOST_ROWS_MAX`]) include filtered ones, which the host samples sooner.
    #[default]
    Auto,
    /// Copy each row to the host and sample there.
    Host,
    /// Sample all rows with tensor ops on the logits' device (one small copy per step).
    Device,
}

/// Most rows `Auto` samples on the host when some are filtered (top-k/top-p/penalties): on an
/// H100 with a 50k vocabulary the device sampler's bisections take ~7-8 ms a step whatever the
/// batch, the host ~0.1 ms for one row and ~2.6 ms for eight (`neox-worker bench`); greedy
/// rows stay on the device (~0.2 ms).
pub const HOST_ROWS_MAX: usize = 8;

impl SamplingPlace {
    fn on_device(self, rows: &[SampleRow<'_>]) -> bool {
        match self {
            SamplingPlace::Auto => match rows.first() {
                Some(first) if !first.logits.device().is_cpu() => {
                    rows.len() > HOST_ROWS_MAX || rows.iter().all(|r| r.sampler.params().is_greedy())
                }
                _ => false,
            },
            SamplingPlace::Host => false,
            SamplingPlace::Device => true,
        }
    }
}

/// One sequence due a token this step.
pub struct SampleRow<'a> {
    /// `[rows, >= vocab]` logits of the sequence's step; its last row is sampled.
    pub logits: &'a Tensor,
    pub sampler: &'a mut Sampler,
    /// Prompt and generated tokens so far.
    pub context: &'a [u32],
    pub generated: &'a [u32],
    /// Whether the chosen token's logprob is wanted (else it may be NaN).
    pub want_logprob: bool,
}

impl<'a> SampleRow<'a> {
    /// One row per logits tensor, each with its own sampler, all with the same context
    /// (benchmarks and tests sampling a batch of alike sequences).
    pub fn alike(
        logits: &'a [Tensor],
        samplers: &'a mut [Sampler],
        context: &'a [u32],
        generated: &'a [u32],
        want_logprob: bool,
    ) -> Vec<Self> {
        logits
            .iter()
            .zip(samplers.iter_mut())
            .map(|(logits, sampler)| SampleRow {
                logits,
                sampler,
                context,
                generated,
                want_logprob,
            })
            .collect()
    }
}

/// The next token of every row, in order, sampled at `place`. Each non-greedy row takes one
/// draw of its own seeded generator either way.
pub fn sample_batch(rows: &mut [SampleRow<'_>], vocab: usize, place: SamplingPlace) -> Result<Vec<Sampled>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    if !place.on_device(rows) {
        return rows
            .iter_mut()
            .map(|r| {
                let last = last_row(r.logits)?.flatten_all()?.to_vec1::<f32>()?;
                Ok(r.sampler.sample(&last, vocab, r.context, r.generated))
            })
            .collect();
    }
    let lasts = rows.iter().map(|r| last_row(r.logits)).collect::<Result<Vec<_>>>()?;
    let logits = Tensor::cat(&lasts, 0)?;
    let device_rows: Vec<DeviceRow<'_>> = rows
        .iter_mut()
        .map(|r| {
            let uniform = if r.sampler.params().is_greedy() {
                0.0
            } else {
                r.sampler.next_uniform()
            };
            DeviceRow {
                params: r.sampler.params(),
                context: r.context,
                generated: r.generated,
                uniform,
                want_logprob: r.want_logprob,
            }
        })
        .collect();
    device::sample_rows(&logits, vocab.min(logits.dim(1)?), &device_rows)
}

fn last_row(logits: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    if n == 0 {
        candle_core::bail!("a sequence due a token returned no logits rows");
    }
    logits.narrow(0, n - 1, 1)
}
