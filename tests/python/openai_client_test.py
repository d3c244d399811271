#!/usr/bin/env python3
"""OpenAI's own Python SDK (an independent client) against a running neox-worker serving the
built-in Shakespeare model on its OpenAI-compatible HTTP API.

Usage: openai_client_test.py HTTP_HOST:PORT GOLDEN_JSON HAMLET_IDS_JSON
The server must run with --max-prompt-bytes 4096.
"""
import json
import math
import sys
import unittest

import openai

ADDR, GOLDEN, HAMLET = sys.argv[1], sys.argv[2], sys.argv[3]
del sys.argv[1:4]

with open(GOLDEN) as f:
    GOLD = json.load(f)
CLIENT = openai.OpenAI(base_url=f"http://{ADDR}/v1", api_key="unused", max_retries=0, timeout=60)
MODEL = "builtin:shakespeare"


def first_token_text(p):
    """The text of the golden continuation's first token (as the server decodes it)."""
    import urllib.request
    req = urllib.request.Request(f"http://{ADDR}/detokenize", data=json.dumps({"tokens": p["output_ids"][:1]}).encode(),
                                 headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))["prompt"]


def greedy(prompt, **kw):
    return CLIENT.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True}, **kw)


class Completions(unittest.TestCase):
    def test_the_model_is_listed(self):
        ids = [m.id for m in CLIENT.models.list()]
        self.assertEqual(ids, [MODEL])

    def test_the_model_is_retrieved_by_name_and_others_are_not_found(self):
        self.assertEqual(CLIENT.models.retrieve(MODEL).id, MODEL)
        with self.assertRaises(openai.NotFoundError) as e:
            CLIENT.models.retrieve("gpt-4")
        self.assertEqual(e.exception.body["code"], "model_not_found")

    def test_logit_bias_from_the_sdk_bans_the_golden_first_token(self):
        # The SDK sends int keys as JSON strings; -100 bans the token HF's greedy picks first.
        p = GOLD["prompts"][0]
        first = p["output_ids"][0]
        c = greedy(p["prompt"], logit_bias={first: -100})
        text = c.choices[0].text
        self.assertNotEqual(text, p["output_text"])
        self.assertFalse(text.startswith(first_token_text(p)), text)

    def test_greedy_text_equals_hf_goldens(self):
        for p in GOLD["prompts"]:
            c = greedy(p["prompt"])
            self.assertEqual(c.choices[0].text, p["output_text"])
            self.assertEqual(c.choices[0].finish_reason, "length")
            self.assertEqual(c.usage.prompt_tokens, len(p["input_ids"]))
            self.assertEqual(c.usage.completion_tokens, 40)
            self.assertEqual(greedy(p["input_ids"]).choices[0].text, p["output_text"])

    def test_a_stream_adds_up_to_the_golden_text(self):
        p = GOLD["prompts"][1]
        chunks = list(greedy(p["prompt"], stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        self.assertEqual(text, p["output_text"])
        self.assertEqual([c.choices[0].finish_reason for c in chunks if c.choices][-1], "length")
        self.assertEqual(chunks[-1].usage.completion_tokens, 40)

    def test_continuous_usage_stats_count_up_to_the_final_usage(self):
        # vLLM's extension: every chunk carries the usage so far.
        p = GOLD["prompts"][1]
        chunks = list(greedy(p["prompt"], stream=True,
                             stream_options={"include_usage": True, "continuous_usage_stats": True}))
        content = [c for c in chunks if c.choices]
        counts = [c.usage.completion_tokens for c in content]
        self.assertEqual(counts, sorted(counts))
        self.assertEqual(counts[-1], 40)
        self.assertTrue(all(c.usage.prompt_tokens == len(p["input_ids"]) for c in content))
        self.assertTrue(all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
                            for c in content))
        self.assertEqual(chunks[-1].choices, [])
        self.assertEqual(chunks[-1].usage.completion_tokens, 40)
        self.assertEqual(chunks[-1].usage.prompt_tokens, len(p["input_ids"]))
        # Without include_usage it asks for nothing, as in vLLM.
        chunks = list(greedy(p["prompt"], stream=True, stream_options={"continuous_usage_stats": True}))
        self.assertTrue(all(c.usage is None for c in chunks))

    def test_batched_prompts_come_back_in_order(self):
        prompts = [p["prompt"] for p in GOLD["prompts"]]
        c = greedy(prompts)
        self.assertEqual([ch.index for ch in c.choices], list(range(len(prompts))))
        self.assertEqual([ch.text for ch in c.choices], [p["output_text"] for p in GOLD["prompts"]])

    def test_hamlet_perplexity_from_scored_prompts_equals_hf(self):
        # How evaluation harnesses score text: echo the prompt, generate nothing, read the
        # prompt's log-probabilities. Every 256-token window in one request, as token ids.
        ev = GOLD["hamlet_eval"]
        with open(HAMLET) as f:
            ids = json.load(f)
        w = ev["window"]
        windows = [ids[i:i + w] for i in range(0, ev["num_tokens"], w)]
        c = CLIENT.completions.create(model=MODEL, prompt=windows, max_tokens=0, echo=True, logprobs=0)
        self.assertEqual(len(c.choices), ev["windows"])
        lps = []
        for ch in sorted(c.choices, key=lambda ch: ch.index):
            self.assertIsNone(ch.logprobs.token_logprobs[0])
            self.assertEqual(len(ch.logprobs.token_logprobs), w)
            lps += ch.logprobs.token_logprobs[1:]
        self.assertEqual(len(lps), ev["predicted_tokens"])
        ppl = math.exp(-sum(lps) / len(lps))
        self.assertAlmostEqual(ppl, ev["perplexity"], delta=0.01)
        self.assertEqual(c.usage.completion_tokens, 0)

    def test_logprobs_describe_the_greedy_choice(self):
        c = greedy(GOLD["prompts"][0]["prompt"], logprobs=3)
        lp = c.choices[0].logprobs
        self.assertEqual("".join(lp.tokens), c.choices[0].text)
        for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            self.assertLessEqual(chosen, 0.0)
            self.assertEqual(len(top), 3)
            self.assertAlmostEqual(max(top.values()), chosen, places=5)  # greedy takes the top
            self.assertAlmostEqual(top[tok], chosen, places=5)

    def test_tokens_inside_a_character_are_spelled_as_bytes(self):
        prompt = "Hé said “no” — ½"
        c = CLIENT.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                      logprobs=2)
        lp = c.choices[0].logprobs

        def raw(token):  # OpenAI's spelling: text, or bytes:\xNN... for part of a character
            if token.startswith("bytes:"):
                return bytes(int(h, 16) for h in token[len("bytes:"):].split("\\x")[1:])
            return token.encode()

        self.assertEqual(b"".join(raw(t) for t in lp.tokens).decode(), c.choices[0].text)
        self.assertTrue(c.choices[0].text.startswith(prompt))
        self.assertTrue(any(t.startswith("bytes:\\x") for t in lp.tokens), lp.tokens)
        for tops in lp.top_logprobs[1:]:
            self.assertFalse(any("\ufffd" in t for t in tops), tops)

    def test_seeded_samples_repeat_and_differ_per_choice(self):
        kw = dict(model=MODEL, prompt="JULIET:\n", max_tokens=20, n=3, seed=5, temperature=1.0)
        a = CLIENT.completions.create(**kw)
        b = CLIENT.completions.create(**kw)
        self.assertEqual([c.text for c in a.choices], [c.text for c in b.choices])
        self.assertGreater(len({c.text for c in a.choices}), 1)

    def test_stop_sequences(self):
        p = GOLD["prompts"][0]
        c = greedy(p["prompt"], stop="\n\n")
        self.assertEqual(c.choices[0].text, p["output_text"].split("\n\n")[0])
        self.assertEqual(c.choices[0].finish_reason, "stop")


class Errors(unittest.TestCase):
    def bad(self, param, **kw):
        args = dict(model=MODEL, prompt="ROMEO:", max_tokens=4)
        args.update(kw)
        with self.assertRaises(openai.BadRequestError) as e:
            CLIENT.completions.create(**args)
        self.assertEqual(e.exception.status_code, 400)
        self.assertEqual(e.exception.body["param"], param)
        self.assertIn(param, e.exception.body["message"])

    def test_bad_parameters_are_named(self):
        self.bad("temperature", temperature=-0.5)
        self.bad("max_tokens", max_tokens=10_000)
        self.bad("logprobs", logprobs=6)
        self.bad("top_p", top_p=1.5)
        self.bad("frequency_penalty", frequency_penalty=3.0)
        self.bad("suffix", suffix="THE END")
        self.bad("bogus", extra_body={"bogus": 1})

    def test_an_unknown_model_is_not_found(self):
        with self.assertRaises(openai.NotFoundError) as e:
            CLIENT.completions.create(model="gpt-3.5-turbo-instruct", prompt="x", max_tokens=1)
        self.assertEqual(e.exception.body["code"], "model_not_found")

    def test_there_is_no_chat_endpoint(self):
        with self.assertRaises(openai.NotFoundError):
            CLIENT.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


if __name__ == "__main__":
    unittest.main(verbosity=2)
