//! Helpers shared by the model tests: where the HF fixture lives and how to read its goldens.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use neox_worker::model::{self, LoadedModel};
use neox_worker::parallel::RankInfo;

/// The HF checkpoint under test: `NEOX_FIXTURE_DIR`, else `../shared/fixtures/tiny-neox`.
/// Every assertion is derived from its `golden.safetensors`, so any GPT-NeoX checkpoint with
/// goldens made by `make_fixtures.py` can be swapped in.
pub fn fixture_dir() -> PathBuf {
    if let Ok(d) = std::env::var("NEOX_FIXTURE_DIR") {
        return PathBuf::from(d);
    }
    manifest_dir().join("../../shared/fixtures/tiny-neox")
}

/// The worker crate's directory: where cargo runs this test from (it sets the variable at run
/// time too), else where it was compiled. A target directory shared between clones can hold a
/// binary compiled in another clone, whose compile-time path may be gone.
pub fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

pub fn shakespeare_dir() -> PathBuf {
    let built_here = manifest_dir().join("assets/shakespeare-neox");
    if built_here.exists() {
        return built_here;
    }
    // A test binary carried to another machine (the GPU tests), run from the repository root.
    PathBuf::from("worker/assets/shakespeare-neox")
}

pub struct Goldens {
    pub tensors: HashMap<String, Tensor>,
}

impl Goldens {
    pub fn load() -> Self {
        let path = fixture_dir().join("golden.safetensors");
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        Self { tensors }
    }

    pub fn get(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("golden {name} missing"))
    }

    pub fn ids(&self, name: &str) -> Vec<u32> {
        let t = self.get(name).to_dtype(DType::I64).unwrap().flatten_all().unwrap();
        t.to_vec1::<i64>().unwrap().into_iter().map(|x| x as u32).collect()
    }

    pub fn ids2(&self, name: &str) -> Vec<Vec<u32>> {
        let t = self.get(name).to_dtype(DType::I64).unwrap();
        t.to_vec2::<i64>()
            .unwrap()
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u32).collect())
            .collect()
    }

    pub fn f32_2d(&self, name: &str) -> Vec<Vec<f32>> {
        let t = self.get(name).to_dtype(DType::F32).unwrap();
        let t = if t.rank() == 3 { t.squeeze(0).unwrap() } else { t };
        t.to_vec2().unwrap()
    }

    /// Indices of the single-sequence cases (`case0`, `case1`, ...).
    pub fn cases(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .tensors
            .keys()
            .filter_map(|k| k.strip_prefix("case")?.strip_suffix(".input_ids")?.parse().ok())
            .collect();
        v.sort();
        assert!(!v.is_empty(), "no cases in golden.safetensors");
        v
    }

    /// The case with the longest prompt.
    pub fn longest_case_index(&self) -> usize {
        self.cases()
            .into_iter()
            .max_by_key(|i| self.ids(&format!("case{i}.input_ids")).len())
            .unwrap_or_default()
    }

    /// The longest case's prompt ids and HF logits (every position).
    pub fn longest_case(&self) -> (Vec<u32>, Vec<Vec<f32>>) {
        let case = self.longest_case_index();
        (
            self.ids(&format!("case{case}.input_ids")),
            self.f32_2d(&format!("case{case}.logits")),
        )
    }
}

pub fn load_model(spec: &str, dtype: DType) -> LoadedModel {
    model::load(spec, dtype, &Device::Cpu, RankInfo::SINGLE).unwrap_or_else(|e| panic!("loading {spec}: {e}"))
}

pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "row count");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "row length");
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// Copies a checkpoint directory's non-weight files into `dst`.
pub fn copy_side_files(src: &std::path::Path, dst: &std::path::Path) {
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
}

/// A temporary copy of the fixture whose weights are the fixture's as `edit` leaves them.
pub fn fixture_with_weights(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> tempfile::TempDir {
    let src = fixture_dir();
    let dir = tempfile::tempdir().unwrap();
    copy_side_files(&src, dir.path());
    let mut t = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, dir.path().join("model.safetensors")).unwrap();
    dir
}

/// The `neox-worker` binary, with no group variables inherited from the environment.
pub fn worker() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_neox-worker"));
    c.env_remove("NEOX_RANK")
        .env_remove("NEOX_WORLD_SIZE")
        .env_remove("NEOX_LEADER_ADDR");
    c
}

/// Runs `neox-worker ARGS`, which must succeed, and parses its JSON output.
/// Waits for `child` to exit; kills it and fails the test (naming `what`) after `limit`.
pub fn wait_with_deadline(
    child: &mut std::process::Child,
    limit: std::time::Duration,
    what: &str,
) -> std::process::ExitStatus {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

pub fn run_json(args: &[&str]) -> serde_json::Value {
    let out = worker().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "neox-worker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub fn csv(ids: &[u32]) -> String {
    ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

/// Every position's logits of `ids` run as one prefill.
pub fn all_logits(m: &neox_worker::model::GptNeoX, ids: &[u32]) -> Vec<Vec<f32>> {
    feed(m, &mut m.new_cache(ids.len()), ids)
}

/// Every case's greedy continuation (with the KV cache) equals HF's, token for token.
pub fn assert_greedy_matches_hf(g: &Goldens, runner: &mut neox_worker::shard::LocalRunner, what: &str) {
    for i in g.cases() {
        let ids = g.ids(&format!("case{i}.input_ids"));
        let want = g.ids(&format!("case{i}.greedy"));
        let opts = neox_worker::engine::OfflineOptions::greedy(want.len());
        let (out, _) = neox_worker::engine::generate_batch(runner, &[ids], &opts).unwrap();
        assert_eq!(out[0].ids, want, "case{i}: {what}");
    }
}

/// The goldens' left-padded batch as ragged prompts (a padded row is just its unmasked
/// tokens), with HF's greedy continuation of each row.
pub fn golden_batch(g: &Goldens) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let ids = g.ids2("batch.input_ids");
    let mask = g.ids2("batch.attention_mask");
    let prompts = ids
        .iter()
        .zip(&mask)
        .map(|(r, m)| r.iter().zip(m).filter(|(_, &k)| k == 1).map(|(&t, _)| t).collect())
        .collect();
    (prompts, g.ids2("batch.greedy"))
}

/// Feeds `tokens` through `cache` (after what it holds), returning every position's logits.
pub fn feed(
    m: &neox_worker::model::GptNeoX,
    cache: &mut neox_worker::model::SequenceCache,
    tokens: &[u32],
) -> Vec<Vec<f32>> {
    let out = m
        .forward(&mut [neox_worker::model::SeqStep {
            tokens,
            cache,
            logits: neox_worker::model::LogitsWanted::All,
        }])
        .unwrap();
    out.into_iter().next().flatten().unwrap().to_vec2().unwrap()
}

/// Every position's logits of `ids` fed in chunks of `chunk` tokens through one cache.
pub fn chunked_logits(m: &neox_worker::model::GptNeoX, ids: &[u32], chunk: usize) -> Vec<Vec<f32>> {
    let mut cache = m.new_cache(1);
    ids.chunks(chunk).flat_map(|c| feed(m, &mut cache, c)).collect()
}

/// `neox-worker generate` on the fixture, greedy past EOS for `n` tokens after `ids`, with
/// `extra` flags (e.g. `--tp 2`): its JSON output and the generated ids.
pub fn cli_greedy(extra: &[&str], ids: &[u32], n: usize) -> (serde_json::Value, Vec<u32>) {
    let dir = fixture_dir();
    let (ids, n) = (csv(ids), n.to_string());
    let mut args = vec!["generate", "--model", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend([
        "--prompt-ids",
        &ids,
        "--max-new-tokens",
        &n,
        "--greedy",
        "--ignore-eos",
        "--json",
    ]);
    let v = run_json(&args);
    let got = serde_json::from_value(v["generated_ids"].clone()).unwrap();
    (v, got)
}
