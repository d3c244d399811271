#!/usr/bin/env python3
"""HF transformers side of the decode benchmark: same checkpoint, same threads, same shapes.

Prints one JSON object. Decoding uses a manual greedy loop over the KV cache (the fastest
way to drive transformers, without generate()'s per-step overhead).
"""
import argparse, json, statistics, time

import torch
from transformers import GPTNeoXForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = GPTNeoXForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(0)
    out = {"threads": a.threads, "torch": torch.__version__}
    with torch.inference_mode():
        for b in [int(x) for x in a.batches.split(",")]:
            ids = torch.randint(2, model.config.vocab_size, (b, a.prompt_len), generator=gen)
            prefill, decode = [], []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                o = model(ids, use_cache=True)
                prefill.append(time.perf_counter() - t0)
                pkv, nxt = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
                t0 = time.perf_counter()
                for _ in range(a.decode_tokens):
                    o = model(nxt, past_key_values=pkv, use_cache=True)
                    pkv, nxt = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
                decode.append((time.perf_counter() - t0) / a.decode_tokens)
            p, d = statistics.median(prefill), statistics.median(decode)
            out[f"batch{b}"] = {"prefill_ms": p * 1e3, "decode_ms_per_step": d * 1e3, "decode_tokens_per_s": b / d}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
