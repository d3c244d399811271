//! Scheduling model steps over requests: queue, continuous batching, KV blocks, sampling,
//! stop criteria.

mod admission;
mod blocks;
pub mod offline;
mod prefix_cache;
mod request;
pub mod sampling;
mod scheduler;
pub mod speculation;
mod stop;

pub use blocks::BlockManager;
pub use offline::{generate_batch, perplexity, BatchTimings, Generation, OfflineOptions, Perplexity};
pub use prefix_cache::{Hit, Lookup, PrefixCache};
pub use request::{Event, Failure, Finish, FinishReason, Request, StopCriteria, TokenInfo, ENGINE_STOPPED};
pub use sampling::{sample_batch, SampleRow, Sampled, Sampler, SamplingParams, SamplingPlace};
pub use scheduler::{start, EngineConfig, EngineHandle, SubmitError};
pub use speculation::SpeculationConfig;
pub use stop::{StopMatcher, StopOutcome};
