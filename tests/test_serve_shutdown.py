"""`inlaid-ray serve` stops as an operator expects: SIGTERM (kill, systemd, Kubernetes) lets a
streaming request in flight finish, then the process exits 0 and leaves none of the processes it
started (Ray's GCS, raylet, workers and agents) behind. Real CLI process, real Ray, real HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import httpx
import psutil
import pytest

from inlaid_ray.serve.launcher import free_port, wait_healthy

pytestmark = pytest.mark.slow

API_KEY = "test-shutdown-key"
OUTPUT_TOKENS = 48


def test_sigterm_drains_the_request_in_flight_and_leaves_no_process(smollm2_dir, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "REDIS_URL")}  # its own Ray and Redis
    env |= {"INLAID_CACHE_DIR": str(tmp_path / "cache"), "INLAID_API_KEY": API_KEY}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "inlaid_ray.cli", "serve", "--model-dir", str(smollm2_dir), "--port", str(port),
         "--num-replicas", "1", "--device", "cpu", "--dtype", "float32", "--max-model-len", "256",
         "--num-kv-blocks", "64", "--arg", "torch_threads=1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout_s=300)
        started = psutil.Process(server.pid).children(recursive=True)
        assert started, "Ray runs in processes of its own"
        events: list[dict] = []
        errors: list[BaseException] = []
        first = threading.Event()

        def stream() -> None:
            try:
                read_stream()
            except BaseException as exc:  # noqa: BLE001 - asserted on the test's thread
                errors.append(exc)
                first.set()

        def read_stream() -> None:
            body = dict(model=smollm2_dir.name, prompt="Once upon a time", max_tokens=OUTPUT_TOKENS,
                        ignore_eos=True, temperature=0, stream=True)
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300,
                              headers={"Authorization": f"Bearer {API_KEY}"}) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        events.append(json.loads(line[len("data: "):]))
                        first.set()

        client = threading.Thread(target=stream)
        client.start()
        assert first.wait(120), "the generation did not start"
        server.send_signal(signal.SIGTERM)
        seen_at_signal = len(events)
        client.join(300)
        assert server.wait(timeout=180) == 0
        assert not errors, errors
        assert "inlaid-ray: stopped" in (tmp_path / "serve.log").read_text()
        assert events[-1]["choices"][0]["finish_reason"] == "length", events[-1]  # all OUTPUT_TOKENS came
        assert len(events) > seen_at_signal + 1  # tokens kept streaming after the signal: drained, not cut
        _, alive = psutil.wait_procs(started, timeout=60)
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
        print((tmp_path / "serve.log").read_text()[-3000:])
