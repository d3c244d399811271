//! The embedded default model against its HF goldens: greedy continuations and perplexity.

mod common;

use candle_core::DType;
use common::*;
use neox_worker::engine::{generate_batch, perplexity, OfflineOptions};
use neox_worker::model::IncrementalDecoder;
use neox_worker::shard::LocalRunner;

fn golden() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(shakespeare_dir().join("golden.json")).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn builtin_greedy_continuations_equal_hf() {
    let g = golden();
    let m = load_model("builtin:shakespeare", DType::F32);
    let tokenizer = m.tokenizer;
    let mut runner = LocalRunner::new(m.model);
    for p in g["prompts"].as_array().unwrap() {
        let prompt = p["prompt"].as_str().unwrap();
        let prompt_ids = tokenizer.encode(prompt).unwrap();
        assert_eq!(
            prompt_ids,
            ids(&p["input_ids"]),
            "tokenizer differs from HF on {prompt:?}"
        );
        let want = ids(&p["output_ids"]);
        let opts = OfflineOptions::greedy(want.len());
        let (out, _) = generate_batch(&mut runner, &[prompt_ids], &opts).unwrap();
        assert_eq!(out[0].ids, want, "greedy continuation of {prompt:?}");
        assert_eq!(
            tokenizer.decode(&out[0].ids).unwrap(),
            p["output_text"].as_str().unwrap()
        );
    }
}

#[test]
fn builtin_hamlet_perplexity_equals_hf() {
    let g = golden();
    let want = g["hamlet_eval"]["perplexity"].as_f64().unwrap();
    let window = g["hamlet_eval"]["window"].as_u64().unwrap() as usize;
    let text = std::fs::read_to_string(shakespeare_dir().join("hamlet_eval_ids.json")).unwrap();
    let eval: Vec<u32> = serde_json::from_str(&text).unwrap();
    let m = load_model("builtin:shakespeare", DType::F32);
    let p = perplexity(&mut LocalRunner::new(m.model), &eval, window).unwrap();
    assert_eq!(
        p.predicted_tokens,
        g["hamlet_eval"]["predicted_tokens"].as_u64().unwrap() as usize
    );
    assert!(
        (p.perplexity - want).abs() <= 0.01,
        "perplexity {} vs HF {want}",
        p.perplexity
    );
}

#[test]
fn builtin_equals_the_checkpoint_directory() {
    // The embedded bytes are the checkpoint in assets/: same logits from both.
    let a = load_model("builtin:shakespeare", DType::F32);
    let b = load_model(shakespeare_dir().to_str().unwrap(), DType::F32);
    assert_eq!(a.model.config(), b.model.config());
    let ids = a.tokenizer.encode("HAMLET:\nTo be").unwrap();
    let opts = OfflineOptions::greedy(8);
    assert_eq!(
        generate_batch(&mut LocalRunner::new(a.model), std::slice::from_ref(&ids), &opts)
            .unwrap()
            .0[0]
            .ids,
        generate_batch(&mut LocalRunner::new(b.model), &[ids], &opts).unwrap().0[0].ids
    );
}

#[test]
fn incremental_decoding_never_splits_a_character() {
    let m = load_model("builtin:shakespeare", DType::F32);
    let text = "naïve café — “quotes” 🎭 ROMEO: ‘tis";
    let ids = m.tokenizer.encode(text).unwrap();
    let mut dec = IncrementalDecoder::new();
    let mut out = String::new();
    for &id in &ids {
        let delta = dec.push(&m.tokenizer, id).unwrap();
        assert!(!delta.contains('\u{FFFD}'), "delta {delta:?} holds half a character");
        out.push_str(&delta);
    }
    out.push_str(&dec.finish(&m.tokenizer).unwrap());
    assert_eq!(out, text);
    assert!(
        ids.len() > text.chars().count() / 3,
        "multi-byte characters span several tokens"
    );
}
