"""A reward server for `reward=http`, in the standard library: scores 1 when the first number of a
completion equals the answer (the exact_number rule), 0 otherwise.

    python scripts/reward_server.py --port 8000 [--api-key-env RM_API_KEY]
    rlctl train recipe=smoke reward=http reward.url=http://127.0.0.1:8000/score

The protocol: POST {"prompts": [chat, ...], "completions": [...], "answers": [...]} and reply
{"scores": [...]}, one number (or a list of [char_offset, reward] pairs) per completion. Replace
``score`` with your model or judge.
"""

from __future__ import annotations

import argparse
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rlctl.rewards.rules import exact_number


def score(prompt: list[dict], completion: str, answer: str) -> float:
    return exact_number(completion, answer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key-env", help="require 'Authorization: <value of this variable>'")
    args = parser.parse_args()
    key = os.environ[args.api_key_env] if args.api_key_env else None

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            if key is not None and self.headers.get("Authorization") != key:
                return self.reply(401, {"error": "bad or missing Authorization header"})
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            scores = [score(*row) for row in zip(body["prompts"], body["completions"], body["answers"])]
            self.reply(200, {"scores": scores})

        def reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"scoring on http://{args.host}:{args.port}/score (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
