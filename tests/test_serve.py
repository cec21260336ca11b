"""``omni serve`` over real HTTP: a server process on a free loopback port, a tiny model saved by the test, driven
with httpx and the ``openai`` client; every answer and image is checked against the Python API for the same seed."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import omnicore

httpx = pytest.importorskip("httpx", reason="the serve extra (pip install -e '.[serve]')")
pytest.importorskip("fastapi", reason="the serve extra (pip install -e '.[serve]')")

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BATCH = 16
MAX_QUEUE = 32


def save_tiny_model(directory: Path) -> Path:
    """The quick-start shape, random weights, adapters made to matter (they start at zero)."""
    torch.manual_seed(0)
    m = omnicore.build("quickstart").eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    return m.save(directory)


class Server:
    """An ``omni serve`` process; ``url`` once it listens, ready once /health says so."""

    def __init__(self, model_dir: Path, *args: str, log: Path) -> None:
        self.log = log
        self.out = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "omnicore.cli", "serve", "--model", str(model_dir),
                                      "--port", "0", "--device", "cpu", "--threads", "1", *args],
                                     stdout=subprocess.PIPE, stderr=self.out, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = self.proc.stdout.readline()
        match = re.search(r"listening on (http://[\d.]+:\d+)/", line)
        if not match:
            self.stop()
            raise RuntimeError(f"omni serve did not start: {line!r} {log.read_text()}")
        self.url = match.group(1)

    def wait_ready(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"omni serve exited: {self.log.read_text()}")
            r = httpx.get(f"{self.url}/health")
            if r.status_code == 200:
                return r.json()
            assert r.json()["status"] == "loading"
            time.sleep(0.2)
        raise TimeoutError("omni serve never became ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: contended torch threads made every step ~20x slower."""
    kept = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(kept)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def pipe(model_dir):
    return omnicore.load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = Server(model_dir, "--api-key", KEY, "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE),
                 "--max-body-mb", "1", log=tmp_path_factory.mktemp("serve-log") / "server.log")
    try:
        health = srv.wait_ready()
        assert health["tasks"] == ["mmu", "t2i"] and health["image_size"] == "32x32"
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def images():
    ds = omnicore.create("dataset", "synthetic_shapes", task="mmu", size=4, image_size=32)
    return [ds[i]["image"] for i in range(4)]


def data_url(image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(question: str, image=None, **options) -> dict:
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_url(image)}})
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **options}


def decode_png(b64: str) -> bytes:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").tobytes()


def read_stream(response) -> tuple[str, list[dict]]:
    """The text of choice 0 and every chunk of a chat completion stream (checked to end with [DONE])."""
    chunks, done = [], False
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: ")
        if line == "data: [DONE]":
            done = True
            continue
        chunks.append(json.loads(line[6:]))
    assert done, "the stream did not end with data: [DONE]"
    text = "".join(c["delta"].get("content") or "" for ch in chunks for c in ch["choices"] if c["index"] == 0)
    return text, chunks


def metric(server: Server, name: str, labels: str = "") -> float:
    text = httpx.get(f"{server.url}/metrics").text
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


def settled_metric(server: Server, name: str, labels: str, expected: float, wait_s: float = 10.0) -> float:
    """The metric once it reads ``expected`` (or after ``wait_s``): the engine reports its counters after each
    step, so /metrics may trail a response by a step."""
    deadline = time.monotonic() + wait_s
    while (value := metric(server, name, labels)) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


# --- answers and images equal the Python API's ----------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(temperature=1.0, top_k=20, seed=5), dict(temperature=0)],
                         ids=["sampled", "greedy"])
def test_streamed_answer_equals_the_non_streamed_one_and_the_python_api(server, pipe, images, options):
    q = "What color is the shape?"
    body = chat_body(q, images[0], max_tokens=12, **options)
    whole = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert whole.status_code == 200, whole.text
    result = whole.json()
    assert result["object"] == "chat.completion"
    text = result["choices"][0]["message"]["content"]
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        streamed, chunks = read_stream(r)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == result["choices"][0]["finish_reason"]
    api = {"max_new_tokens": 12, **{k: v for k, v in options.items()}}
    assert streamed == text == "".join(pipe.stream_answer(images[0], q, **api))
    assert text.strip() == pipe.answer([images[0]], [q], **api)[0]
    ids = pipe.layout.question_ids(q)
    usage = result["usage"]
    assert usage["prompt_tokens"] == pipe.mmu_prefix_len + len(ids)
    assert 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_the_openai_client_works_unchanged(server, pipe, images):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    q = "Is the shape on the left or the right?"
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(images[1])}},
                                             {"type": "text", "text": q}]}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0.8, seed=11,
                                         top_p=0.9, extra_body={"top_k": 30})
    expected = "".join(pipe.stream_answer(images[1], q, max_new_tokens=10, temperature=0.8, seed=11, top_p=0.9,
                                          top_k=30))
    assert out.choices[0].message.content == expected
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0.8, seed=11,
                                            top_p=0.9, extra_body={"top_k": 30}, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    got = client.images.generate(model="tiny", prompt="a blue square on the right", n=2, size="32x32",
                                 response_format="b64_json", extra_body={"seed": 4, "guidance_scale": 3.0, "top_k": 8})
    ref = pipe.generate_images(["a blue square on the right"], n_per_prompt=2, guidance_scale=3.0, seed=4, top_k=8)
    assert [decode_png(d.b64_json) for d in got.data] == [im.tobytes() for im in ref]


def test_generated_images_equal_the_python_api(server, pipe):
    body = {"prompt": "a red circle on the left", "n": 3, "seed": 7, "response_format": "b64_json",
            "guidance_scale": 4.0, "negative_prompt": "a circle", "temperature": 0.9, "top_k": 8}
    r = httpx.post(f"{server.url}/v1/images/generations", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    got = [decode_png(d["b64_json"]) for d in r.json()["data"]]
    ref = pipe.generate_images([body["prompt"]], n_per_prompt=3, guidance_scale=4.0, negative_prompts="a circle",
                               seed=7, temperature=0.9, top_k=8)
    assert got == [im.tobytes() for im in ref]
    assert len(set(got)) == 3  # three samples, not one repeated


def test_32_concurrent_clients_mixed_mmu_and_t2i_all_get_their_own_answers(server, pipe, images):
    prompts = ["a red circle on the left", "a green square on the right", "a blue triangle on the left",
               "a yellow circle on the right"]
    questions = ["What color is the shape?", "What shape is it?", "Is it on the left or the right?", "hi"]
    chats = [(images[i % 4] if i % 3 else None, questions[i % 4],
              dict(seed=100 + i, temperature=[0, 1.0, 0.7][i % 3], max_tokens=6 + i % 5,
                   **({"top_k": 12} if i % 2 else {}))) for i in range(16)]
    draws = [(prompts[i % 4], dict(seed=200 + i, n=1 + i % 3, guidance_scale=[1.0, 3.0][i % 2],
                                    **({"top_k": 6} if i % 3 else {}))) for i in range(16)]
    steps_before = metric(server, "omni_decode_steps_total", '{task="t2i"}')
    rows_before = metric(server, "omni_decode_step_requests_total", '{task="t2i"}')

    async def run():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as client:
            calls = [client.post(f"{server.url}/v1/chat/completions", json=chat_body(q, im, **o))
                     for im, q, o in chats]
            calls += [client.post(f"{server.url}/v1/images/generations", json={"prompt": p, **o}) for p, o in draws]
            return await asyncio.gather(*calls)

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 32, [r.text for r in responses if r.status_code != 200]
    for r, (im, q, o) in zip(responses[:16], chats):
        api = {"max_new_tokens": o["max_tokens"], "temperature": o["temperature"], "seed": o["seed"],
               **({"top_k": o["top_k"]} if "top_k" in o else {})}
        assert r.json()["choices"][0]["message"]["content"] == "".join(pipe.stream_answer(im, q, **api)), (q, o)
    for r, (p, o) in zip(responses[16:], draws):
        ref = pipe.generate_images([p], n_per_prompt=o["n"], guidance_scale=o["guidance_scale"], seed=o["seed"],
                                   **({"top_k": o["top_k"]} if "top_k" in o else {}))
        assert [decode_png(d["b64_json"]) for d in r.json()["data"]] == [im.tobytes() for im in ref], (p, o)
    # they ran as batches: more than one request per T2I step on average
    steps = metric(server, "omni_decode_steps_total", '{task="t2i"}') - steps_before
    rows = metric(server, "omni_decode_step_requests_total", '{task="t2i"}') - rows_before
    assert rows / steps > 2, (rows, steps)
    assert metric(server, "omni_batch_rows", '{task="t2i"}') == 0
    assert metric(server, "omni_batch_rows", '{task="mmu"}') == 0


def test_a_client_that_disconnects_mid_stream_frees_its_slots(server):
    cancelled = metric(server, "omni_cancelled_requests_total")
    body = chat_body("hi", n=MAX_BATCH, max_tokens=120, temperature=1.0, seed=1, stream=True)
    with httpx.Client(headers=AUTH, timeout=60) as client:
        with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the stream is open: the request holds every MMU row
            assert settled_metric(server, "omni_batch_rows", '{task="mmu"}', MAX_BATCH) == MAX_BATCH
        # leaving the block closes the connection mid-stream
    assert settled_metric(server, "omni_batch_rows", '{task="mmu"}', 0) == 0
    assert settled_metric(server, "omni_cancelled_requests_total", "", cancelled + 1) == cancelled + 1
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat_body("hi", max_tokens=4, seed=2), headers=AUTH,
                   timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_sequences_end_the_answer_before_them(server, pipe):
    full = "".join(pipe.stream_answer(None, "hi", max_new_tokens=16, temperature=1.0, seed=3))
    stop = full[5:7]
    assert stop and stop not in full[:5]
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=AUTH, timeout=60,
                   json=chat_body("hi", max_tokens=16, temperature=1.0, seed=3, stop=[stop]))
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == full[:full.index(stop)] and choice["finish_reason"] == "stop"


def test_requests_past_the_queue_limit_get_429_and_the_server_recovers(server):
    # each request takes every MMU row, so one runs at a time and the others wait in the queue
    hold = chat_body("hi", n=MAX_BATCH, max_tokens=120, temperature=1.0, seed=1, stream=True)
    heavy = chat_body("hi", n=MAX_BATCH, max_tokens=40, temperature=1.0, seed=3)

    async def run():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as client:
            async with client.stream("POST", f"{server.url}/v1/chat/completions", json=hold) as held:
                await held.aiter_lines().__anext__()  # running: the next requests queue behind it
                calls = [asyncio.ensure_future(client.post(f"{server.url}/v1/chat/completions", json=heavy))
                         for _ in range(MAX_QUEUE + 8)]
                return await asyncio.gather(*calls)

    responses = asyncio.run(run())
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429} and codes.count(429) >= 4 and codes.count(200) >= MAX_QUEUE, codes
    refused = next(r for r in responses if r.status_code == 429).json()["error"]
    assert refused["type"] == "rate_limit_error" and "queue" in refused["message"]
    assert metric(server, "omni_queue_depth") == 0
    assert httpx.get(f"{server.url}/health").json()["status"] == "ready"


# --- bad input ---------------------------------------------------------------------------------------------------
CHAT, IMAGES = "/v1/chat/completions", "/v1/images/generations"
GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _png_bytes_broken() -> str:
    return "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + os.urandom(64)).decode()


def _png_small() -> str:
    from PIL import Image

    return data_url(Image.new("RGB", (4, 4), "red"))


BAD = [
    ("malformed JSON", CHAT, b'{"model": "tiny", "messages": [', 400, None, "not valid JSON"),
    ("not an object", CHAT, [1, 2], 400, None, "JSON object"),
    ("NaN", CHAT, b'{"model": "tiny", "messages": [], "temperature": NaN}', 400, None, "NaN"),
    ("not UTF-8", CHAT, b'{"model": "\xff"}', 400, None, "UTF-8"),
    ("deep nesting", CHAT, b"[" * 100000 + b"]" * 100000, 400, None, "nested"),
    ("messages missing", CHAT, {"model": "tiny"}, 400, "messages", "messages"),
    ("messages wrong type", CHAT, {**GOOD, "messages": "hi"}, 400, "messages", "array"),
    ("role wrong", CHAT, {**GOOD, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "role"),
    ("temperature wrong type", CHAT, {**GOOD, "temperature": "hot"}, 400, "temperature", "number"),
    ("temperature out of range", CHAT, {**GOOD, "temperature": 5}, 400, "temperature", "at most 2"),
    ("max_tokens wrong type", CHAT, {**GOOD, "max_tokens": "5"}, 400, "max_tokens", "integer"),
    ("max_tokens past the context", CHAT, {**GOOD, "max_tokens": 100000}, 400, "max_tokens", "room"),
    ("n past the limit", CHAT, {**GOOD, "n": 17}, 400, "n", "at most 16"),
    ("n wrong type", CHAT, {**GOOD, "n": 1.5}, 400, "n", "integer"),
    ("seed past 64 bits", CHAT, {**GOOD, "seed": 2**70}, 400, "seed", "at most"),
    ("stop wrong type", CHAT, {**GOOD, "stop": 3}, 400, "stop", "stop"),
    ("unknown field", CHAT, {**GOOD, "tools": []}, 400, "tools", "unrecognized"),
    ("question past the context", CHAT, {**GOOD, "messages": [{"role": "user", "content": "word " * 400}]}, 400,
     "messages", "reads at most"),
    ("image not decodable", CHAT, {**GOOD, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _png_bytes_broken()}}]}]}, 400,
     "messages[0].content[0].image_url.url", "image"),
    ("image not base64", CHAT, {**GOOD, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}]}, 400,
     "messages[0].content[0].image_url.url", "base64"),
    ("image from a URL", CHAT, {**GOOD, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}]}]}, 400,
     "messages[0].content[0].image_url.url", "fetches no URL"),
    ("image from a file", CHAT, {**GOOD, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}]}]}, 400,
     "messages[0].content[0].image_url.url", "reads no file"),
    ("two images", CHAT, {**GOOD, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _png_small()}}] * 2}]}, 400, "messages[0].content[1]",
     "one image per request"),
    ("unknown model", CHAT, {**GOOD, "model": "gpt-4o"}, 404, "model", "'gpt-4o' does not exist"),
    ("oversized body", CHAT, {**GOOD, "pad": "x" * (2 << 20)}, 413, None, "limit"),
    ("prompt missing", IMAGES, {"n": 1}, 400, "prompt", "prompt"),
    ("prompt past the caption length", IMAGES, {"prompt": "a red circle " * 10}, 400, "prompt",
     "max_caption_tokens"),
    ("image n past the limit", IMAGES, {"prompt": "a", "n": 99}, 400, "n", "at most 16"),
    ("image size not the model's", IMAGES, {"prompt": "a", "size": "1024x1024"}, 400, "size", "32x32"),
    ("url response format", IMAGES, {"prompt": "a", "response_format": "url"}, 400, "response_format", "b64_json"),
    ("negative prompt without guidance", IMAGES, {"prompt": "a", "negative_prompt": "b"}, 400, "negative_prompt",
     "guidance"),
    ("guidance wrong type", IMAGES, {"prompt": "a", "guidance_scale": [3]}, 400, "guidance_scale", "number"),
]


@pytest.mark.parametrize("path,body,status,param,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_a_4xx_json_error_naming_what_was_wrong(server, path, body, status, param, words):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}{path}", content=raw, headers={**AUTH, "Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param"} and error["param"] == param
    if words:
        assert words in error["message"]
    assert "Traceback" not in r.text and "File \"" not in r.text


def test_api_key_is_required_when_set(server):
    for headers, words in [({}, "missing API key"), ({"Authorization": "Bearer nope"}, "wrong API key")]:
        r = httpx.post(f"{server.url}{CHAT}", json=GOOD, headers=headers, timeout=30)
        assert r.status_code == 401 and words in r.json()["error"]["message"]
        assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200  # health, metrics and the page stay open


def test_the_server_keeps_serving_after_bad_input(server):
    for _, path, body, *_ in BAD:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        httpx.post(f"{server.url}{path}", content=raw, headers=AUTH, timeout=60)
    assert server.proc.poll() is None
    r = httpx.post(f"{server.url}{CHAT}", json=GOOD, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    text = httpx.get(f"{server.url}/metrics").text
    assert re.search(r'^omni_requests_total\{endpoint="/v1/chat/completions",status="400"\} [1-9]', text, re.M)
    assert re.search(r'^omni_request_latency_seconds_count\{endpoint="/v1/chat/completions"\} [1-9]', text, re.M)
    assert re.search(r"^omni_time_to_first_token_seconds_count [1-9]", text, re.M)
    assert re.search(r"^omni_generated_images_total [1-9]", text, re.M)
    assert "Traceback" not in server.log.read_text()


def test_the_page_is_served_and_fetches_nothing_from_elsewhere(server):
    r = httpx.get(f"{server.url}/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert not re.search(r"(src|href)=\"(https?:)?//", r.text)


# --- the command line ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,words", [
    (["--model", "no/such/dir"], "--model no/such/dir: not a model directory"),
    (["--max-batch", "0"], "--max-batch: must be at least 1"),
    (["--port", "70000"], "--port: must be at most 65535"),
    (["--max-n", "32", "--max-batch", "64"], "--max-n: at most 16"),
    (["--engine", "fork"], "--engine fork: use process or thread"),
    (["--replicas", "2", "--engine", "thread"], "--replicas 2: replicas are engine processes"),
    (["--dtype", "int8"], "--dtype int8: use float32, bfloat16, float16"),
])
def test_serve_refuses_bad_options_in_one_line(model_dir, args, words, capsys):
    from omnicore.cli.main import main

    full = ["--model", str(model_dir), *args] if args[0] != "--model" else args
    rc = main(["serve", *full])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_a_directory_that_is_not_a_model_stops_the_server_with_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "omnicore.cli", "serve", "--model", str(tmp_path), "--port", "0",
                        "--device", "cpu", "--log-level", "error"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not an omnicore model config" in r.stderr.splitlines()[-1], r.stderr


# --- where the model steps: the engine process, or a thread of the server's ------------------------------------
def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name: state, ppid, ... (utime and stime at 11 and 12)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _children(pid: int) -> dict[int, str]:
    """pid -> command line of the processes whose parent is ``pid``."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat(int(entry.name))[1])
            if ppid == pid:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return out


def _engine_pid(server: Server) -> int:
    engines = [pid for pid, cmd in _children(server.proc.pid).items() if "spawn_main" in cmd]
    assert len(engines) == 1, _children(server.proc.pid)
    return engines[0]


def _gone(pid: int, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            state = _stat(pid)[0]
        except FileNotFoundError:
            return True
        if state == "Z":  # exited, not yet reaped by its (killed) parent
            return True
        time.sleep(0.05)
    return False


def test_the_thread_engine_gives_the_python_apis_answers_and_images(model_dir, pipe, images, tmp_path):
    """The scheduler in the server's own process (the module's server runs the default, an engine process)."""
    srv = Server(model_dir, "--engine", "thread", "--max-batch", "4", log=tmp_path / "server.log")
    try:
        srv.wait_ready()
        assert not any("spawn_main" in cmd for cmd in _children(srv.proc.pid).values())
        r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=60,
                       json=chat_body("What shape is it?", images[0], max_tokens=8, temperature=1.0, seed=4))
        assert r.json()["choices"][0]["message"]["content"] == "".join(
            pipe.stream_answer(images[0], "What shape is it?", max_new_tokens=8, temperature=1.0, seed=4))
        r = httpx.post(f"{srv.url}/v1/images/generations", timeout=60,
                       json={"prompt": "a red circle", "n": 2, "seed": 3, "guidance_scale": 2.0})
        ref = pipe.generate_images(["a red circle"], n_per_prompt=2, guidance_scale=2.0, seed=3)
        assert [decode_png(d["b64_json"]) for d in r.json()["data"]] == [im.tobytes() for im in ref]
    finally:
        srv.stop()


def test_dtype_runs_the_engine_in_that_type(model_dir, tmp_path):
    """--dtype bfloat16 serves the images of the model loaded in bfloat16 (the saved model is float32)."""
    body = {"prompt": "a red circle", "n": 2, "seed": 3, "guidance_scale": 2.0}

    def reference(dtype):
        model = omnicore.load(model_dir, device="cpu", dtype=dtype)
        return [im.tobytes() for im in model.generate_images(["a red circle"], n_per_prompt=2, guidance_scale=2.0,
                                                             seed=3)]

    half, full = reference(torch.bfloat16), reference(torch.float32)
    assert half != full  # else this test could not tell the two types apart
    srv = Server(model_dir, "--dtype", "bfloat16", "--max-batch", "4", log=tmp_path / "server.log")
    try:
        srv.wait_ready()
        r = httpx.post(f"{srv.url}/v1/images/generations", timeout=120, json=body)
        assert [decode_png(d["b64_json"]) for d in r.json()["data"]] == half
    finally:
        srv.stop()


def _cpu_seconds(pid: int) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_replicas_share_the_requests_and_each_answers_exactly(model_dir, pipe, images, tmp_path):
    srv = Server(model_dir, "--replicas", "2", "--max-batch", "4", log=tmp_path / "server.log")
    try:
        health = srv.wait_ready()
        engines = [pid for pid, cmd in _children(srv.proc.pid).items() if "spawn_main" in cmd]
        assert len(engines) == 2
        assert metric(srv, "omni_batch_capacity_rows", '{task="mmu"}') == 8  # both replicas' rows
        before = [_cpu_seconds(pid) for pid in engines]
        questions = [("What shape is it?", images[i % 4], i) for i in range(8)]

        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*[client.post(f"{srv.url}/v1/chat/completions", json=chat_body(
                    q, im, max_tokens=24, temperature=1.0, seed=s)) for q, im, s in questions])

        responses = asyncio.run(run())
        for (q, im, s), r in zip(questions, responses):
            assert r.json()["choices"][0]["message"]["content"] == "".join(
                pipe.stream_answer(im, q, max_new_tokens=24, temperature=1.0, seed=s))
        used = [_cpu_seconds(pid) - b for pid, b in zip(engines, before)]
        assert min(used) > 0.2 * max(used), used  # each replica stepped a share of the requests
        assert health["tasks"] == ["mmu", "t2i"]
        srv.proc.kill()  # a killed server leaves no engine behind: each stops when its pipe closes
        srv.proc.wait(10)
        assert all(_gone(pid, 15) for pid in engines), "an engine outlived its server"
    finally:
        srv.stop()


def test_an_engine_that_dies_fails_its_requests_and_stops_the_server_in_one_line(model_dir, tmp_path):
    srv = Server(model_dir, "--max-batch", "4", log=tmp_path / "server.log")
    try:
        srv.wait_ready()
        engine = _engine_pid(srv)

        async def run():
            async with httpx.AsyncClient(timeout=60) as client:
                body = chat_body("hi", max_tokens=8, temperature=1.0, seed=1, stream=True)
                os.kill(engine, signal.SIGSTOP)  # the request is in flight when the engine dies
                async with client.stream("POST", f"{srv.url}/v1/chat/completions", json=body) as r:
                    lines = r.aiter_lines()
                    assert (await lines.__anext__()).startswith("data: ")  # the server's own first chunk
                    os.kill(engine, signal.SIGKILL)
                    return [line async for line in lines if line]

        rest = asyncio.run(run())
        assert any("engine stopped" in line for line in rest), rest  # an error event, not a stream left hanging
        assert srv.proc.wait(30) == 2
        last = srv.log.read_text().strip().splitlines()[-1]
        assert "the engine process exited (code -9)" in last, last
    finally:
        srv.stop()


# --- the scheduler itself (in this process) ---------------------------------------------------------------------
def _run_jobs(scheduler, jobs) -> None:
    for job in jobs:
        scheduler.submit(job)
    deadline = time.monotonic() + 120
    while any(p.running for p in scheduler.pools.values()) or scheduler.queue_depth:
        scheduler.run_once()
        assert time.monotonic() < deadline


def _answer(events, pipe) -> str:
    ids = [e[1][0] for e in events if e[0] == "tokens" and e[1][0] is not None]
    assert events[-1][0] == "end", events[-1]
    return pipe.text_tokenizer.decode(ids)


def test_a_long_answer_beside_rows_freed_long_ago_stays_exact(pipe):
    """A row freed early stays inside the stepped bucket while a later row runs on: it must not run past the position
    table (it did: the whole MMU step failed) nor disturb its neighbours."""
    from omnicore.generation.sampling import Sampling
    from omnicore.serve.jobs import TextJob
    from omnicore.serve.scheduler import Scheduler

    scheduler = Scheduler(pipe, max_batch=4)
    room = pipe.heads["mmu_positions"].num_positions - pipe.mmu_prefix_len - len(pipe.layout.question_ids("hi"))
    events: dict[int, list] = {0: [], 1: []}
    short = TextJob(n=1, sampling=Sampling(temperature=1.0, seed=1, max_new_tokens=1), emit=events[0].append,
                    question_ids=pipe.layout.question_ids("Is the shape on the left or the right of the picture?"))
    long = TextJob(n=1, sampling=Sampling(temperature=1.0, seed=2, max_new_tokens=room, ignore_eos=True),
                   emit=events[1].append, question_ids=pipe.layout.question_ids("hi"))
    _run_jobs(scheduler, [short, long])
    assert scheduler.error is None
    assert _answer(events[1], pipe) == "".join(pipe.stream_answer(None, "hi", max_new_tokens=room, temperature=1.0,
                                                                  seed=2, ignore_eos=True))


def test_a_hybrid_backbone_with_attention_layers_is_served_exactly(tmp_path):
    """KV caches share one column offset: such a pool starts jobs together only (same prompt length), and gives the
    Python API's answers and images."""
    from omnicore.generation.sampling import Sampling
    from omnicore.recipe import load_recipe
    from omnicore.serve.jobs import ImageJob, TextJob
    from omnicore.serve.scheduler import Scheduler

    spec = load_recipe("quickstart").recipe.model.model_dump(mode="json")
    spec["backbone"]["params"].update(attn_layer_idx=[1], attn_cfg={"num_heads": 4})
    torch.manual_seed(0)
    model = omnicore.build({"model": spec}).eval()
    scheduler = Scheduler(model, max_batch=4)
    assert not scheduler.pools["mmu"].recurrent
    questions = ["hi", "What color is it?", "hi"]
    events = [[] for _ in range(6)]
    jobs = [TextJob(n=1, sampling=Sampling(temperature=1.0, seed=i, max_new_tokens=6), emit=events[i].append,
                    question_ids=model.layout.question_ids(q)) for i, q in enumerate(questions)]
    jobs += [ImageJob(n=1, sampling=Sampling(temperature=1.0, seed=10 + i), emit=events[3 + i].append,
                      prompt="a red circle", guidance_scale=[1.0, 3.0, 3.0][i]) for i in range(3)]
    _run_jobs(scheduler, jobs)
    deadline = time.monotonic() + 30
    while not all(events[3:]) and time.monotonic() < deadline:  # images arrive from the decoder thread
        time.sleep(0.01)
    for i, q in enumerate(questions):
        assert _answer(events[i], model) == "".join(model.stream_answer(None, q, max_new_tokens=6, temperature=1.0,
                                                                        seed=i))
    for i in range(3):
        ref = model.generate_images(["a red circle"], guidance_scale=[1.0, 3.0, 3.0][i], seed=10 + i)
        assert [im.tobytes() for im in events[3 + i][0][1]] == [im.tobytes() for im in ref]
