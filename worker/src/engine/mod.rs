//! Scheduling model steps over requests: sampling, stop criteria, batching.

pub mod offline;
pub mod sampling;

pub use offline::{generate_batch, perplexity, BatchTimings, FinishReason, Generation, OfflineOptions, Perplexity};
pub use sampling::{Sampled, Sampler, SamplingParams};
