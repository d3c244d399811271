//! NeoX Serve worker: GPT-NeoX inference on candle, sharded tensor-parallel across ranks.
//!
//! Data flows one way: `engine` (scheduling, sampling) → `shard` (step plans to every rank)
//! → `model` (GPT-NeoX forward over a batch) → `parallel` (collectives). Lower layers never import higher ones.

pub mod engine;
pub mod model;
pub mod parallel;
pub mod shard;
