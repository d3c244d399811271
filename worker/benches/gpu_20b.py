#!/usr/bin/env python3
"""GPT-NeoX-20B-shaped benchmark on one GPU, NeoX Serve beside HF transformers, same checkpoint.

Run on the GPU machine (torch + transformers there; no Rust needed):
    python3 worker/benches/gpu_20b.py --worker target/cuda/release/neox-worker --dir /tmp/neox20b
Check the script itself anywhere (tiny model, CPU, fp32):
    python3 worker/benches/gpu_20b.py --smoke --worker target/release/neox-worker --dir /tmp/neox-tiny \
        --batch 1,4 --prefill-len 64 --steps 8

1. Writes a 20B-shaped GPT-NeoX (44 layers, hidden 6144, 64 heads, intermediate 24576, vocab
   50432, rotary 25%, parallel residual) with random fp16 weights as a sharded HF checkpoint
   (skipped if DIR already holds one).
2. Measures the device-to-device copy bandwidth (bytes read + written per second), which
   gives the batch-1 decode floor: every decode step reads all weights once.
3. HF transformers: load time, prefill tokens/s for a 512-token prompt, decode ms/step at
   batch 1, 8, 32 (greedy, KV cache), peak memory.
4. `neox-worker bench` on the same checkpoint, the same figures.
Prints both side by side with the ratios the GPU issue asks for, and keeps each result under
--out (default $OUT) as soon as it exists. `--write-only` writes the checkpoint and stops (so
gpu-run.sh can write it while the GPU tests run).
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch


SHAPES = {
    # GPT-NeoX-20B.
    "20b": dict(hidden_size=6144, num_hidden_layers=44, num_attention_heads=64, intermediate_size=24576,
                vocab_size=50432),
    # For checking this script end to end on a CPU (--smoke).
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                 vocab_size=512),
}


def shape_config(shape, layers=None):
    from transformers import GPTNeoXConfig

    dims = dict(SHAPES[shape])
    if layers:
        dims["num_hidden_layers"] = layers
    return GPTNeoXConfig(
        **dims,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        max_position_embeddings=2048,
        use_parallel_residual=True,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def write_checkpoint(path, tokenizer, shape, dev, dtype, layers=None):
    from transformers import GPTNeoXForCausalLM

    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        print(f"checkpoint: reusing {path}", flush=True)
        return
    os.makedirs(path, exist_ok=True)
    t = time.time()
    torch.manual_seed(0)
    # Built directly in its dtype on the device: an fp32 20B model (82 GB) would not fit an
    # 80 GB H100.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = GPTNeoXForCausalLM(shape_config(shape, layers))
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(path, max_shard_size="5GB")
    del model
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    with open(tokenizer, "rb") as src, open(os.path.join(path, "tokenizer.json"), "wb") as dst:
        dst.write(src.read())
    print(f"checkpoint: wrote {path} in {time.time() - t:.0f} s", flush=True)


def copy_bandwidth(dev):
    """GB/s of a same-device copy (bytes read + written), best of 10."""
    n = (1 << 30) if dev == "cuda" else (1 << 26)
    a = torch.empty(n, dtype=torch.float16, device=dev)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(10):
        sync(dev)
        t = time.perf_counter()
        b.copy_(a)
        sync(dev)
        best = min(best, time.perf_counter() - t)
    del a, b
    if dev == "cuda":
        torch.cuda.empty_cache()
    return 2 * n * 2 / best / 1e9


def hf_figures(path, batches, prefill_len, context_len, steps, dev, dtype):
    from transformers import GPTNeoXForCausalLM

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    import transformers

    # transformers >= 4.56 calls it `dtype`; older versions take `torch_dtype` (and would pass
    # an unknown `dtype` on to the config silently, loading 82 GB of fp32).
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    try:
        import accelerate  # noqa: F401  (device_map loads straight onto the device)

        model = GPTNeoXForCausalLM.from_pretrained(path, device_map=dev, **{key: dtype})
    except ImportError:
        print("HF: no accelerate here; its load time includes a host-to-device copy", flush=True)
        model = GPTNeoXForCausalLM.from_pretrained(path, **{key: dtype}).to(dev)
    model.eval()
    sync(dev)
    load = time.time() - t
    vocab = model.config.vocab_size
    out = {"load_seconds": load}
    with torch.inference_mode():
        ids = (torch.arange(prefill_len, device=dev) * 7919 + 13) % vocab
        model(ids[: max(prefill_len // 10, 1)].unsqueeze(0))
        sync(dev)
        t = time.perf_counter()
        model(ids.unsqueeze(0)).logits[:, -1].argmax(-1).tolist()
        secs = time.perf_counter() - t
        out["prefill"] = {"tokens": prefill_len, "seconds": secs, "tokens_per_second": prefill_len / secs}
        out["decode"] = []
        for b in batches:
            ctx = (torch.arange(b * context_len, device=dev).reshape(b, context_len) * 104729 + 13) % vocab
            r = model(ctx, use_cache=True)
            past, nxt = r.past_key_values, r.logits[:, -1].argmax(-1, keepdim=True)
            times = []
            for s in range(steps + 2):
                sync(dev)
                t = time.perf_counter()
                r = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = r.past_key_values, r.logits[:, -1].argmax(-1, keepdim=True)
                nxt.tolist()
                if s >= 2:
                    times.append(time.perf_counter() - t)
            times.sort()
            med = times[len(times) // 2]
            out["decode"].append({"batch": b, "ms_per_step": med * 1e3, "tokens_per_second": b / med})
            del past, r
            if dev == "cuda":
                torch.cuda.empty_cache()
    # What the caching allocator held at its peak (allocated or cached), as the worker's figure
    # is device memory in use: both leave out this process' CUDA context.
    out["peak_memory_bytes"] = torch.cuda.max_memory_reserved() if dev == "cuda" else 0
    del model
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


def device_used(dev):
    """Bytes of device memory in use now (every process), or 0 on the CPU."""
    if dev != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info()
    return total - free


def save(out_dir, name, value):
    """Keeps a result as soon as it exists: a later step that fails or runs out of time must
    not take it along."""
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(value, f, indent=1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--worker", help="neox-worker binary (the CUDA build for a GPU run)")
    p.add_argument("--dir", default="/tmp/neox20b")
    p.add_argument("--tokenizer", default="worker/assets/shakespeare-neox/tokenizer.json")
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--context-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--compare", default="cublas",
                   help="run the same binary again with: cublas (its matmuls all on cuBLAS, NEOX_GEMV_MAX_ROWS=0), "
                        "unfused (candle's one kernel per op, NEOX_UNFUSED=1); comma-separated, or none")
    p.add_argument("--write-only", action="store_true", help="write the checkpoint and stop")
    p.add_argument("--layers", type=int, help="fewer layers than the shape has (per-layer profiling)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for the JSON results")
    p.add_argument("--worker-timeout", type=int, default=420)
    p.add_argument("--smoke", action="store_true",
                   help="a tiny model in fp32 on the CPU: checks this script without a GPU")
    a = p.parse_args()
    batches = [int(b) for b in a.batch.split(",")]
    if a.smoke:
        dev, dtype, shape, ours_dtype = "cpu", torch.float32, "tiny", "fp32"
        print(f"smoke run on the CPU, torch {torch.__version__}", flush=True)
    else:
        dev, dtype, shape, ours_dtype = "cuda", torch.float16, "20b", "fp16"
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
        print(subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip(), flush=True)
    write_checkpoint(a.dir, a.tokenizer, shape, dev, dtype, a.layers)
    if a.write_only:
        return
    if not a.worker:
        sys.exit("--worker is required unless --write-only")
    weights = sum(os.path.getsize(os.path.join(a.dir, f)) for f in os.listdir(a.dir) if f.endswith(".safetensors"))
    bw = copy_bandwidth(dev)
    # A batch-1 step reads every weight once; the floor is the weights at the measured copy
    # bandwidth (bytes read + written per second, as the GPU issue defines it).
    floor_ms = weights / bw / 1e6
    print(f"weights {weights / 1e9:.2f} GB; copy {bw:.0f} GB/s; batch-1 floor {floor_ms:.2f} ms", flush=True)
    save(a.out, "bandwidth.json", {"weights_bytes": weights, "copy_gbps": bw, "floor_ms": floor_ms})

    failures = []
    baseline = device_used(dev)
    cmd = [a.worker, "bench", "--model", a.dir, "--device", dev, "--dtype", ours_dtype, "--batch", a.batch,
           "--prefill-len", str(a.prefill_len), "--context-len", str(a.context_len), "--steps", str(a.steps), "--json"]
    def run_worker(name, env_extra):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.worker_timeout,
                               env={**os.environ, "NEOX_LOG": "info", **env_extra})
        except subprocess.TimeoutExpired:
            failures.append(f"neox-worker bench ({name}) ran past {a.worker_timeout} s")
            print(failures[-1], flush=True)
            return None
        if r.returncode != 0:
            print(r.stderr[-4000:], file=sys.stderr)
            failures.append(f"neox-worker bench ({name}) exited {r.returncode}")
            print(failures[-1], flush=True)
            return None
        if a.out:
            # Its log: where the load time went (weights staged, host copies, waits).
            with open(os.path.join(a.out, f"{name}.log"), "w") as f:
                f.write(r.stderr)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        # The worker reports device memory in use; this process' context was there before.
        res["peak_memory_bytes"] = max(res["peak_memory_bytes"] - baseline, 0)
        save(a.out, f"{name}.json", res)
        print(f"neox-worker ({name}): done", flush=True)
        return res

    ours = run_worker("neox", {})
    # The same binary without a part of its CUDA path: what that part buys.
    variants = {
        "cublas": ("cuBLAS for every matmul", {"NEOX_GEMV_MAX_ROWS": "0"}),
        "unfused": ("candle's one kernel per op", {"NEOX_UNFUSED": "1"}),
    }
    compared = {}
    for name in [] if dev != "cuda" or a.compare == "none" else a.compare.split(","):
        if name not in variants:
            sys.exit(f"--compare: unknown variant {name!r} (one of {', '.join(variants)})")
        res = run_worker(f"neox-{name}", variants[name][1])
        if res:
            compared[name] = res

    hf = None
    if not a.skip_hf:
        try:
            hf = hf_figures(a.dir, batches, a.prefill_len, a.context_len, a.steps, dev, dtype)
            save(a.out, "hf.json", hf)
        except Exception as e:  # noqa: BLE001  (report it and keep the worker's figures)
            failures.append(f"HF transformers: {type(e).__name__}: {e}")
            print(failures[-1], file=sys.stderr, flush=True)

    if ours:
        report(a, ours, hf, floor_ms)
    for name, other in compared.items() if ours else []:
        what, env = variants[name]
        print(f"\nneox-serve vs the same binary with {what} ({' '.join(f'{k}={v}' for k, v in env.items())}):")
        for f, u in zip(ours["decode"], other["decode"]):
            print(f"  decode batch {f['batch']:<3} {f['ms_per_step']:7.2f} vs {u['ms_per_step']:7.2f} ms/step "
                  f"({u['ms_per_step'] / f['ms_per_step']:.2f}x); +4 drafts {f['ms_per_step_verifying_4_drafts']:7.2f} "
                  f"vs {u['ms_per_step_verifying_4_drafts']:7.2f} ms")
        print(f"  prefill {a.prefill_len} tokens/s {ours['prefill']['tokens_per_second']:.0f} "
              f"vs {other['prefill']['tokens_per_second']:.0f}")
    print(json.dumps({"neox": ours, **{f"neox_{n}": r for n, r in compared.items()}, "hf": hf, "copy_gbps": bw,
                      "floor_ms": floor_ms}))
    if failures:
        sys.exit("; ".join(failures))


def report(a, ours, hf, floor_ms):
    def row(name, mine, theirs, better_low):
        ratio = ""
        if theirs:
            ratio = f"{(theirs / mine) if better_low else (mine / theirs):.2f}x"
        print(f"{name:<28} {mine:>12.2f} {theirs if theirs is not None else float('nan'):>12.2f} {ratio:>8}")

    print(f"\n{'figure':<28} {'neox-serve':>12} {'HF':>12} {'speedup':>8}")
    row("load s", ours["load_seconds"], hf and hf["load_seconds"], True)
    row(f"prefill {a.prefill_len} tokens/s", ours["prefill"]["tokens_per_second"],
        hf and hf["prefill"]["tokens_per_second"], False)
    pc = ours.get("prefix_cached")
    if pc:
        row(f"  same, {pc['cached_tokens']} cached: ms", pc["seconds"] * 1e3, None, True)
    for i, d in enumerate(ours["decode"]):
        h = hf and hf["decode"][i]["ms_per_step"]
        row(f"decode batch {d['batch']} ms/step", d["ms_per_step"], h, True)
        if "ms_per_step_verifying_4_drafts" in d:
            row("  same, +4 drafts each: ms", d["ms_per_step_verifying_4_drafts"], None, True)
    row("peak memory GiB", ours["peak_memory_bytes"] / 2**30, hf and hf["peak_memory_bytes"] / 2**30, True)
    print("\nsampling one step, ms (greedy / top-k+top-p+penalty on the GPU / the same on the host / "
          "the same where the server's automatic choice puts it):")
    for d in ours["decode"]:
        s = d.get("sampling", {})
        print(f"  batch {d['batch']:<4} {s.get('greedy_device_ms', float('nan')):8.3f} "
              f"{s.get('filtered_device_ms', float('nan')):8.3f} {s.get('filtered_host_ms', float('nan')):8.3f} "
              f"{s.get('filtered_auto_ms', float('nan')):8.3f}")
    b1 = ours["decode"][0]
    print(f"\nbatch-1 decode {b1['ms_per_step']:.2f} ms = {b1['ms_per_step'] / floor_ms:.2f}x the bandwidth floor "
          f"(target <= 1.1x)")
    if len(ours["decode"]) > 1:
        last = ours["decode"][-1]
        print(f"batch {last['batch']} = {last['tokens_per_second'] / b1['tokens_per_second']:.1f}x batch 1 in tokens/s "
              f"(target >= 20x)")
    if hf:
        print(f"batch-1 decode vs HF: {hf['decode'][0]['ms_per_step'] / b1['ms_per_step']:.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()
