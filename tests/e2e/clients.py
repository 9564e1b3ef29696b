"""Clients of the end-to-end tests: greedy completions as token ids, plain and streamed."""
import http.client
import json
import re
import time

TOKEN_ID = re.compile(rb'"token_id:(\d+)"')
FINISH = re.compile(rb'"finish_reason":"(\w+)"')
INDEX = re.compile(rb'"index":(\d+)')


def completion_ids(server, prompt_ids, max_tokens, **extra):
    body = {"model": server.model_id, "prompt": prompt_ids, "max_tokens": max_tokens,
            "temperature": 0, "logprobs": 0, "return_tokens_as_token_ids": True,
            "ignore_eos": True, **extra}
    status, _, raw = server.request("POST", "/v1/completions", body)
    assert status == 200, raw
    tokens = json.loads(raw)["choices"][0]["logprobs"]["tokens"]
    return [int(t.split(":", 1)[1]) for t in tokens]


def stream(server, prompt, max_tokens, results, key, n=1):
    """Streams one completion (n choices); records choice 0's tokens and finish reason, or the
    error, and when it ended. Choices beyond the first only make the server work longer."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps({"model": server.model_id, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True, "logprobs": 0,
                       "return_tokens_as_token_ids": True, "n": n})
    r = {"tokens": [], "finish": None, "error": None, "status": None, "end": None}
    results[key] = r  # filled while the stream runs
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        r["status"] = resp.status
        if resp.status != 200:
            r["error"] = resp.read().decode()
        else:
            # Cheap parsing (no JSON per event), so the client keeps up with the server and
            # "tokens seen" means "tokens generated" for the tests' timing.
            for line in resp:
                if not line.startswith(b"data: {"):
                    continue
                if b'"error"' in line:
                    r["error"] = json.loads(line[6:])["error"]
                    continue
                if INDEX.search(line).group(1) != b"0":
                    continue
                r["tokens"] += [int(t) for t in TOKEN_ID.findall(line)]
                finish = FINISH.search(line)
                if finish:
                    r["finish"] = finish.group(1).decode()
    except Exception as e:  # noqa: BLE001 - recorded for the assertion
        r["error"] = repr(e)
    r["end"] = time.time()
