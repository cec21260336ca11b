"""``omni serve`` under load: N concurrent clients against a running server, and the same requests one after another.

Reports requests/s, images/s, time to first token (streamed answers) and p50/p99 latency. Without ``--url`` it saves
a model (``--shape quickstart``: the quick-start recipe's model; ``1.3b``: the Mamba-2 1.3B shape of
bench_generation.py with its full-size VQ decoder, no image encoder, random weights) and starts ``omni serve`` on a
free loopback port. ``--offline`` (GPU) first times ``generate_codes`` at batch ``--clients`` in this process, the
figure bench_generation.py reports, to compare the server's images/s with.

``--engines process,thread,process:2`` runs the same requests against one server of each kind in turn (``omni serve
--engine``; ``:2`` adds ``--replicas 2``), so their figures come from one call.

Run: python benchmarks/bench_serve.py --device cpu --clients 16 --requests 64 --task mixed --sequential
     python benchmarks/bench_serve.py --device cuda --shape 1.3b --clients 64 --requests 256 --task t2i --offline
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import omnicore

PROMPTS = ["a red circle on the left", "a green square on the right", "a blue triangle on the left",
           "a yellow circle on the right"]
QUESTIONS = ["What color is the shape?", "What shape is it?", "Is it on the left or the right?"]


def spec(shape: str) -> dict:
    if shape == "quickstart":
        from omnicore.recipe import load_recipe

        return load_recipe("quickstart").recipe.model.model_dump(mode="json")
    return {  # bench_generation.omni_model's T2I side: the 1.3B backbone, full-size VQ, its heads
        "text_tokenizer": {"type": "byte"},
        "backbone": {"type": "mamba2", "params": {"size": "1.3b",
                                                  "lora": {"tasks": ["mmu", "t2i"], "r": 8, "alpha": 32,
                                                           "dropout": 0.0}}},
        "image_tokenizer": {"type": "vqgan"},
        "heads": {"text": {"type": "text_vocab", "params": {"vocab_size": 50304}}, "image": {"type": "image_vocab"},
                  "caption": {"type": "caption_mlp"},
                  "mmu_positions": {"type": "position_table", "params": {"num_positions": 1500}},
                  "t2i_positions": {"type": "position_table", "params": {"num_positions": 256 + 73}}},
        "max_caption_tokens": 68, "image_size": 256,
    }


def save_model(shape: str, directory: Path, device: str) -> Path:
    from omnicore.model.unified import build_from_spec

    torch.manual_seed(0)
    model = build_from_spec(spec(shape))
    if shape != "quickstart":
        model = model.to(torch.bfloat16)
    return model.save(directory)


def offline_images_per_s(model_dir: Path, batch: int, guidance: float, device: str) -> float:
    """generate_codes at ``batch``: the offline figure (best of 3 after a warm-up), as bench_generation.py times."""
    from omnicore.generation.engine import clear_decode_cache, generate_codes
    from omnicore.generation.sampling import Sampling

    model = omnicore.load(model_dir, device=device)
    s = Sampling(temperature=1.0, top_k=1000)
    caption = PROMPTS[0]
    t = time.perf_counter()
    generate_codes(model, [caption] * batch, guidance, s)
    torch.cuda.synchronize()
    print(f"offline batch {batch}: first call (compilation and capture included) {time.perf_counter() - t:.1f} s",
          flush=True)
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        generate_codes(model, [caption] * batch, guidance, s)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
        print(f"offline batch {batch}: {time.perf_counter() - t:.2f} s", flush=True)
    clear_decode_cache(model)
    del model
    torch.cuda.empty_cache()
    return batch / best


def start_server(model_dir: Path, device: str, max_batch: int, threads: int | None, log: Path, engine: str):
    args = [sys.executable, "-m", "omnicore.cli", "serve", "--model", str(model_dir), "--port", "0", "--device",
            device, "--max-batch", str(max_batch), "--max-queue", "4096", "--log-level", "warning",
            "--engine", engine.partition(":")[0], "--replicas", engine.partition(":")[2] or "1"]
    if threads:
        args += ["--threads", str(threads)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = proc.stdout.readline()
    match = re.search(r"listening on (http://[\d.]+:\d+)/", line)
    if not match:
        proc.kill()
        raise SystemExit(f"omni serve did not start: {line!r}\n{log.read_text()}")
    url = match.group(1)
    import httpx

    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"omni serve exited:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("omni serve never became ready")


def requests_for(task: str, count: int, model: str, images: int, max_tokens: int, guidance: float) -> list:
    out = []
    for i in range(count):
        kind = task if task != "mixed" else ("mmu" if i % 2 else "t2i")
        if kind == "mmu":
            out.append(("mmu", {"model": model, "messages": [{"role": "user", "content": QUESTIONS[i % 3]}],
                                "max_tokens": max_tokens, "temperature": 1.0, "seed": i, "stream": True}))
        else:
            out.append(("t2i", {"model": model, "prompt": PROMPTS[i % 4], "n": images, "seed": i,
                                "guidance_scale": guidance, "temperature": 1.0, "top_k": 1000}))
    return out


async def one(client, url: str, kind: str, body: dict) -> dict:
    t0 = time.perf_counter()
    if kind == "t2i":
        r = await client.post(f"{url}/v1/images/generations", json=body)
        r.raise_for_status()
        return {"kind": kind, "latency": time.perf_counter() - t0, "images": len(r.json()["data"])}
    first = None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                first = time.perf_counter() - t0
    return {"kind": kind, "latency": time.perf_counter() - t0, "ttft": first, "images": 0}


async def drive(url: str, work: list, clients: int) -> tuple[float, list[dict]]:
    """``clients`` workers each sending its next request when the last one is answered."""
    import httpx

    pending = list(enumerate(work))
    results: list[dict] = []

    async def worker(client):
        while pending:
            _, (kind, body) = pending.pop(0)
            results.append(await one(client, url, kind, body))

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        t = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(clients)])
        return time.perf_counter() - t, results


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


def report(label: str, seconds: float, results: list[dict]) -> dict:
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results if r.get("ttft") is not None]
    row = {"run": label, "requests": len(results), "seconds": round(seconds, 3),
           "requests_per_s": round(len(results) / seconds, 3),
           "images_per_s": round(sum(r["images"] for r in results) / seconds, 3),
           "p50_s": round(pct(lat, 50), 4), "p99_s": round(pct(lat, 99), 4),
           "ttft_p50_s": round(pct(ttft, 50), 4) if ttft else None}
    print(json.dumps(row), flush=True)
    return row


def serve_and_drive(args, model_dir: Path, engine: str, tmp: Path, offline: dict | None) -> list[dict]:
    """Start a server with ``--engine engine`` (unless ``--url``), drive it concurrently (and one request after
    another with ``--sequential``), stop it; the result rows."""
    rows, proc, url = [], None, args.url
    log = tmp / f"server-{engine.replace(':', '-')}.log"
    if url is None:
        t = time.perf_counter()
        proc, url = start_server(model_dir, args.device, args.max_batch or args.clients, args.threads, log, engine)
        print(f"engine {engine}: server ready in {time.perf_counter() - t:.1f} s at {url}", flush=True)
    try:
        import httpx

        name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        work = requests_for(args.task, args.requests, name, args.images, args.max_tokens, args.guidance)
        asyncio.run(drive(url, work[:args.clients], args.clients))  # warm the path (and the client) first
        seconds, results = asyncio.run(drive(url, work, args.clients))
        rows.append(report(f"engine {engine}: {args.clients} concurrent clients", seconds, results))
        if args.sequential:
            seconds, results = asyncio.run(drive(url, work, 1))
            rows.append(report(f"engine {engine}: one after another", seconds, results))
            print(f"engine {engine}: concurrent / sequential throughput: "
                  f"x{rows[-2]['requests_per_s'] / rows[-1]['requests_per_s']:.2f}", flush=True)
        if offline is not None:
            print(f"engine {engine}: served / offline images/s: "
                  f"{rows[0]['images_per_s'] / offline['images_per_s']:.3f}", flush=True)
    except Exception:
        if log.exists():
            print(log.read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running server (default: start one)")
    ap.add_argument("--model", type=Path, help="a model directory to serve (default: save one of --shape)")
    ap.add_argument("--shape", default="quickstart", choices=["quickstart", "1.3b"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--task", default="mixed", choices=["mmu", "t2i", "mixed"])
    ap.add_argument("--images", type=int, default=1, help="n of each image request")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--max-batch", type=int, default=None, help="omni serve --max-batch (default: --clients)")
    ap.add_argument("--threads", type=int, default=None, help="omni serve --threads")
    ap.add_argument("--engines", default="process", help="omni serve --engine values to run in turn, comma-separated, "
                    "each with its own server, in this call (process:2: --engine process --replicas 2)")
    ap.add_argument("--sequential", action="store_true", help="also send the same requests one after another")
    ap.add_argument("--offline", action="store_true", help="also time generate_codes at batch --clients (GPU)")
    ap.add_argument("--out", type=Path, help="append the result rows to this JSONL file")
    args = ap.parse_args()

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if args.url is None and model_dir is None:
            t = time.perf_counter()
            model_dir = save_model(args.shape, Path(tmp) / f"bench-{args.shape}", args.device)
            print(f"saved the {args.shape} model in {time.perf_counter() - t:.1f} s", flush=True)
        if args.offline:
            rate = offline_images_per_s(model_dir, args.clients, args.guidance, args.device)
            rows.append({"run": f"offline generate_codes batch {args.clients}", "images_per_s": round(rate, 3)})
            print(json.dumps(rows[-1]), flush=True)
        engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        for engine in engines if args.url is None else ["(given server)"]:
            rows += serve_and_drive(args, model_dir, engine, Path(tmp), offline=rows[0] if args.offline else None)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps({**row, "device": args.device, "shape": args.shape, "task": args.task}) + "\n")


if __name__ == "__main__":
    main()
