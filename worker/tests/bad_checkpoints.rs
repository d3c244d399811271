//! A broken checkpoint is a clear error naming the file and the tensor, never a panic.

mod common;

use candle_core::{DType, Device};
use common::*;
use neox_worker::model;
use neox_worker::parallel::RankInfo;

fn load_err(dir: &std::path::Path) -> String {
    match model::load(dir.to_str().unwrap(), DType::F32, &Device::Cpu, RankInfo::SINGLE) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn fixture_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_side_files(&fixture_dir(), dir.path());
    std::fs::copy(
        fixture_dir().join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    dir
}

#[test]
fn missing_weights_file_is_named() {
    let dir = fixture_copy();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors") && e.contains("not found"), "{e}");
}

#[test]
fn missing_config_is_named() {
    let dir = fixture_copy();
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn truncated_safetensors_is_named() {
    let dir = fixture_copy();
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
    // Cut inside the header too.
    std::fs::write(&path, &bytes[..20]).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = fixture_with_weights(|t| {
        t.remove("gpt_neox.layers.1.mlp.dense_4h_to_h.weight").unwrap();
    });
    let e = load_err(dir.path());
    assert!(
        e.contains("gpt_neox.layers.1.mlp.dense_4h_to_h.weight") && e.contains("missing"),
        "{e}"
    );
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let name = "gpt_neox.layers.0.attention.query_key_value.weight";
    let dir = fixture_with_weights(|t| {
        let w = t[name].narrow(0, 0, 8).unwrap();
        t.insert(name.to_owned(), w);
    });
    let e = load_err(dir.path());
    assert!(
        e.contains(name) && e.contains("shape [8,") && e.contains("expected"),
        "{e}"
    );
}

#[test]
fn unsupported_dtype_and_bad_config_are_clear() {
    let name = "gpt_neox.final_layer_norm.bias";
    let dir = fixture_with_weights(|t| {
        t.insert(name.to_owned(), t[name].to_dtype(DType::F64).unwrap());
    });
    let e = load_err(dir.path());
    assert!(e.contains(name) && e.contains("F64"), "{e}");

    let dir = fixture_copy();
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(dir.path().join("config.json"), cfg.replace("\"gelu\"", "\"mish\"")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("hidden_act \"mish\""), "{e}");
}

#[test]
fn out_of_vocabulary_ids_and_context_overflow_are_input_errors() {
    let m = load_model(fixture_dir().to_str().unwrap(), DType::F32);
    let c = m.model.config().clone();
    let mut cache = m.model.new_cache(4);
    let bad = [c.vocab_size as u32];
    let e = m
        .model
        .forward(&mut [model::SeqStep {
            tokens: &bad,
            cache: &mut cache,
            logits: model::LogitsWanted::Last,
        }])
        .err()
        .unwrap();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    let long = vec![1u32; c.max_position_embeddings + 1];
    let e = m
        .model
        .forward(&mut [model::SeqStep {
            tokens: &long,
            cache: &mut cache,
            logits: model::LogitsWanted::Last,
        }])
        .err()
        .unwrap();
    assert!(e.to_string().contains("positions"), "{e}");
}
