//! The model against HuggingFace transformers' goldens (fp32): logits, hidden states,
//! greedy continuations with the KV cache, a left-padded batch, fp16, sharded files.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use common::*;
use neox_worker::engine::{generate_batch, OfflineOptions, SamplingPlace};
use neox_worker::model::{LogitsWanted, SeqStep};
use neox_worker::shard::LocalRunner;

const TOL: f32 = 1e-4;

fn fixture() -> String {
    fixture_dir().display().to_string()
}

#[test]
fn logits_and_hidden_states_match_hf() {
    let g = Goldens::load();
    let m = load_model(&fixture(), DType::F32);
    for i in g.cases() {
        let ids = g.ids(&format!("case{i}.input_ids"));
        let got = all_logits(&m.model, &ids);
        let want = g.f32_2d(&format!("case{i}.logits"));
        let d = max_abs_diff(&got, &want);
        assert!(d <= TOL, "case{i}: logits differ from HF by {d}");

        let mut cache = m.model.new_cache(ids.len());
        let hidden = m
            .model
            .forward_hidden(&mut [SeqStep {
                tokens: &ids,
                cache: &mut cache,
                logits: LogitsWanted::None,
            }])
            .unwrap();
        let d = max_abs_diff(&hidden.to_vec2().unwrap(), &g.f32_2d(&format!("case{i}.hidden_last")));
        assert!(d <= TOL, "case{i}: final hidden states differ from HF by {d}");
    }
}

#[test]
fn greedy_continuations_with_kv_cache_match_hf() {
    let g = Goldens::load();
    let mut runner = LocalRunner::new(load_model(&fixture(), DType::F32).model);
    assert_greedy_matches_hf(&g, &mut runner, "greedy continuation differs from HF");
}

#[test]
fn left_padded_batch_matches_hf() {
    let g = Goldens::load();
    let m = load_model(&fixture(), DType::F32);
    // Our batches are ragged: a padded row is just its unmasked tokens.
    let (prompts, want) = golden_batch(&g);
    let opts = OfflineOptions::greedy(want[0].len());
    // Last-position logits of the whole batch in one forward step.
    let mut caches: Vec<_> = prompts.iter().map(|p| m.model.new_cache(p.len())).collect();
    let mut steps: Vec<SeqStep<'_>> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, c)| SeqStep {
            tokens: p,
            cache: c,
            logits: LogitsWanted::Last,
        })
        .collect();
    let logits = m.model.forward(&mut steps).unwrap();
    let got: Vec<Vec<f32>> = logits
        .into_iter()
        .map(|l| l.unwrap().to_vec2::<f32>().unwrap().remove(0))
        .collect();
    let d = max_abs_diff(&got, &g.f32_2d("batch.last_logits"));
    assert!(d <= TOL, "batched last logits differ from HF by {d}");
    let mut runner = LocalRunner::new(m.model);
    let (out, _) = generate_batch(&mut runner, &prompts, &opts).unwrap();
    for (row, w) in want.iter().enumerate() {
        assert_eq!(&out[row].ids, w, "batch row {row} differs from HF");
    }
    // The batched tensor sampler (the GPU's) picks the same greedy tokens.
    let on_device = OfflineOptions {
        place: SamplingPlace::Device,
        ..opts
    };
    let (out, _) = generate_batch(&mut runner, &prompts, &on_device).unwrap();
    for (row, w) in want.iter().enumerate() {
        assert_eq!(
            &out[row].ids, w,
            "batch row {row} sampled on the device differs from HF"
        );
    }
}

#[test]
fn prefill_in_chunks_equals_one_prefill() {
    // Chunked prefill (the engine splits long prompts) must not change the numbers.
    let g = Goldens::load();
    let m = load_model(&fixture(), DType::F32);
    let (ids, want) = g.longest_case();
    let got = chunked_logits(&m.model, &ids, 5);
    let d = max_abs_diff(&got, &want);
    assert!(d <= TOL, "chunked prefill differs from HF by {d}");
}

/// Writes every tensor of the fixture converted to `dtype`, split over `shards` files.
fn rewrite_checkpoint(dst: &std::path::Path, dtype: DType, shards: usize) {
    let src = fixture_dir();
    copy_side_files(&src, dst);
    let all = candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    if shards == 1 {
        let conv: HashMap<String, Tensor> = all
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(dtype).unwrap()))
            .collect();
        candle_core::safetensors::save(&conv, dst.join("model.safetensors")).unwrap();
        return;
    }
    let mut weight_map = serde_json::Map::new();
    for s in 0..shards {
        let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
        let part: HashMap<String, Tensor> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| i % shards == s)
            .map(|(_, k)| {
                weight_map.insert((*k).clone(), serde_json::Value::String(file.clone()));
                ((*k).clone(), all[*k].to_dtype(dtype).unwrap())
            })
            .collect();
        candle_core::safetensors::save(&part, dst.join(&file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dst.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn sharded_checkpoint_with_index_gives_identical_logits() {
    let g = Goldens::load();
    let dir = tempfile::tempdir().unwrap();
    rewrite_checkpoint(dir.path(), DType::F32, 3);
    assert!(!dir.path().join("model.safetensors").exists());
    let m = load_model(dir.path().to_str().unwrap(), DType::F32);
    for i in g.cases() {
        let ids = g.ids(&format!("case{i}.input_ids"));
        let d = max_abs_diff(&all_logits(&m.model, &ids), &g.f32_2d(&format!("case{i}.logits")));
        assert!(d <= TOL, "case{i}: sharded checkpoint logits differ from HF by {d}");
    }
}

/// fp16 has a 10-bit mantissa: rounding each weight moves it by up to 2^-11 relative
/// (≈ 4.9e-4). Logits are sums over `hidden` products of O(1) activations with weights
/// rounded independently, so their error grows like sqrt(hidden) * |w| * 4.9e-4 per layer —
/// a few 1e-3 for these shapes. We allow 2e-2 absolute (logits here have std ≈ 2.5), which
/// still fails loudly on any layout or conversion bug (those give errors of order 1).
const FP16_WEIGHTS_TOL: f32 = 2e-2;
/// Computing in fp16 as well rounds every activation too (LayerNorm outputs, attention
/// probabilities, the 4h MLP): allow 1e-1 absolute, still ≪ the logits' spread.
const FP16_COMPUTE_TOL: f32 = 1e-1;

#[test]
fn fp16_weights_and_fp16_compute_stay_within_tolerance() {
    let g = Goldens::load();
    let dir = tempfile::tempdir().unwrap();
    rewrite_checkpoint(dir.path(), DType::F16, 1);
    let path = dir.path().to_str().unwrap().to_owned();
    for (dtype, tol) in [
        (DType::F32, FP16_WEIGHTS_TOL),
        (DType::F16, FP16_COMPUTE_TOL),
        (DType::BF16, 0.25),
    ] {
        let m = load_model(&path, dtype);
        let mut worst = 0.0f32;
        for i in g.cases() {
            let ids = g.ids(&format!("case{i}.input_ids"));
            let d = max_abs_diff(&all_logits(&m.model, &ids), &g.f32_2d(&format!("case{i}.logits")));
            worst = worst.max(d);
        }
        eprintln!("fp16 weights, {dtype:?} compute: max |logit - HF| = {worst}");
        assert!(worst <= tol, "{dtype:?} compute on fp16 weights: {worst} > {tol}");
    }
}

#[test]
fn padded_vocabulary_rows_are_never_sampled() {
    // Like GPT-NeoX-20B (50432 rows, fewer tokenizer entries): add 64 embedding rows past the
    // tokenizer whose logits dominate everything. Greedy output must not change.
    let g = Goldens::load();
    let mut rows = 0;
    let dir = fixture_with_weights(|t| {
        let w = t["embed_out.weight"].clone();
        rows = w.dims2().unwrap().0;
        // Each padded row points along some case's final hidden state, scaled up: its logit
        // beats every real one by far.
        let cases = g.cases();
        let pads: Vec<Tensor> = (0..64)
            .map(|k| {
                let hid = g
                    .get(&format!("case{}.hidden_last", cases[k % cases.len()]))
                    .to_dtype(DType::F32)
                    .unwrap();
                let hid = if hid.rank() == 3 { hid.squeeze(0).unwrap() } else { hid };
                let last = hid.get(hid.dim(0).unwrap() - 1).unwrap();
                let norm = last.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
                (last.broadcast_div(&norm).unwrap() * 100.0)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap()
            })
            .collect();
        let pad = Tensor::cat(&pads, 0).unwrap();
        t.insert("embed_out.weight".into(), Tensor::cat(&[&w, &pad], 0).unwrap());
        let e = t["gpt_neox.embed_in.weight"].clone();
        t.insert("gpt_neox.embed_in.weight".into(), Tensor::cat(&[&e, &pad], 0).unwrap());
    });
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["vocab_size"] = (rows + 64).into();
    std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();

    let m = load_model(dir.path().to_str().unwrap(), DType::F32);
    assert_eq!(m.model.sampleable_vocab(), rows);
    for i in g.cases() {
        // The test bites: over all rows, a padded one has the largest logit.
        let ids = g.ids(&format!("case{i}.input_ids"));
        let row = all_logits(&m.model, &ids).pop().unwrap();
        assert!(
            neox_worker::engine::sampling::argmax(&row) as usize >= rows,
            "case{i}: padding does not dominate"
        );
    }
    let mut runner = LocalRunner::new(m.model);
    assert_greedy_matches_hf(&g, &mut runner, "a padded row was sampled");
}

#[test]
fn an_output_projection_named_lm_head_loads_as_embed_out() {
    // Some writers rename GPT-NeoX's `embed_out` to `lm_head`: the same model either way.
    let g = Goldens::load();
    let dir = fixture_with_weights(|t| {
        let w = t.remove("embed_out.weight").unwrap();
        t.insert("lm_head.weight".into(), w);
    });
    let m = load_model(dir.path().to_str().unwrap(), DType::F32);
    for i in g.cases() {
        let ids = g.ids(&format!("case{i}.input_ids"));
        let d = max_abs_diff(&all_logits(&m.model, &ids), &g.f32_2d(&format!("case{i}.logits")));
        assert!(d <= 1e-4, "case{i}: logits differ from HF by {d}");
    }
}
