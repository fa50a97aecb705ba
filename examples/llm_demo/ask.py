"""Serve the base and the demo's adapters with `lorakit serve`, ask each the same questions with the
openai client, print the answers side by side, and stop the server.

    python examples/llm_demo/ask.py --adapters runs/llm --model smollm2
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

# the first review of each task, then a general question the base answers right (what did they break?)
QUESTIONS = ("data/json_eval.jsonl", "data/condition_eval.jsonl", "keep.jsonl")
COLUMN = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(port: int, server: subprocess.Popen, seconds: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"lorakit serve exited with {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    sys.exit("lorakit serve did not come up")


def side_by_side(columns: dict[str, str]) -> str:
    wrapped = {name: textwrap.wrap(text, COLUMN) or [""] for name, text in columns.items()}
    rows = max(len(lines) for lines in wrapped.values())
    out = ["  ".join(f"{name:<{COLUMN}}" for name in wrapped), "  ".join("-" * COLUMN for _ in wrapped)]
    for i in range(rows):
        out.append("  ".join(f"{(lines[i] if i < len(lines) else ''):<{COLUMN}}" for lines in wrapped.values()))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", required=True, help="the demo's run folder (holds json/, condition/, data/)")
    parser.add_argument("--keep", default="examples/llm_demo/keep.jsonl", help="general questions the base gets right")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-tokens", type=int, default=40)
    args = parser.parse_args()
    from openai import OpenAI

    root = Path(args.adapters)
    port = free_port()
    log = (root / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", args.model, "--adapters",
                               str(root), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_up(port, server)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        served = [m.id for m in client.models.list().data]
        print(f"lorakit serve --model {args.model} --adapters {root} (port {port}) serves: {', '.join(served)}")
        names = [n for n in ("base", "json", "condition", "combined") if n in served]
        for file in QUESTIONS:
            path = Path(args.keep) if file == "keep.jsonl" else root / file
            row = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
            question = row["messages"][0]["content"]
            print(f"\nQ: {question[:300]}{'…' if len(question) > 300 else ''}\n")
            answers = {}
            for name in names:
                reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                                       max_tokens=args.max_tokens, temperature=0)
                answers[name] = reply.choices[0].message.content.strip()
            print(side_by_side(answers))
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    print(f"\nserver stopped (its log: {root / 'serve.log'})")


if __name__ == "__main__":
    main()
