"""kvcascade serve: the real server (uvicorn, in a subprocess, on a free loopback port) driven by the real
``openai`` client, on a tiny random model."""

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant {% endif %}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _post(url, data: bytes, ctype="application/json"):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("chat-model")
    shutil.copytree(tiny_model_dir, model_dir, dirs_exist_ok=True)
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    port = _free_port()
    log = tmp_path_factory.mktemp("log") / "serve.log"
    cmd = [sys.executable, "-m", "kvcascade.cli", "serve", "--model", str(model_dir), "--port", str(port),
           "--policy", "streaming", "--budget", "24", "--policy-arg", "sinks=2", "--chunk-size", "8",
           "--max-prompt-tokens", "400", "--max-new-tokens", "64", "--kv-limit-mib", "64", "--quiet"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            _get(base + "/health")
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text())
            time.sleep(0.3)
    else:
        proc.kill()
        raise RuntimeError("server did not start: " + log.read_text())
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
    yield {"base": base, "client": client, "model": str(model_dir), "log": log, "proc": proc}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


PROMPT = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12"


def test_models_and_health(server):
    models = server["client"].models.list()
    assert [m.id for m in models.data] == [server["model"]]
    h = _get(server["base"] + "/health")
    assert h["status"] == "ok" and h["active"] == 0 and h["kv_limit_bytes"] == 64 * 2**20


def test_completion_and_usage_and_kv_report(server):
    c = server["client"]
    r = c.completions.create(model=server["model"], prompt=PROMPT, max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("length", "stop")
    from transformers import AutoTokenizer

    n_prompt = len(AutoTokenizer.from_pretrained(server["model"])(PROMPT).input_ids)
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens <= 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    info = r.model_extra["kvcascade"]
    assert info["policy"] == "streaming" and info["budget"] == 24 and 0 < info["kv_bytes_peak"] <= info["kv_bytes_reserved"]
    again = c.completions.create(model=server["model"], prompt=PROMPT, max_tokens=10, temperature=0)
    assert again.choices[0].text == r.choices[0].text  # greedy: the same answer


def test_streaming_equals_non_streaming_with_usage_chunk(server):
    c = server["client"]
    whole = c.completions.create(model=server["model"], prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(c.completions.create(model=server["model"], prompt=PROMPT, max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason


def test_chat_streaming_and_not(server):
    c = server["client"]
    msgs = [{"role": "system", "content": "w5 w6"}, {"role": "user", "content": "w1 w2 w3"}]
    r = c.chat.completions.create(model=server["model"], messages=msgs, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model=server["model"], messages=msgs, max_tokens=8, temperature=0,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_stop_strings(server):
    c = server["client"]
    whole = c.completions.create(model=server["model"], prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    stop = whole[6:9]
    r = c.completions.create(model=server["model"], prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == whole[:whole.find(stop)] and r.choices[0].finish_reason == "stop"


def test_per_request_policy_and_seeded_sampling(server):
    c = server["client"]
    r = c.completions.create(model=server["model"], prompt=PROMPT * 3, max_tokens=4, temperature=0,
                             extra_body={"kvcascade": {"policy": "window", "budget": 12}})
    info = r.model_extra["kvcascade"]
    assert info["policy"] == "window" and info["budget"] == 12
    full = c.completions.create(model=server["model"], prompt=PROMPT * 3, max_tokens=4, temperature=0,
                                extra_body={"kvcascade": {"policy": "full"}})
    assert full.model_extra["kvcascade"]["kv_bytes_peak"] > info["kv_bytes_peak"]
    a = c.completions.create(model=server["model"], prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7)
    b = c.completions.create(model=server["model"], prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7)
    assert a.choices[0].text == b.choices[0].text


def _in_threads(fn, n: int):
    """Start ``fn(i)`` for i < n, each in its own thread; returns ``join() -> (results, errors)``."""
    results, errors = [None] * n, []

    def run(i):
        try:
            results[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - reported by the test's assertion
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()

    def join():
        for t in threads:
            t.join(timeout=120)
        return results, errors

    return join


def test_sixteen_concurrent_streams_are_correct_and_independent(server):
    c = server["client"]
    prompts = [" ".join(f"w{(i * 7 + j) % 60}" for j in range(5 + i)) for i in range(16)]
    expected = [c.completions.create(model=server["model"], prompt=p, max_tokens=10, temperature=0).choices[0].text
                for p in prompts]
    def run(i):
        stream = c.completions.create(model=server["model"], prompt=prompts[i], max_tokens=10, temperature=0,
                                      stream=True)
        return "".join(ch.choices[0].text for ch in stream if ch.choices)

    got, errors = _in_threads(run, 16)()
    assert not errors and got == expected


def test_concurrent_long_prompts_are_decoded_together(server):
    c = server["client"]
    prompts = [" ".join(f"w{(i * 11 + j) % 60}" for j in range(40 + 3 * i)) for i in range(8)]  # past the budget
    expected = [c.completions.create(model=server["model"], prompt=p, max_tokens=12, temperature=0).choices[0].text
                for p in prompts]
    def run(i):
        r = c.completions.create(model=server["model"], prompt=prompts[i], max_tokens=12, temperature=0)
        return r.choices[0].text, r.model_extra["kvcascade"]["decode_batch"]

    results, errors = _in_threads(run, 8)()
    assert not errors and [text for text, _ in results] == expected
    batch = [b for _, b in results]
    assert max(batch) >= 2, batch  # alike requests shared forwards


def test_a_disconnect_inside_a_batch_leaves_the_other_rows_right(server):
    import http.client

    c = server["client"]
    prompts = [" ".join(f"w{(i * 13 + j) % 60}" for j in range(45 + 2 * i)) for i in range(4)]
    expected = [c.completions.create(model=server["model"], prompt=p, max_tokens=24, temperature=0).choices[0].text
                for p in prompts[1:]]
    host, port = server["base"].replace("http://", "").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)  # row 0: streams, then hangs up mid-way
    conn.request("POST", "/v1/completions", body=json.dumps({"model": server["model"], "prompt": prompts[0],
                                                             "max_tokens": 60, "temperature": 0, "stream": True}),
                 headers={"Content-Type": "application/json"})
    join = _in_threads(lambda i: c.completions.create(model=server["model"], prompt=prompts[i + 1], max_tokens=24,
                                                      temperature=0).choices[0].text, 3)
    resp = conn.getresponse()
    for _ in range(6):  # a few events in: the rows are decoding together by now
        resp.fp.readline()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    got, errors = join()
    assert not errors and got == expected
    deadline = time.time() + 20
    while time.time() < deadline and _get(server["base"] + "/health")["active"]:
        time.sleep(0.2)
    assert _get(server["base"] + "/health")["kv_reserved_bytes"] == 0


def test_a_disconnect_mid_stream_frees_the_cache(server):
    import http.client

    host, port = server["base"].replace("http://", "").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"model": server["model"], "prompt": PROMPT, "max_tokens": 64, "temperature": 0,
                       "stream": True})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    head = resp.fp.readline() + resp.fp.readline()  # chunked encoding: size line, then the first event
    assert b"data: " in head
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.time() + 20
    while time.time() < deadline:
        h = _get(server["base"] + "/health")
        if h["active"] == 0 and h["kv_reserved_bytes"] == 0:
            break
        time.sleep(0.2)
    assert h["active"] == 0 and h["kv_reserved_bytes"] == 0
    assert "cancelled" in server["log"].read_text()


@pytest.mark.parametrize("payload,status,needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe\x00junk", 400, "not valid UTF-8"),
    (json.dumps({"prompt": 5}).encode(), 400, "'prompt' must be a string"),
    (json.dumps({"prompt": "w1", "max_tokens": "ten"}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "w1", "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"prompt": " ".join(["w1"] * 500)}).encode(), 400, "above this server's limit"),
    (json.dumps({"prompt": "w1", "kvcascade": {"policy": "nope"}}).encode(), 400, "unknown policy"),
    (json.dumps({"prompt": "w1", "kvcascade": {"policy": "streaming", "budget": 2}}).encode(), 400, "sinks"),
    (json.dumps({"prompt": "w1", "logprobs": 3}).encode(), 400, "'logprobs' is not supported"),
    (json.dumps({"prompt": "w1", "n": 2}).encode(), 400, "n=1"),
    (json.dumps({"prompt": "w1", "model": "gpt-9"}).encode(), 404, "not served here"),
    (json.dumps({"prompt": "w1", "max_tokens": 1000}).encode(), 400, "above this server's limit 64"),
    (json.dumps({"prompt": "w1", "max_tokens": 64, "kvcascade": {"policy": "full"}}).encode(), 200, ""),
])
def test_bad_input_gets_a_4xx_and_the_server_keeps_serving(server, payload, status, needle):
    code, body = _post(server["base"] + "/v1/completions", payload)
    assert code == status, body
    if status >= 400:
        assert set(body["error"]) >= {"message", "type"} and needle in body["error"]["message"], body
    ok = server["client"].completions.create(model=server["model"], prompt="w1 w2", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_admission_by_kv_bytes(tiny_model_dir):
    """Requests start while their reserved KV bytes fit under the limit, wait otherwise (in order), are refused
    (503 path) after the queue timeout, and one larger than the whole limit is refused at once."""
    import kvcascade
    from kvcascade import make_policy
    from kvcascade.errors import KVCascadeError
    from kvcascade.serve.scheduler import Job, Scheduler, kv_bound_bytes

    model, tok = kvcascade.load_model(str(tiny_model_dir), progress=False)
    policy = make_policy("full")
    ids = tok("w1 w2 w3 w4 w5 w6").input_ids
    bound = kv_bound_bytes(model, policy, len(ids), 6, 4)
    sched = Scheduler(model, tok, kv_limit_bytes=bound + bound // 2, queue_timeout_s=0.5)  # room for one at a time
    events = []
    done = threading.Event()

    def job(name, max_new=6):
        def emit(kind, payload):
            events.append((name, kind))
            if name == "c" and kind in ("done", "rejected"):
                done.set()
        return Job(ids=ids, policy=policy, max_new_tokens=max_new, temperature=0.0, top_p=1.0, seed=None, stop=[],
                   chunk_size=4, kv_bound=bound, emit=emit, id=name)

    try:
        with pytest.raises(KVCascadeError, match="more than the server's limit"):
            sched.submit(Job(ids=ids, policy=policy, max_new_tokens=6, temperature=0.0, top_p=1.0, seed=None,
                             stop=[], chunk_size=4, kv_bound=10 * bound, emit=lambda *a: None))
        a, b = job("a"), job("b")
        sched.submit(a)
        sched.submit(b)
        deadline = time.time() + 30
        while time.time() < deadline and not any(e == ("b", "done") for e in events):
            time.sleep(0.01)
        finished = [n for n, k in events if k == "done"]
        assert finished == ["a", "b"]
        assert max(sched.stats()["kv_reserved_bytes"], 0) == 0
        first_b = next(i for i, (n, k) in enumerate(events) if n == "b")
        last_a = max(i for i, (n, k) in enumerate(events) if n == "a")
        assert first_b > last_a  # b waited for a's memory: none of its pieces came before a finished
        # a long request holds the memory; the next one waits past the queue timeout and is refused
        sched.submit(job("long", max_new=10_000))
        sched.submit(job("c"))
        assert done.wait(30) and ("c", "rejected") in events
        sched.pending.clear()
        for j in list(sched.active):
            j.cancel()
    finally:
        sched.shutdown()


def test_serve_cli_bad_flags(capsys):
    from kvcascade.cli import main

    for argv, msg in ((["serve", "--policy", "nope"], "unknown policy"),
                      (["serve", "--kv-limit-mib", "0"], "--kv-limit-mib"),
                      (["serve", "--port", "-1"], "--port")):
        assert main(argv + ["--model", "/nonexistent-model"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("kvcascade: error:") and msg in err[0], err
