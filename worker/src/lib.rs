//! NeoX Serve worker: GPT-NeoX inference on candle, sharded tensor-parallel across ranks.
//!
//! Data flows one way: `server` (gRPC, validation) → `engine` (scheduling, sampling) → `shard` (step plans to every rank)
//! → `model` (GPT-NeoX forward over a batch) → `parallel` (collectives). Lower layers never import higher ones.

pub mod engine;
pub mod metrics;
pub mod model;
pub mod parallel;
pub mod server;
pub mod shard;
