//! The `neox-worker` offline commands, run as a user would, against HF goldens.

mod common;

use common::*;

#[test]
fn generate_json_matches_hf_greedy() {
    let g = Goldens::load();
    for i in g.cases() {
        let ids = g.ids(&format!("case{i}.input_ids"));
        let want = g.ids(&format!("case{i}.greedy"));
        let (v, got) = cli_greedy(&[], &ids, want.len());
        assert_eq!(got, want, "case{i}");
        assert_eq!(v["prompt_ids"].as_array().unwrap().len(), ids.len());
        assert!(v["timings"]["prefill_ms"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn logits_json_matches_hf_last_position() {
    let g = Goldens::load();
    let i = g.cases()[1.min(g.cases().len() - 1)];
    let ids = g.ids(&format!("case{i}.input_ids"));
    let v = run_json(&[
        "logits",
        "--model",
        fixture_dir().to_str().unwrap(),
        "--prompt-ids",
        &csv(&ids),
        "--json",
    ]);
    let got: Vec<f32> = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let want = g.f32_2d(&format!("case{i}.logits")).pop().unwrap();
    assert!(max_abs_diff(&[got], &[want]) <= 1e-4);
}

#[test]
fn default_model_writes_the_golden_romeo_text() {
    let out = worker()
        .args([
            "generate",
            "--prompt",
            "ROMEO:\n",
            "--max-new-tokens",
            "12",
            "--ignore-eos",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("ROMEO:\nI'll not a man, I'll be a man."), "{text}");
}

#[test]
fn perplexity_command_reports_hf_value() {
    let dir = shakespeare_dir();
    let v = run_json(&[
        "perplexity",
        "--model",
        dir.to_str().unwrap(),
        "--ids-file",
        dir.join("hamlet_eval_ids.json").to_str().unwrap(),
        "--window",
        "256",
        "--json",
    ]);
    assert!((v["perplexity"].as_f64().unwrap() - 65.65825).abs() < 0.01, "{v}");
}

#[test]
fn bad_arguments_fail_cleanly() {
    for args in [
        vec!["generate", "--model", "/nonexistent/dir", "--prompt", "x"],
        vec!["generate", "--model", "builtin:nope", "--prompt", "x"],
        vec!["generate", "--prompt", "x", "--top-p", "1.5"],
        vec!["generate", "--prompt", "x", "--dtype", "int3"],
        vec!["generate", "--prompt", "x", "--max-new-tokens", "100000"],
        vec!["logits", "--prompt-ids", "999999"],
        vec!["generate", "--prompt", "x", "--device", "tpu"],
        vec!["generate", "--prompt", "x", "--tp", "2", "--collectives", "nccl"],
        vec!["generate", "--prompt", "x", "--collectives", "mpi"],
        vec!["bench", "--batch", "0"],
        vec!["serve", "--kv-layout", "bogus"],
        vec!["serve", "--default-max-new-tokens", "0"],
        vec!["serve", "--max-batch-size", "32", "--max-tokens-per-step", "16"],
        vec!["bench", "--prefill-len", "100000"],
    ] {
        let out = worker().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.contains("error"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

#[test]
fn bench_reports_every_figure_for_each_batch_size() {
    for layout in ["per-sequence", "paged"] {
        bench_reports_every_figure(layout);
    }
}

fn bench_reports_every_figure(layout: &str) {
    let v = run_json(&[
        "bench",
        "--prefill-len",
        "24",
        "--batch",
        "1,3",
        "--steps",
        "4",
        "--kv-layout",
        layout,
        "--json",
    ]);
    assert_eq!(v["kv_layout"], layout);
    assert_eq!(v["prefill"]["tokens"], 24);
    assert!(v["prefill"]["tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(v["load_seconds"].as_f64().unwrap() > 0.0);
    assert!(v["peak_memory_bytes"].as_u64().unwrap() > 0);
    let decode = v["decode"].as_array().unwrap();
    assert_eq!(
        decode.iter().map(|d| d["batch"].as_u64().unwrap()).collect::<Vec<_>>(),
        [1, 3]
    );
    for d in decode {
        let (ms, tps) = (
            d["ms_per_step"].as_f64().unwrap(),
            d["tokens_per_second"].as_f64().unwrap(),
        );
        let b = d["batch"].as_f64().unwrap();
        assert!(ms > 0.0 && (tps - b * 1e3 / ms).abs() < 1e-6 * tps, "{d}");
        for k in ["greedy_device_ms", "filtered_device_ms", "filtered_host_ms"] {
            assert!(d["sampling"][k].as_f64().is_some_and(|x| x > 0.0), "{k} in {d}");
        }
    }
}
