"""The server under load, on SmolLM2: upload, latency, 32 concurrent clients, and a screenshot of the web page.

    python benchmarks/server_load.py --threads 2 --clients 32 --out runs/server --screenshot docs/server_page.png

1. Uploads the bundled (counterfactual) aardwolf article through `POST /v1/memories` with streamed progress, and
   times it against `ExtendedMind.memorize` + `Memory.save` on the same text in the same run (the API's overhead
   as a ratio; both after a warm-up).
2. Asks `--clients` questions one by one (per-request latency, time to first streamed token), then all at once
   from as many threads, each through its own HTTP connection and streamed (time to first token per request).
   Concurrent requests are decoded together (continuous batching, up to `--max-batch` rows), so the wall time
   should be well under the sequential total; every concurrent answer must equal its sequential one (answers mixed
   between requests would show here).
3. With `--screenshot`, asks the demo question on the web page in headless Chromium and saves the page.

Writes results.json and table.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path

import httpx
import torch

from extended_mind import ExtendedMind
from extended_mind.server import ServerConfig, create_app
from extended_mind.server.background import HEADLESS_CHROMIUM_ARGS, BackgroundServer, chromium_path

# tables in float32 unless --dtype or $EXTENDED_MIND_DTYPE asks otherwise: what a timing picks ("auto") varies
os.environ.setdefault("EXTENDED_MIND_DTYPE", "float32")

QUESTIONS = [
    "Question: How many termites can one aardwolf eat in a single night?\nAnswer: One aardwolf can eat about",
    "Question: What does the aardwolf mainly eat?\nAnswer: The aardwolf mainly eats",
    "Question: Where does the aardwolf live?\nAnswer: The aardwolf lives in",
    "Question: What family does the aardwolf belong to?\nAnswer: The aardwolf belongs to the family",
]


def ask(url: str, prompt: str, memory: str | None, max_tokens: int, stream: bool) -> dict:
    body = {"model": "-", "prompt": prompt, "max_tokens": max_tokens, "stop": ["\n"], "stream": stream}
    if memory:
        body["memory"] = memory
    with httpx.Client(base_url=url, timeout=3600) as client:
        body["model"] = client.get("/v1/models").json()["data"][0]["id"]
        start = time.perf_counter()
        if not stream:
            r = client.post("/v1/completions", json=body)
            r.raise_for_status()
            out = r.json()
            return {
                "text": out["choices"][0]["text"],
                "seconds": time.perf_counter() - start,
                "citations": out["citations"],
            }
        first, text = None, ""
        with client.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                piece = chunk["choices"][0]["text"]
                if piece and first is None:
                    first = time.perf_counter() - start
                text += piece
        return {"text": text, "seconds": time.perf_counter() - start, "first_token_seconds": first}


def screenshot(url: str, path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=HEADLESS_CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url + "/")
        page.check('#memories li[data-memory="animals"] input')
        page.check("#raw")
        page.fill("#question", QUESTIONS[0])
        page.fill("#max-tokens", "16")
        page.click("#ask")
        expect(page.locator("mark.cited").first).to_be_visible(timeout=120_000)
        expect(page.locator("#ask")).to_be_enabled(timeout=120_000)
        page.locator("mark.cited").first.scroll_into_view_if_needed()
        path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path))
        browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16, help="rows decoded together (the server's --max-batch)")
    ap.add_argument("--out", type=Path, default=Path("runs/server"))
    ap.add_argument("--screenshot", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    article_path = Path(str(files("extended_mind") / "data" / "aardwolf.txt"))
    article = article_path.read_text()
    mind = ExtendedMind.from_pretrained()
    root = Path(tempfile.mkdtemp(prefix="extended-mind-server-"))
    from extended_mind.base.machine import cpu_info

    results: dict = {"threads": args.threads, "clients": args.clients, "max_tokens": args.max_tokens,
                     "max_batch": args.max_batch, "cpu": cpu_info()}  # fmt: skip
    try:
        config = ServerConfig(memory_dir=root, max_batch=args.max_batch)
        with BackgroundServer(create_app(mind, config)) as server:
            mind.memorize(article[:2000], progress=False)  # warm-up, so neither timing below pays first-call costs
            start = time.perf_counter()
            events = 0
            with (
                httpx.Client(base_url=server.url, timeout=3600) as client,
                client.stream(
                    "POST",
                    "/v1/memories",
                    data={"name": "animals", "stream": "true"},
                    files=[("files", ("aardwolf.txt", article.encode(), "text/plain"))],
                ) as r,
            ):
                r.raise_for_status()
                for line in r.iter_lines():
                    events += line.startswith('data: {"object": "memory.progress"')
            upload = time.perf_counter() - start
            start = time.perf_counter()
            direct = mind.prepare_to_save(mind.memorize(article, progress=False))  # the API calibrates it ...
            direct.save(root / "direct")  # ... and saves it too
            results["upload"] = {
                "tokens": direct.num_tokens,
                "api_seconds": round(upload, 2),
                "direct_seconds": round(time.perf_counter() - start, 2),
                "progress_events": events,
            }
            results["upload"]["ratio"] = round(upload / results["upload"]["direct_seconds"], 2)
            print("upload", results["upload"], flush=True)

            jobs = [(QUESTIONS[i % len(QUESTIONS)], "animals" if i % 2 == 0 else None) for i in range(args.clients)]
            ask(server.url, QUESTIONS[0], "animals", 2, False)  # warm-up: prepares the memory's keys once
            sequential = [ask(server.url, q, m, args.max_tokens, False) for q, m in jobs]
            streamed = [ask(server.url, q, m, args.max_tokens, True) for q, m in jobs[:4]]
            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                together = list(pool.map(lambda j: ask(server.url, j[0], j[1], args.max_tokens, True), jobs))
            wall = time.perf_counter() - start
            same = sum(a["text"] == b["text"] for a, b in zip(sequential, together))
            seq_total = sum(r["seconds"] for r in sequential)
            lat = sorted(r["seconds"] for r in together)
            results["sequential"] = {
                "median_seconds": round(statistics.median(r["seconds"] for r in sequential), 3),
                "total_seconds": round(seq_total, 2),
            }
            results["streaming"] = {
                "median_first_token_seconds": round(statistics.median(r["first_token_seconds"] for r in streamed), 3),
                "median_seconds": round(statistics.median(r["seconds"] for r in streamed), 3),
            }
            first = sorted(r["first_token_seconds"] for r in together if r["first_token_seconds"] is not None)
            results["concurrent"] = {
                "wall_seconds": round(wall, 2),
                "wall_over_sequential_total": round(wall / seq_total, 2),
                "speedup": round(seq_total / wall, 2),
                "p50_seconds": round(lat[len(lat) // 2], 2),
                "p99_seconds": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
                "max_seconds": round(lat[-1], 2),
                "first_token_p50_seconds": round(first[len(first) // 2], 2) if first else None,
                "answers_equal_to_sequential": f"{same}/{len(jobs)}",
            }
            results["answers"] = [{"prompt": q, "memory": m, "text": r["text"]} for (q, m), r in zip(jobs, together)]
            print({k: results[k] for k in ("sequential", "streaming", "concurrent")}, flush=True)
            if args.screenshot:
                screenshot(server.url, args.screenshot)
                print("screenshot:", args.screenshot)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    u, s, st, c = results["upload"], results["sequential"], results["streaming"], results["concurrent"]
    cpu = results["cpu"]
    table = "\n".join([
        f"CPU {cpu['model']} ({', '.join(cpu['flags'])}), {args.threads} threads.", "",
        "| measure | value |", "| --- | --- |",
        f"| upload {u['tokens']} tokens via API / `memorize` + `prepare_to_save` + `save` in Python | "
        f"{u['api_seconds']} s / {u['direct_seconds']} s "
        f"({u['ratio']}x), {u['progress_events']} progress events |",
        f"| one request ({args.max_tokens} tokens max), median | {s['median_seconds']} s |",
        f"| streamed: first token / whole answer, median | {st['median_first_token_seconds']} s / "
        f"{st['median_seconds']} s |",
        f"| {args.clients} concurrent requests (streamed, --max-batch {args.max_batch}): wall time / sum of "
        f"sequential | {c['wall_seconds']} s / {s['total_seconds']} s ({c['speedup']}x faster) |",
        f"| concurrent latency p50 / p99 / max | {c['p50_seconds']} s / {c['p99_seconds']} s / {c['max_seconds']} s |",
        f"| concurrent time to first token, p50 | {c['first_token_p50_seconds']} s |",
        f"| concurrent answers equal to sequential ones | {c['answers_equal_to_sequential']} |",
    ])  # fmt: skip
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
