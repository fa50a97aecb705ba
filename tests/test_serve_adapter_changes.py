"""``lorakit serve``: adapter changes while requests run, and what the server says about adapters.

Unloading or hot-swapping an adapter while a long streaming request runs on it must hold back
no other request: the change is applied between two decoding steps, the running request finishes
on the version it started with, and the old version's memory is freed when it ends. Each forward
is slowed by a fixed sleep (as a larger model's compute would), so the long request lasts long
enough for the others to be measured against it; latencies are compared with its duration, not
with fixed numbers of seconds.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from model_zoo import tiny_llama  # noqa: E402
from serve_fixtures import ADAPTERS, Reference, build_folder, make_adapter, running  # noqa: E402

import lorakit  # noqa: E402
from lorakit.serve import build_engine, create_app  # noqa: E402
from lorakit.serve.wording import in_http_words  # noqa: E402

STEP_S = 0.02  # added to every forward
LONG = ("a1", "x", 120)  # adapter folder, prompt, tokens: greedy reaches 120 tokens without EOS


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve_changes")
    build_folder(root)
    engine = build_engine(str(root / "base"), root / "adapters", max_prompt_tokens=64, max_tokens_limit=120)
    forward = engine._forward

    def slow_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        time.sleep(STEP_S)
        return out

    engine._forward = slow_forward
    app = create_app(engine, max_batch_size=16, batch_window_ms=5)
    with running(app) as port:
        yield {"root": root, "engine": engine, "url": f"http://127.0.0.1:{port}", "ref": Reference(root)}


def http(served, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, served["url"] + path, timeout=60, **kwargs)


def complete(served, model: str, prompt: str, max_tokens: int) -> tuple[httpx.Response, float, float]:
    """(the answer, its latency, when it arrived)."""
    start = time.perf_counter()
    r = http(served, "POST", "/v1/completions",
             json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    end = time.perf_counter()
    return r, end - start, end


class LongStream(threading.Thread):
    """A streaming greedy completion read to its end in a thread; ``first`` is set at its first text."""

    def __init__(self, served, model: str, prompt: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url = served["url"] + "/v1/completions"
        self.body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                     "stream_options": {"include_usage": True}}
        self.first = threading.Event()
        self.pieces: list[str] = []
        self.finish = self.usage = self.error = None
        self.started = self.ended = 0.0

    def run(self) -> None:
        self.started = time.perf_counter()
        try:
            with httpx.stream("POST", self.url, json=self.body, timeout=60) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        self.error = chunk
                    for choice in chunk.get("choices", []):
                        self.pieces.append(choice["text"])
                        self.finish = choice["finish_reason"] or self.finish
                        if choice["text"]:
                            self.first.set()
                    self.usage = chunk.get("usage") or self.usage
        except Exception as exc:  # reported by the test
            self.error = exc
        finally:
            self.ended = time.perf_counter()
            self.first.set()

    def begin(self) -> LongStream:
        self.start()
        assert self.first.wait(60) and self.error is None, self.error
        return self

    def finished(self) -> LongStream:
        self.join(60)
        assert not self.is_alive() and self.error is None, self.error
        return self

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def versions(engine, name: str) -> list[str]:
    """The model's adapters that are versions of served name ``name`` (read while the batch thread may change them)."""
    return [n for n in list(engine.model.configs) if n.split("#")[0] == name]


def wait_for(condition, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def served_ids(served) -> list[str]:
    return [m["id"] for m in http(served, "GET", "/v1/models").json()["data"]]


# ---------------------------------------------------------------------------------------------
# unload and hot swap while a long request streams
# ---------------------------------------------------------------------------------------------
def test_unloading_an_adapter_mid_stream_holds_back_no_other_request(served):
    engine, ref = served["engine"], served["ref"]
    folder, prompt, tokens = LONG
    engine.load("gone", folder)
    long = LongStream(served, "gone", prompt, tokens).begin()

    start = time.perf_counter()
    deleted = http(served, "DELETE", "/v1/adapters/gone")
    delete_s, deleted_at = time.perf_counter() - start, time.perf_counter()
    refused, _, refused_at = complete(served, "gone", "hello", 3)
    base, base_s, base_at = complete(served, "base", "hello", 3)
    listed = served_ids(served)
    long.finished()

    assert deleted_at < long.ended and base_at < long.ended, "the DELETE or the base request waited for the long one"
    assert delete_s + base_s < long.seconds / 3, (delete_s, base_s, long.seconds)
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"id": "gone", "object": "adapter", "deleted": True, "running": 1}
    assert refused_at < long.ended and refused.status_code == 404
    assert refused.json()["error"]["code"] == "model_not_found"
    assert "being unloaded" in refused.json()["error"]["message"]
    assert "gone" not in listed
    assert base.status_code == 200 and base.json()["choices"][0]["text"] == ref.greedy("base", "hello", 3)
    # the long request finished, with every token, on the adapter it started with
    assert long.finish == "length" and long.usage["completion_tokens"] == tokens
    assert long.text == ref.greedy(folder, prompt, tokens)
    assert wait_for(lambda: not versions(engine, "gone")), engine.model.configs.keys()
    assert http(served, "DELETE", "/v1/adapters/gone").status_code == 404


def test_a_hot_swap_mid_stream_holds_back_no_other_request(served):
    engine, ref = served["engine"], served["ref"]
    folder, prompt, tokens = LONG
    engine.load("hot", folder)
    long = LongStream(served, "hot", prompt, tokens).begin()

    start = time.perf_counter()
    swapped = http(served, "POST", "/v1/adapters", json={"name": "hot", "path": "a5"})
    swap_s, swapped_at = time.perf_counter() - start, time.perf_counter()
    new, _, new_at = complete(served, "hot", "hello", 8)
    base, base_s, base_at = complete(served, "base", "hello", 3)
    long.finished()

    assert swapped_at < long.ended and base_at < long.ended, "the swap or the base request waited for the long one"
    assert swap_s + base_s < long.seconds / 3, (swap_s, base_s, long.seconds)
    assert swapped.status_code == 200 and swapped.json()["replaced"] is True, swapped.text
    assert new_at < long.ended and new.json()["choices"][0]["text"] == ref.greedy("a5", "hello", 8)
    assert base.json()["choices"][0]["text"] == ref.greedy("base", "hello", 3)
    # the running request finished on the version it started with, which is then freed
    assert long.usage["completion_tokens"] == tokens and long.text == ref.greedy(folder, prompt, tokens)
    assert wait_for(lambda: len(versions(engine, "hot")) == 1), versions(engine, "hot")
    # with nothing running on it, a swap copies in place and an unload frees at once
    assert http(served, "POST", "/v1/adapters", json={"name": "hot", "path": "a2"}).json()["replaced"] is True
    assert len(versions(engine, "hot")) == 1
    assert complete(served, "hot", "hello", 8)[0].json()["choices"][0]["text"] == ref.greedy("a2", "hello", 8)
    assert http(served, "DELETE", "/v1/adapters/hot").json()["running"] == 0
    assert versions(engine, "hot") == []
    assert served_ids(served) == ["base", *ADAPTERS]


def test_a_name_being_unloaded_can_be_loaded_again_at_once(served):
    engine, ref = served["engine"], served["ref"]
    folder, prompt, tokens = LONG
    engine.load("back", folder)
    long = LongStream(served, "back", prompt, tokens).begin()

    deleted = http(served, "DELETE", "/v1/adapters/back")
    again = http(served, "POST", "/v1/adapters", json={"name": "back", "path": "a3"})
    again_at = time.perf_counter()
    new, _, new_at = complete(served, "back", "hello", 8)
    long.finished()

    assert again_at < long.ended and new_at < long.ended, "the reload waited for the request on the old version"
    assert deleted.json()["running"] == 1
    assert again.status_code == 200 and again.json()["replaced"] is False, again.text
    assert new.json()["choices"][0]["text"] == ref.greedy("a3", "hello", 8)
    assert long.text == ref.greedy(folder, prompt, tokens)
    assert wait_for(lambda: len(versions(engine, "back")) == 1), versions(engine, "back")
    assert http(served, "DELETE", "/v1/adapters/back").status_code == 200
    assert versions(engine, "back") == []


# ---------------------------------------------------------------------------------------------
# what the server says about adapters
# ---------------------------------------------------------------------------------------------
def save_from(model, folder, name: str, k: int, extra=None) -> None:
    adapted = lorakit.AdaptedModel(model)
    make_adapter(adapted, name, k)
    lorakit.save_adapter(adapted, folder, name=name, extra_metadata=extra)


def test_an_adapter_trained_on_a_quantised_base_is_announced(served, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    root = served["root"]
    base = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    save_from(base, root / "adapters" / "qlora", "qlora", 2, {"quantize": "nf4"})
    with caplog.at_level(logging.WARNING, logger="lorakit.serve"):
        r = http(served, "POST", "/v1/adapters", json={"name": "qlora", "path": "qlora"})
    assert r.status_code == 200, r.text
    [note] = r.json()["warnings"]
    assert "'qlora'" in note and "quantised to nf4" in note and "differ" in note
    assert note in caplog.text
    plain = http(served, "POST", "/v1/adapters", json={"name": "plain", "path": "a0"})
    assert plain.json()["warnings"] == []
    for name in ("qlora", "plain"):
        assert http(served, "DELETE", f"/v1/adapters/{name}").status_code == 200

    shutil.copytree(root / "adapters" / "qlora", tmp_path / "qlora")  # at start-up, the log says it too
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lorakit.serve"):
        build_engine(str(root / "base"), tmp_path)
    assert "'qlora' was trained on a base quantised to nf4" in caplog.text


def test_load_errors_say_what_an_http_client_can_do(served):
    root = served["root"]
    other = tiny_llama(vocab=264, seed=1)  # the same architecture, other weights
    save_from(other, root / "adapters" / "elsewhere", "elsewhere", 1)
    r = http(served, "POST", "/v1/adapters", json={"name": "elsewhere", "path": "elsewhere"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_adapter"
    message = r.json()["error"]["message"]
    assert "trained on different base weights" in message
    assert "load it on a server started with the base model it was trained on" in message.lower()
    assert "check_fingerprint" not in message and "--" not in message

    resized = tiny_llama(vocab=300)  # a resized vocabulary: the likeliest reason for another base
    save_from(resized, root / "adapters" / "resized", "resized", 1)
    message = http(served, "POST", "/v1/adapters", json={"name": "x", "path": "resized"}).json()["error"]["message"]
    assert "300 tokens" in message and "server whose base model has that vocabulary" in message
    assert "check_fingerprint" not in message and "resize_token_embeddings" not in message
    assert "elsewhere" not in served_ids(served) and "x" not in served_ids(served)

    copy = in_http_words("a.json holds its own base weight for lm_head (...) and it differs from this model's. "
                         "lorakit does not replace base weights: copy it into lm_head.weight first, or pass "
                         "check_fingerprint=False to ignore it.")
    assert copy.endswith("load it on a server started with a base model whose lm_head.weight is that copy.")
    assert "check_fingerprint" not in in_http_words("unknown advice: pass check_fingerprint=False")


def test_refusals_name_what_the_client_can_send(served):
    too_long = http(served, "POST", "/v1/completions", json={"model": "base", "prompt": "y" * 80, "max_tokens": 2})
    assert too_long.status_code == 400 and "shorten the prompt" in too_long.json()["error"]["message"]
    too_many = http(served, "POST", "/v1/completions", json={"model": "base", "prompt": "y", "max_tokens": 121})
    assert "ask for at most 120" in too_many.json()["error"]["message"]
    context = http(served, "POST", "/v1/completions", json={"model": "base", "prompt": "y" * 60, "max_tokens": 100})
    assert "ask for at most 67 tokens" in context.json()["error"]["message"]
    outside = http(served, "POST", "/v1/adapters", json={"name": "out", "path": "../outside/spare"})
    assert outside.status_code == 403 and "relative to it" in outside.json()["error"]["message"]
    for r in (too_long, too_many, context, outside):
        assert "--" not in r.json()["error"]["message"], r.text
