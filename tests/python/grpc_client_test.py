#!/usr/bin/env python3
"""An independent gRPC client (grpcio, stubs generated from the repo's .proto at test time)
against a running neox-worker serving the built-in Shakespeare model.

Usage: grpc_client_test.py HOST:PORT METRICS_HOST:PORT GOLDEN_JSON
The server must run with --max-prompt-bytes 4096.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADDR, METRICS, GOLDEN = sys.argv[1], sys.argv[2], sys.argv[3]
del sys.argv[1:4]

OUT = tempfile.mkdtemp(prefix="neox-stubs-")
subprocess.run(
    [sys.executable, "-m", "grpc_tools.protoc", "-I", os.path.join(ROOT, "proto"), f"--python_out={OUT}",
     f"--grpc_python_out={OUT}", "neox/v1/generate.proto"],
    check=True,
)
sys.path.insert(0, OUT)
import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402
from neox.v1 import generate_pb2 as pb, generate_pb2_grpc as rpc  # noqa: E402

GOLD = json.load(open(GOLDEN))
CHANNEL = grpc.insecure_channel(ADDR)
STUB = rpc.TextGenerationStub(CHANNEL)


def metric(name, labels=""):
    text = urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{labels} not exported")


def greedy(prompt, n, **kw):
    return pb.GenerateRequest(prompt=prompt, parameters=pb.GenerationParameters(max_new_tokens=n, ignore_eos=True, **kw))


class Api(unittest.TestCase):
    def test_health_and_reflection(self):
        h = health_pb2_grpc.HealthStub(CHANNEL)
        for svc in ["", "neox.v1.TextGeneration"]:
            self.assertEqual(h.Check(health_pb2.HealthCheckRequest(service=svc)).status,
                             health_pb2.HealthCheckResponse.SERVING)
        r = reflection_pb2_grpc.ServerReflectionStub(CHANNEL)
        resp = next(r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        self.assertIn("neox.v1.TextGeneration", names)
        self.assertIn("grpc.health.v1.Health", names)

    def test_model_info_and_tokenize(self):
        info = STUB.ModelInfo(pb.ModelInfoRequest())
        self.assertEqual(info.vocab_size, 2048)
        self.assertEqual(info.num_layers, 4)
        self.assertGreaterEqual(info.tensor_parallel_size, 1)
        p = GOLD["prompts"][0]
        self.assertEqual(list(STUB.Tokenize(pb.TokenizeRequest(text=p["prompt"])).ids), p["input_ids"])

    def test_tokenize_bytes_join_to_the_text(self):
        text = "Hé said “no” — ½"
        r = STUB.Tokenize(pb.TokenizeRequest(text=text))
        self.assertEqual(len(r.token_bytes), len(r.ids))
        self.assertEqual(b"".join(r.token_bytes), text.encode())
        # Byte-level BPE splits these characters: such a token's text reads U+FFFD.
        self.assertTrue(any("\ufffd" in t for t in r.tokens), list(r.tokens))

    def test_gzip_compressed_calls_are_served(self):
        # grpcio compresses each request and tells the server it takes gzip back.
        p = GOLD["prompts"][0]
        n = len(p["output_ids"])
        with grpc.insecure_channel(ADDR, compression=grpc.Compression.Gzip) as channel:
            stub = rpc.TextGenerationStub(channel)
            r = stub.Generate(greedy(p["prompt"], n))
            self.assertEqual(list(r.token_ids), p["output_ids"])
            msgs = list(stub.GenerateStream(greedy(p["prompt"], n)))
            self.assertEqual([m.token.id for m in msgs if m.HasField("token")], p["output_ids"])
            # A request that compresses far below the size limit is still judged by its size.
            with self.assertRaises(grpc.RpcError) as cm:
                stub.Generate(pb.GenerateRequest(prompt="x" * (1 << 20)))
            self.assertIn(cm.exception.code(), (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT))

    def test_unary_greedy_equals_hf(self):
        for p in GOLD["prompts"]:
            r = STUB.Generate(greedy(p["prompt"], len(p["output_ids"])))
            self.assertEqual(list(r.token_ids), p["output_ids"])
            self.assertEqual(r.text, p["output_text"])
            self.assertEqual(r.finish_reason, pb.FINISH_REASON_LENGTH)
            self.assertEqual(r.usage.prompt_tokens, len(p["input_ids"]))
            self.assertEqual(r.usage.generated_tokens, len(p["output_ids"]))

    def test_a_cached_prefix_continues_as_hf_and_ids_are_echoed(self):
        p = GOLD["prompts"][2]
        ids, out = p["input_ids"], p["output_ids"]
        # The first run's KV stays in the prefix cache; the second prompt is that prompt plus
        # HF's first 20 greedy tokens, so HF's greedy continuation is its last 20.
        STUB.Generate(greedy(p["prompt"], len(out)))
        req = pb.GenerateRequest(prompt_ids=ids + out[:20], request_id="py-cache-1",
                                 parameters=pb.GenerationParameters(max_new_tokens=20, ignore_eos=True))
        r = STUB.Generate(req)
        self.assertEqual(list(r.token_ids), out[20:40])
        self.assertEqual(r.usage.cached_prompt_tokens, len(ids) + 20 - 1)
        self.assertEqual(r.request_id, "py-cache-1")
        r, call = STUB.Generate.with_call(greedy(p["prompt"], 1), metadata=(("x-request-id", "py-header"),))
        self.assertEqual(r.request_id, "py-header")
        self.assertIn(("x-request-id", "py-header"), call.initial_metadata())

    def test_stream_deltas_add_up_and_end_with_finish(self):
        p = GOLD["prompts"][1]
        msgs = list(STUB.GenerateStream(greedy(p["prompt"], 40)))
        tokens = [m for m in msgs if m.HasField("token")]
        self.assertEqual([m.token.id for m in tokens], p["output_ids"])
        self.assertEqual("".join(m.text_delta for m in msgs), p["output_text"])
        self.assertTrue(msgs[-1].HasField("finish_reason"))
        self.assertEqual(msgs[-1].finish_reason, pb.FINISH_REASON_LENGTH)
        self.assertEqual(msgs[-1].usage.generated_tokens, 40)

    def test_stop_sequence_is_matched_and_not_returned(self):
        p = GOLD["prompts"][0]
        r = STUB.Generate(greedy(p["prompt"], 40, stop_sequences=["\n\n"]))
        self.assertEqual(r.finish_reason, pb.FINISH_REASON_STOP_SEQUENCE)
        self.assertEqual(r.text, p["output_text"].split("\n\n")[0])
        msgs = list(STUB.GenerateStream(greedy(p["prompt"], 40, stop_sequences=["\n\n"])))
        self.assertEqual("".join(m.text_delta for m in msgs), r.text)

    def test_stop_token_and_logprobs(self):
        p = GOLD["prompts"][0]
        stop_id = p["output_ids"][3]
        r = STUB.Generate(greedy(p["prompt"], 40, stop_token_ids=[stop_id], logprobs=True, top_n_tokens=3,
                                 prompt_logprobs=True))
        self.assertEqual(r.finish_reason, pb.FINISH_REASON_STOP_TOKEN)
        self.assertEqual(list(r.token_ids), p["output_ids"][:4])
        for t in r.tokens:
            self.assertLessEqual(t.logprob, 0.0)
            self.assertEqual(len(t.top_tokens), 3)
            self.assertEqual(t.top_tokens[0].id, t.id)  # greedy picks the top token
        self.assertEqual([t.id for t in r.prompt_tokens], p["input_ids"])
        self.assertFalse(r.prompt_tokens[0].HasField("logprob"))
        self.assertTrue(all(t.HasField("logprob") for t in r.prompt_tokens[1:]))

    def test_token_bytes_join_to_the_text_where_characters_span_tokens(self):
        prompt = "Hé said “no” — ½"
        r = STUB.Generate(greedy(prompt, 8, logprobs=True, top_n_tokens=2, prompt_logprobs=True))
        self.assertEqual(b"".join(t.bytes for t in r.prompt_tokens), prompt.encode())
        # Byte-level BPE splits these characters: alone, such a token reads U+FFFD.
        split = [t for t in r.prompt_tokens if "\ufffd" in t.text]
        self.assertTrue(split, [t.text for t in r.prompt_tokens])
        for t in split:
            with self.assertRaises(UnicodeDecodeError):
                t.bytes.decode()
        self.assertEqual(b"".join(t.bytes for t in r.tokens).decode(), r.text)
        for t in r.tokens:
            for top in t.top_tokens:
                self.assertTrue(top.bytes)

    def test_seeded_sampling_is_reproducible(self):
        req = pb.GenerateRequest(prompt="KING LEAR:\n", parameters=pb.GenerationParameters(
            max_new_tokens=30, temperature=0.8, top_k=40, top_p=0.95, seed=1234, ignore_eos=True))
        a, b = STUB.Generate(req), STUB.Generate(req)
        self.assertEqual(list(a.token_ids), list(b.token_ids))
        req.parameters.seed = 99
        self.assertNotEqual(list(STUB.Generate(req).token_ids), list(a.token_ids))

    def test_invalid_requests_name_the_field(self):
        cases = [
            (pb.GenerateRequest(), "prompt"),
            (pb.GenerateRequest(prompt="x", prompt_ids=[1]), "prompt_ids"),
            (pb.GenerateRequest(prompt_ids=[5, 999999]), "prompt_ids[1]"),
            (pb.GenerateRequest(prompt="x", parameters=pb.GenerationParameters(top_p=1.5)), "top_p"),
            (pb.GenerateRequest(prompt="x", parameters=pb.GenerationParameters(top_p=0.0)), "top_p"),
            (pb.GenerateRequest(prompt="x", parameters=pb.GenerationParameters(temperature=-1)), "temperature"),
            (pb.GenerateRequest(prompt="x", parameters=pb.GenerationParameters(max_new_tokens=100000)), "max_new_tokens"),
            (pb.GenerateRequest(prompt="x " * 300, parameters=pb.GenerationParameters(max_new_tokens=400)), "max_new_tokens"),
            (pb.GenerateRequest(prompt="x", parameters=pb.GenerationParameters(stop_token_ids=[70000])), "stop_token_ids"),
            (pb.GenerateRequest(prompt="x", parameters=pb.GenerationParameters(top_n_tokens=50)), "top_n_tokens"),
            (pb.GenerateRequest(prompt="x", parameters=pb.GenerationParameters(repetition_penalty=0)), "repetition_penalty"),
            (pb.GenerateRequest(prompt="x", parameters=pb.GenerationParameters(repetition_penalty=1e-30)), "repetition_penalty"),
            (pb.GenerateRequest(prompt="x" * 5000), "prompt"),
            # Past the message limit (prompt limit + 64 KiB) too: still validation's answer.
            (pb.GenerateRequest(prompt="x" * 100_000), "prompt"),
            (pb.GenerateRequest(prompt="x", parameters=pb.GenerationParameters(temperature=0, top_k=40)), "temperature"),
        ]
        for req, field in cases:
            for call in (STUB.Generate, lambda r: list(STUB.GenerateStream(r))):
                with self.assertRaises(grpc.RpcError) as cm:
                    call(req)
                self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT, field)
                self.assertIn(field, cm.exception.details())

    def test_the_default_max_new_tokens_shrinks_to_the_room_left(self):
        info = STUB.ModelInfo(pb.ModelInfoRequest())
        room = 5
        ids = [int(i) for i in STUB.Tokenize(pb.TokenizeRequest(text="ROMEO:\n")).ids]
        prompt = (ids * info.max_total_tokens)[:info.max_total_tokens - room]
        r = STUB.Generate(pb.GenerateRequest(prompt_ids=prompt, parameters=pb.GenerationParameters(ignore_eos=True)))
        self.assertEqual(r.usage.generated_tokens, room)
        self.assertEqual(r.finish_reason, pb.FINISH_REASON_LENGTH)
        # A prompt that fills the context leaves no room at all: refused, naming the prompt.
        full = (ids * info.max_total_tokens)[:info.max_total_tokens]
        with self.assertRaises(grpc.RpcError) as cm:
            STUB.Generate(pb.GenerateRequest(prompt_ids=full))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("prompt", cm.exception.details())

    def test_oversized_message_is_refused(self):
        with self.assertRaises(grpc.RpcError) as cm:
            STUB.Generate(pb.GenerateRequest(prompt="x" * (1 << 20)))
        self.assertIn(cm.exception.code(), (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE,
                                            grpc.StatusCode.INVALID_ARGUMENT))

    def test_deadline_exceeded(self):
        before = metric("neox_requests_total", '{finish_reason="deadline_exceeded"}')
        with self.assertRaises(grpc.RpcError) as cm:
            STUB.Generate(greedy("ROMEO:\n", 400), timeout=0.05)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        # The server counts it as what it was, not as a client that went away.
        deadline = time.time() + 10
        while metric("neox_requests_total", '{finish_reason="deadline_exceeded"}') < before + 1:
            self.assertLess(time.time(), deadline, "the expired request was not counted as deadline_exceeded")
            time.sleep(0.05)

    def test_cancelled_stream_leaves_the_batch(self):
        before = metric("neox_requests_total", '{finish_reason="cancelled"}')
        call = STUB.GenerateStream(greedy("ROMEO:\n", 400))
        next(call)
        next(call)
        call.cancel()
        deadline = time.time() + 10
        while metric("neox_requests_total", '{finish_reason="cancelled"}') < before + 1:
            self.assertLess(time.time(), deadline, "cancelled stream never left the engine")
            time.sleep(0.05)
        while metric("neox_requests_running") > 0 or metric("neox_kv_cache_usage_ratio") > 0:
            self.assertLess(time.time(), deadline, "KV blocks not freed after cancellation")
            time.sleep(0.05)


if __name__ == "__main__":
    unittest.main(verbosity=2)
