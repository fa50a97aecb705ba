"""``lorakit serve``: a real uvicorn server on a loopback port, driven by the official openai client.

The base is a tiny random Llama saved with a byte-level HF tokenizer; eight adapters (LoRA of
several ranks and one DoRA) differ through random lora_B. Every served greedy text is compared
with an independent in-process ``generate`` of the same adapter on a separately loaded model.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_fixtures import ADAPTERS, KEY, PROMPTS, Reference, build_folder, running  # noqa: E402

import lorakit  # noqa: E402
from lorakit.serve import DEFAULT_CHAT_TEMPLATE, build_engine, create_app  # noqa: E402
from lorakit.serve.decoding import stop_scan  # noqa: E402
from lorakit.serve.engine import default_chat_text  # noqa: E402
from lorakit.serve.jobs import Delta, Finished, GenerationJob, SamplingParams  # noqa: E402


# ---------------------------------------------------------------------------------------------
# a running server and an independent reference model
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve")
    build_folder(root)
    engine = build_engine(str(root / "base"), root / "adapters", max_prompt_tokens=64, max_tokens_limit=32)
    app = create_app(engine, api_key=KEY, max_batch_size=16, batch_window_ms=20, max_body_bytes=20_000)
    with running(app) as port:
        base_url = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield {"root": root, "engine": engine, "url": base_url, "client": client, "ref": Reference(root)}


def http(served, method: str, path: str, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **kwargs.pop("headers", {})}
    return httpx.request(method, served["url"] + path, headers=headers, timeout=60, **kwargs)


# ---------------------------------------------------------------------------------------------
# the OpenAI API
# ---------------------------------------------------------------------------------------------
def test_models_lists_the_base_and_every_adapter(served):
    ids = [m.id for m in served["client"].models.list().data]
    assert ids == ["base", *ADAPTERS]
    assert served["client"].models.retrieve("a2").id == "a2"


def test_each_adapter_completes_like_a_direct_greedy_run(served):
    client, ref = served["client"], served["ref"]
    texts = {}
    for name in ["base", *ADAPTERS]:
        out = client.completions.create(model=name, prompt="The quick brown fox", max_tokens=10, temperature=0)
        assert out.choices[0].text == ref.greedy(name, "The quick brown fox", 10), name
        assert out.usage.prompt_tokens == len(ref.ids("The quick brown fox"))
        assert out.choices[0].finish_reason in ("length", "stop")
        texts[name] = out.choices[0].text
    assert len(set(texts.values())) >= 7, "adapters should differ from each other and from the base"
    ids = ref.ids("lorem ipsum")  # a prompt of token ids works too
    out = client.completions.create(model="a3", prompt=ids, max_tokens=6, temperature=0)
    assert out.choices[0].text == ref.greedy("a3", ids, 6)


def test_stream_concatenates_to_the_greedy_text(served):
    client, ref = served["client"], served["ref"]
    chunks = list(client.completions.create(model="a5", prompt="hello", max_tokens=12, temperature=0, stream=True))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == ref.greedy("a5", "hello", 12)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) >= 2, "text should arrive in pieces"

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    prompt_ids = served["engine"].render_chat(messages)
    assert prompt_ids == ref.ids("<|system|>\nbe brief\n<|user|>\nhi there\n<|assistant|>\n")  # default template
    assert default_chat_text(messages) == "<|system|>\nbe brief\n<|user|>\nhi there\n<|assistant|>\n"
    jinja2 = pytest.importorskip("jinja2")
    rendered = jinja2.Template(DEFAULT_CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    assert rendered == default_chat_text(messages)
    whole = client.chat.completions.create(model="a1", messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.content == ref.greedy("a1", prompt_ids, 10)
    stream = client.chat.completions.create(model="a1", messages=messages, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == whole.choices[0].message.content
    assert parts[-1].usage.completion_tokens == whole.usage.completion_tokens

    tokenizer = served["engine"].tokenizer  # a tokenizer's own chat template wins over the default
    tokenizer.chat_template = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                               "{% if add_generation_prompt %}[assistant] {% endif %}")
    try:
        assert served["engine"].render_chat(messages) == ref.ids("[system] be brief\n[user] hi there\n[assistant] ")[1:]
    finally:
        tokenizer.chat_template = None


def test_raw_stream_is_openai_sse_ending_in_done(served):
    body = {"model": "a0", "prompt": "hello", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", served["url"] + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["object"] == "text_completion" and first["choices"][0]["index"] == 0


def test_stop_strings_and_seeded_sampling(served):
    client, ref = served["client"], served["ref"]
    full = ref.greedy("a4", "0123456789", 20)
    k = next(i for i in range(2, len(full)) if full[i] != "\ufffd" and full[i] not in full[:i])
    out = client.completions.create(model="a4", prompt="0123456789", max_tokens=20, temperature=0, stop=[full[k], "@@"])
    assert out.choices[0].text == full[:k] and out.choices[0].finish_reason == "stop"

    def sample(seed):
        return client.completions.create(model="a6", prompt="hello", max_tokens=12, temperature=1.5, top_p=0.9,
                                         seed=seed).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1
    assert stop_scan("abc\ufffd", ("c!",)) == (None, 2)  # "c" may start the stop; U+FFFD may still change
    assert stop_scan("abc!de", ("c!",), final=True) == (2, 2)


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------
def test_api_key_is_required_everywhere(served):
    bad = openai.OpenAI(base_url=served["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                         ("DELETE", "/v1/adapters/a0")]:
        r = http(served, method, path, key=None)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert "a0" in [m.id for m in served["client"].models.list().data]


def test_bad_requests_get_openai_errors(served):
    client = served["client"]
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert info.value.status_code == 404 and info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="a0", prompt="hi", max_tokens=33)
    with pytest.raises(openai.BadRequestError, match="accepts at most 64: shorten the prompt"):
        client.completions.create(model="a0", prompt="y" * 80, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        client.completions.create(model="a0", prompt="hi", max_tokens=2, n=2)
    r = http(served, "POST", "/v1/completions", json={"model": "a0", "max_tokens": 2})
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    r = http(served, "POST", "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = http(served, "POST", "/v1/completions", json={"model": "a0", "prompt": "z" * 30_000})
    assert r.status_code == 413 and "limit of 20000 bytes: send a shorter body" in r.json()["error"]["message"]
    r = http(served, "POST", "/v1/classify", json={"model": "a0", "input": "hi"})
    assert r.status_code == 400 and "causal" in r.json()["error"]["message"]


def test_adapters_load_swap_refuse_and_delete(served):
    client, ref, root = served["client"], served["ref"], served["root"]

    def text(name):
        return client.completions.create(model=name, prompt="hello", max_tokens=8, temperature=0).choices[0].text

    def served_ids():
        return [m.id for m in client.models.list().data]

    # paths must stay under the adapter root
    for path in ["../outside/spare", str(root / "outside" / "spare"), "a0/../../outside/spare", "."]:
        r = http(served, "POST", "/v1/adapters", json={"name": "spare", "path": path})
        assert r.status_code == 403, (path, r.text)
    (root / "adapters" / "escape").symlink_to(root / "outside" / "spare")
    assert http(served, "POST", "/v1/adapters", json={"name": "spare", "path": "escape"}).status_code == 403
    assert http(served, "POST", "/v1/adapters", json={"name": "bad.name", "path": "a2"}).status_code == 400

    # load a new name, then hot-swap it
    r = http(served, "POST", "/v1/adapters", json={"name": "swap", "path": "a2"})
    assert r.status_code == 200 and r.json()["replaced"] is False
    assert text("swap") == ref.greedy("a2", "hello", 8)
    r = http(served, "POST", "/v1/adapters", json={"name": "swap", "path": str(root / "adapters" / "a5")})
    assert r.status_code == 200 and r.json()["replaced"] is True
    assert text("swap") == ref.greedy("a5", "hello", 8)

    # a corrupt folder changes nothing
    broken = root / "adapters" / "broken"
    broken.mkdir()
    shutil.copy(root / "adapters" / "a0" / "adapter_config.json", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    before = served_ids()
    for name in ("swap", "fresh"):
        r = http(served, "POST", "/v1/adapters", json={"name": name, "path": "broken"})
        assert r.status_code == 400 and "corrupt" in r.json()["error"]["message"], r.text
    assert served_ids() == before
    assert text("swap") == ref.greedy("a5", "hello", 8)

    # delete
    assert http(served, "DELETE", "/v1/adapters/swap").status_code == 200
    assert "swap" not in served_ids()
    with pytest.raises(openai.NotFoundError):
        text("swap")
    assert http(served, "DELETE", "/v1/adapters/swap").status_code == 404
    assert http(served, "DELETE", "/v1/adapters/base").status_code == 400
    assert served_ids() == ["base", *ADAPTERS]


def test_a_training_run_folder_loads_like_its_adapter_folder(served, tmp_path, caplog):
    client, ref, root = served["client"], served["ref"], served["root"]
    run = root / "adapters" / "run_a4"
    shutil.copytree(root / "adapters" / "a4", run / "adapter")
    (run / "summary.json").write_text("{}")
    r = http(served, "POST", "/v1/adapters", json={"name": "from_run", "path": "run_a4"})
    assert r.status_code == 200, r.text
    text = client.completions.create(model="from_run", prompt="hello", max_tokens=8, temperature=0).choices[0].text
    assert text == ref.greedy("a4", "hello", 8)
    assert http(served, "DELETE", "/v1/adapters/from_run").status_code == 200
    from lorakit.serve import build_engine

    shutil.move(run, tmp_path / "run_a4")
    (tmp_path / "notes").mkdir()
    with caplog.at_level("INFO", logger="lorakit.serve"):
        assert build_engine(str(root / "base"), tmp_path).adapter_names() == ["run_a4"]  # found at start-up too
    assert "skipping" in caplog.text and "notes" in caplog.text
    assert "adapter 'run_a4'" in caplog.text and "rank" in caplog.text


def test_a_swap_reads_the_file_while_batches_run_and_rereads_a_file_written_meanwhile(served, monkeypatch):
    """A running batch holds the engine lock: the file read and its NaN/Inf check go on meanwhile
    (batches then wait only for the copy). A file rewritten while the swap waits for the lock is
    read again, so what is served is the file as it is when the copy starts."""
    from lorakit.serve import engine as engine_module

    engine, root, ref = served["engine"], served["root"], served["ref"]
    folder = root / "adapters" / "moving"
    shutil.copytree(root / "adapters" / "a2", folder)
    read, done = engine_module.read_adapter, threading.Event()

    def reading(directory):
        adapter = read(directory)
        done.set()
        return adapter

    monkeypatch.setattr(engine_module, "read_adapter", reading)
    engine.load("moving", "moving")
    done.clear()
    result: dict = {}
    with engine.lock:  # as a running batch holds it
        swap = threading.Thread(target=lambda: result.update(engine.load("moving", "moving")))
        swap.start()
        assert done.wait(30), "the file was not read while a batch held the lock"
        assert not result
        time.sleep(0.02)  # past a coarse timestamp's tick
        for name in ("adapter_config.json", "adapter_model.safetensors"):  # a5: the same structure, in place
            (folder / name).write_bytes((root / "adapters" / "a5" / name).read_bytes())
    swap.join(60)
    assert result["replaced"] is True
    text = served["client"].completions.create(model="moving", prompt="hello", max_tokens=8, temperature=0)
    assert text.choices[0].text == ref.greedy("a5", "hello", 8)
    engine.unload("moving")


def test_a_corrupt_adapter_folder_stops_the_server_from_starting(tmp_path, served):
    root = tmp_path / "adapters"
    shutil.copytree(served["root"] / "adapters" / "a0", root / "a0")
    (root / "a0" / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(lorakit.ConfigError, match="a0"):
        build_engine(str(served["root"] / "base"), root)


# ---------------------------------------------------------------------------------------------
# load: concurrent clients over 8 adapters are batched and every answer is right
# ---------------------------------------------------------------------------------------------
def test_concurrent_clients_are_batched_and_correct(served):
    ref, clients, rounds = served["ref"], 32, 2
    plan = [[(ADAPTERS[(c + r) % 8], PROMPTS[(c * 3 + r) % len(PROMPTS)], 6 + (c + 5 * r) % 11)
             for r in range(rounds)] for c in range(clients)]
    expected = {job: ref.greedy(*job) for jobs in plan for job in jobs}
    before = http(served, "GET", "/metrics").json()

    async def client(jobs, http_client):
        results = []
        for name, prompt, max_tokens in jobs:
            start = time.perf_counter()
            r = await http_client.post("/v1/completions", json={"model": name, "prompt": prompt,
                                                                "max_tokens": max_tokens, "temperature": 0})
            results.append(((name, prompt, max_tokens), r.status_code, r.json(), time.perf_counter() - start))
        return results

    async def main():
        async with httpx.AsyncClient(base_url=served["url"], headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=60, limits=httpx.Limits(max_connections=64)) as http_client:
            return await asyncio.wait_for(asyncio.gather(*(client(jobs, http_client) for jobs in plan)), 60)

    start = time.perf_counter()
    results = [item for group in asyncio.run(main()) for item in group]
    wall = time.perf_counter() - start
    after = http(served, "GET", "/metrics").json()

    assert len(results) == clients * rounds
    for job, status, body, _ in results:
        assert status == 200, body
        assert body["choices"][0]["text"] == expected[job], job
    latencies = sorted(seconds for *_, seconds in results)
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    forwards = after["forward_calls"] - before["forward_calls"]
    rows = (after["forward_rows"] - before["forward_rows"]) / forwards
    print(f"\nserve load: {len(results)} requests from {clients} clients over 8 adapters in {wall:.2f} s "
          f"({len(results) / wall:.1f} req/s); latency p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms; "
          f"{forwards} forwards, {rows:.1f} rows/forward (max {after['max_rows_per_forward']}), "
          f"{after['joined_running_batch'] - before['joined_running_batch']} joined a running batch")
    assert rows > 1.5, "the batcher should put concurrent requests into shared forwards"
    assert after["max_rows_per_forward"] > 1


def test_requests_joining_a_running_batch_match_single_runs(served):
    """Continuous batching: jobs admitted between decoding steps (longer and shorter prompts than
    the running rows, caches padded and merged) give exactly the single-request greedy text."""
    engine, ref = served["engine"], served["ref"]
    plan = [("a0", PROMPTS[3], 12), ("a3", PROMPTS[1], 4), ("base", PROMPTS[2], 9), ("a7", PROMPTS[0], 7),
            ("a5", PROMPTS[6], 10), ("a2", PROMPTS[4], 3), ("a1", PROMPTS[5], 8)]
    events = {i: [] for i in range(len(plan))}
    jobs = [GenerationJob(name, ref.ids(prompt), SamplingParams(max_tokens=n, temperature=0), events[i].append)
            for i, (name, prompt, n) in enumerate(plan)]
    arrivals = [[], [jobs[2]], [], [jobs[3], jobs[4]], [jobs[5]], [], [jobs[6]]]

    def take(busy):
        return arrivals.pop(0) if arrivals else []

    joined = engine.metrics.joined
    engine.run_batch(jobs[:2], take)
    assert engine.metrics.joined - joined == 5
    for i, (name, prompt, n) in enumerate(plan):
        assert isinstance(events[i][-1], Finished), events[i]
        assert "".join(e.text for e in events[i] if isinstance(e, Delta)) == ref.greedy(name, prompt, n), plan[i]


def test_a_cancelled_request_leaves_the_batch(served):
    """A client that goes away (stream closed) stops costing decoding steps; the others finish."""
    engine, ref = served["engine"], served["ref"]
    seen, other = [], []

    def emit(event):
        seen.append(event)
        job.cancel()  # as the HTTP layer does when the client disconnects

    job = GenerationJob("a1", ref.ids("hello"), SamplingParams(max_tokens=30, temperature=0), emit)
    keeps = GenerationJob("a2", ref.ids("hello"), SamplingParams(max_tokens=12, temperature=0), other.append)
    calls = engine.metrics.forward_calls
    engine.run_batch([job, keeps])
    assert not any(isinstance(e, Finished) for e in seen) and len(seen) <= 2
    assert "".join(e.text for e in other if isinstance(e, Delta)) == ref.greedy("a2", "hello", 12)
    assert engine.metrics.forward_calls - calls <= 12


# ---------------------------------------------------------------------------------------------
# classification adapters
# ---------------------------------------------------------------------------------------------
def test_classifier_adapters_serve_labels_and_probabilities(tmp_path):
    from lorakit.train.models import ByteTokenizer, load_model

    torch.set_num_threads(1)
    model = load_model("random:bert", "classify", num_labels=3, seed=0).eval()
    adapted = lorakit.AdaptedModel(model)
    for k, name in enumerate(["sentiment", "topic"]):
        adapted.add_adapter(name, lorakit.AdapterConfig(r=4, target_modules=("query", "value"),
                                                        modules_to_save=("classifier",)), activate=False)
        g = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for module in adapted.adapter_modules(name).values():
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g))
            for p in adapted.saved_modules()["classifier"].copies[name].parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        extra = {"label_names": ["neg", "neutral", "pos"]} if name == "sentiment" else None
        lorakit.save_adapter(adapted, tmp_path / name, name=name, extra_metadata=extra)

    engine = build_engine("random:bert", tmp_path)
    assert engine.task == "classify"
    texts = ["good film", "a b c d e f", "terrible"]
    tokenizer = ByteTokenizer(512)
    with running(create_app(engine)) as port:
        url = f"http://127.0.0.1:{port}"
        for name in ("sentiment", "topic"):
            r = httpx.post(url + "/v1/classify", json={"model": name, "input": texts}, timeout=60)
            assert r.status_code == 200, r.text
            data = r.json()["data"]
            for i, text in enumerate(texts):
                ids = torch.tensor([tokenizer.encode(text)])
                with torch.no_grad():
                    probs = torch.softmax(adapted(input_ids=ids, adapter_names=[name]).logits[0], -1)
                names = ["neg", "neutral", "pos"] if name == "sentiment" else ["0", "1", "2"]
                assert data[i]["label"] == names[int(probs.argmax())]
                got = torch.tensor([data[i]["probabilities"][n] for n in names])
                torch.testing.assert_close(got, probs, atol=1e-5, rtol=1e-4)
        r = httpx.post(url + "/v1/classify", json={"model": "sentiment", "input": "one text"}, timeout=60)
        assert r.status_code == 200 and len(r.json()["data"]) == 1
        r = httpx.post(url + "/v1/completions", json={"model": "sentiment", "prompt": "hi"}, timeout=60)
        assert r.status_code == 400 and "classif" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/classify", json={"model": "base", "input": "hi"}, timeout=60)
        assert r.status_code == 400


def test_cli_has_a_serve_command():
    from lorakit.cli import COMMANDS, build_parser

    assert "serve" in COMMANDS
    args = build_parser().parse_args(["serve", "--model", "random:llama", "--adapters", "x", "--api-key", "k",
                                      "--max-batch-size", "8", "--batch-window-ms", "5"])
    assert (args.api_key, args.max_batch_size, args.batch_window_ms, args.port) == ("k", 8, 5.0, 8000)
