"""What an HTTP round trip costs on this machine, under the app's choices (docs/BENCHMARKS.md, issue 28).

A bare FastAPI app with one form POST endpoint, served by uvicorn on loopback and timed with a
requests.Session (p50 of `--requests`), in four variants: uvicorn's pure-Python stack
(asyncio loop, h11 parser) or its speedups (uvloop, httptools), each without and with a
pass-through `@app.middleware("http")` (Starlette's BaseHTTPMiddleware). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

APP = '''
import os
from fastapi import FastAPI, Request
app = FastAPI()
if os.environ.get("WITH_MIDDLEWARE"):
    @app.middleware("http")
    async def passthrough(request, call_next):
        return await call_next(request)
@app.post("/f")
async def f(request: Request):
    return {"ok": dict(await request.form())}
@app.get("/g")
async def g():
    return {"ok": 1}
'''


def measure(folder: str, loop: str, http: str, middleware: bool, port: int, requests_n: int) -> float:
    import requests

    from clip_pyfunc.benchmarks.common import percentile, time_calls

    env = {**os.environ, **({"WITH_MIDDLEWARE": "1"} if middleware else {})}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "bare_app:app", "--port", str(port), "--loop", loop,
                             "--http", http, "--log-level", "warning"], cwd=folder, env=env)
    session = requests.Session()
    try:
        for _ in range(150):
            try:
                session.get(f"http://127.0.0.1:{port}/g", timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.2)
        times = time_calls(lambda: session.post(f"http://127.0.0.1:{port}/f", data={"like": "item-1", "k": "10"}),
                           requests_n, warmup=50)
    finally:
        proc.terminate()
        proc.wait()
    return round(percentile(times, 50) * 1e3, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--port", type=int, default=8790)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "bare_app.py"), "w") as f:
            f.write(APP)
        out = {}
        for n, (loop, http) in enumerate((("asyncio", "h11"), ("uvloop", "httptools"))):
            for m, middleware in enumerate((False, True)):
                name = f"{loop}+{http}" + (" +BaseHTTPMiddleware" if middleware else "")
                out[name] = measure(folder, loop, http, middleware, args.port + 2 * n + m, args.requests)
    print(json.dumps({"form_post_p50_ms": out, "requests": args.requests}))


if __name__ == "__main__":
    main()
