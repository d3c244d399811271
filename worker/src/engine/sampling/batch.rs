//! Sampling every sequence of a step at once, on the host or where the logits are.

use candle_core::{Result, Tensor};

use super::device::{self, DeviceRow};
use super::{Sampled, Sampler};

/// Where a step's tokens are sampled (`serve --sampling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SamplingPlace {
    /// On the logits' device: the host for CPU models, the GPU for CUDA ones.
    #[default]
    Auto,
    /// Copy each row to the host and sample there.
    Host,
    /// Sample all rows with tensor ops on the logits' device (one small copy per step).
    Device,
}

impl SamplingPlace {
    fn on_device(self, logits: &Tensor) -> bool {
        match self {
            SamplingPlace::Auto => !logits.device().is_cpu(),
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
    let Some(first) = rows.first() else {
        return Ok(Vec::new());
    };
    if !place.on_device(first.logits) {
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
