//! The paged KV cache (the layout for accelerators, `GptNeoX::use_paged_kv`) against HF's
//! goldens, run on the CPU: prefill (per-sequence gathers with a causal mask), single and
//! batched decode (one gather for all sequences, padding masked), chunked prefill across block
//! boundaries, the pool's block accounting, and forked caches (prefix caching) in both
//! layouts.

mod common;

use candle_core::DType;
use common::*;
use neox_worker::engine::{generate_batch, OfflineOptions};
use neox_worker::model::{LogitsWanted, SeqStep};
use neox_worker::shard::LocalRunner;

const TOL: f32 = 1e-4;

/// The fixture with a pool of `blocks` blocks of `block_size` tokens (odd sizes on purpose, so
/// sequences straddle blocks).
fn paged(blocks: usize, block_size: usize) -> neox_worker::model::GptNeoX {
    let mut m = load_model(&fixture_dir().display().to_string(), DType::F32).model;
    m.use_paged_kv(blocks, block_size).unwrap();
    m
}

/// The fixture with per-sequence caches, or paged ones in blocks of 3.
fn in_layout(layout: &str) -> neox_worker::model::GptNeoX {
    match layout {
        "paged" => paged(64, 3),
        _ => load_model(&fixture_dir().display().to_string(), DType::F32).model,
    }
}

#[test]
fn paged_prefill_logits_match_hf() {
    let g = Goldens::load();
    let m = paged(64, 5);
    for i in g.cases() {
        let ids = g.ids(&format!("case{i}.input_ids"));
        let d = max_abs_diff(&all_logits(&m, &ids), &g.f32_2d(&format!("case{i}.logits")));
        assert!(d <= TOL, "case{i}: paged prefill logits differ from HF by {d}");
    }
}

#[test]
fn paged_greedy_and_chunked_prefill_match_hf() {
    let g = Goldens::load();
    assert_greedy_matches_hf(&g, &mut LocalRunner::new(paged(64, 3)), "paged greedy differs from HF");
    // Chunks of 4 tokens over blocks of 3: every chunk writes across a block boundary.
    let m = paged(64, 3);
    let case = g.cases()[0];
    let ids = g.ids(&format!("case{case}.input_ids"));
    let want = g.f32_2d(&format!("case{case}.logits"));
    let got = chunked_logits(&m, &ids, 4);
    let d = max_abs_diff(&got, &want);
    assert!(d <= TOL, "paged chunked prefill differs from HF by {d}");
}

#[test]
fn paged_batched_decode_matches_hf() {
    let g = Goldens::load();
    // Our batches are ragged: a padded row is just its unmasked tokens.
    let (prompts, want) = golden_batch(&g);
    let opts = OfflineOptions::greedy(want[0].len());
    // Ragged prompts: every decode step gathers histories of different lengths (padding masked).
    let (out, _) = generate_batch(&mut LocalRunner::new(paged(64, 4)), &prompts, &opts).unwrap();
    for (row, w) in want.iter().enumerate() {
        assert_eq!(&out[row].ids, w, "batch row {row} differs from HF");
    }
}

#[test]
fn pool_blocks_are_taken_as_needed_returned_on_drop_and_never_overcommitted() {
    let m = paged(4, 4);
    let pool = m.kv_pool().unwrap().clone();
    assert_eq!(pool.free_blocks(), 4);
    {
        let mut cache = m.new_cache(0);
        let ids: Vec<u32> = (1..=9).collect();
        m.forward(&mut [SeqStep {
            tokens: &ids,
            cache: &mut cache,
            logits: LogitsWanted::Last,
        }])
        .unwrap();
        assert_eq!(pool.free_blocks(), 1, "9 tokens take 3 blocks of 4");
        assert_eq!(cache.bytes(), 3 * pool.bytes() / 4);
        // 8 more tokens need 2 more blocks; only 1 is free: a clear error, nothing taken.
        let more: Vec<u32> = (1..=8).collect();
        let err = m
            .forward(&mut [SeqStep {
                tokens: &more,
                cache: &mut cache,
                logits: LogitsWanted::Last,
            }])
            .err()
            .unwrap();
        assert!(err.to_string().contains("KV pool exhausted"), "{err}");
        assert_eq!(pool.free_blocks(), 1);
    }
    assert_eq!(pool.free_blocks(), 4, "a dropped cache gives its blocks back");
}

#[test]
fn a_forked_cache_continues_like_the_original_in_both_layouts() {
    let g = Goldens::load();
    let (ids, want) = g.longest_case();
    assert!(ids.len() >= 6, "the fixture's longest prompt is too short to split");
    // Blocks of 3: a copied prefix that ends inside a block (its last block is copied), and
    // one that ends on a block boundary (every block is shared).
    let inside = ids.len() / 2 + usize::from((ids.len() / 2).is_multiple_of(3));
    let boundary = ids.len() / 2 / 3 * 3;
    assert!(boundary >= 3 && boundary < ids.len());
    for (layout, split) in [("per-sequence", inside), ("paged", inside), ("paged", boundary)] {
        let m = in_layout(layout);
        let pool_free = || m.kv_pool().map(|p| p.free_blocks());
        let free = pool_free();
        let mut original = m.new_cache(1);
        let mut got = feed(&m, &mut original, &ids[..split]);
        let before = pool_free();
        let mut copy = original.fork(split, ids.len()).unwrap();
        assert_eq!(copy.len(), split);
        // Paged: the full blocks are shared, only the partial last one is copied.
        let copied = usize::from(!split.is_multiple_of(3));
        assert_eq!(
            before.zip(pool_free()).map(|(b, a)| b - a),
            free.map(|_| copied),
            "{layout} {split}"
        );
        // The original goes on with other tokens: the copy must not see them.
        feed(&m, &mut original, &[7, 7, 7, 7]);
        // A shorter copy of the original (whose later tokens changed) is still its prefix.
        let mut short = original.fork(2, 0).unwrap();
        let err = original.fork(split + 5, 0).err().unwrap();
        assert!(err.to_string().contains("cannot fork"), "{err}");
        // The copies outlive the original: shared blocks stay while anyone holds them.
        drop(original);
        got.extend(feed(&m, &mut copy, &ids[split..]));
        let d = max_abs_diff(&got, &want);
        assert!(d <= TOL, "{layout}: a forked cache's logits differ from HF by {d}");
        let d = max_abs_diff(&feed(&m, &mut short, &ids[2..]), &want[2..]);
        assert!(d <= TOL, "{layout}: a 2-token fork differs from HF by {d}");
        drop((copy, short));
        assert_eq!(
            m.kv_pool().map(|p| p.free_blocks()),
            free,
            "{layout}: forks give their blocks back"
        );
    }
}

#[test]
fn a_rewound_cache_forgets_rejected_tokens_in_both_layouts() {
    // Speculative decoding feeds drafts and keeps a prefix of them: the cache rewinds to it
    // and the next tokens overwrite the rejected ones' keys.
    let g = Goldens::load();
    let (ids, want) = g.longest_case();
    let split = ids.len() / 2;
    for layout in ["per-sequence", "paged"] {
        let m = in_layout(layout);
        let mut cache = m.new_cache(ids.len());
        let mut got = feed(&m, &mut cache, &ids[..split]);
        // Drafts that cross a block boundary, then are rejected, keeping none of them.
        feed(&m, &mut cache, &[7, 7, 7, 7]);
        cache.rewind(split).unwrap();
        assert_eq!(cache.len(), split);
        let err = cache.rewind(split + 1).err().unwrap();
        assert!(err.to_string().contains("cannot rewind"), "{err}");
        got.extend(feed(&m, &mut cache, &ids[split..]));
        let d = max_abs_diff(&got, &want);
        assert!(d <= TOL, "{layout}: a rewound cache's logits differ from HF by {d}");
    }
}

#[test]
fn a_step_plan_rewinds_to_its_start_and_refuses_to_start_past_the_cache() {
    use neox_worker::shard::{SeqPlan, StepRunner};
    let g = Goldens::load();
    let (ids, want) = g.longest_case();
    let split = ids.len() / 2;
    for layout in ["per-sequence", "paged"] {
        let m = in_layout(layout);
        let mut runner = LocalRunner::new(m);
        let plan = |start: usize, tokens: &[u32]| SeqPlan {
            id: 1,
            start,
            tokens: tokens.to_vec(),
            logits: LogitsWanted::All,
            reserve: ids.len() + 4,
        };
        runner.step(&[plan(0, &ids[..split])]).unwrap();
        // The tokens after the split plus two drafts; then the drafts are dropped by starting
        // the next step where they began.
        let mut ahead = ids[split..].to_vec();
        ahead.extend([7, 7]);
        runner.step(&[plan(split, &ahead)]).unwrap();
        assert_eq!(runner.cached_len(1), ids.len() + 2);
        let err = runner.step(&[plan(ids.len() + 3, &[1])]).err().unwrap();
        assert!(err.to_string().contains("starts at"), "{layout}: {err}");
        let err = runner.step(&[SeqPlan { id: 2, ..plan(1, &[1]) }]).err().unwrap();
        assert!(err.to_string().contains("no KV cache"), "{layout}: {err}");
        // Rewound to before the drafts, the last real token's logits come out as HF's.
        let last = *ids.last().unwrap();
        let out = runner.step(&[plan(ids.len() - 1, &[last])]).unwrap();
        let row = out[0].as_ref().unwrap().to_vec2::<f32>().unwrap();
        let d = max_abs_diff(&row, &want[ids.len() - 1..]);
        assert!(d <= TOL, "{layout}: the rewound step's logits differ from HF by {d}");
        assert_eq!(runner.cached_len(1), ids.len());
    }
}
