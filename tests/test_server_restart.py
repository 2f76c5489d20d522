"""Online learning survives a restart: `finemoe serve --policy finemoe --map-store PATH` learns expert maps
from served iterations, saves the store atomically at SIGTERM, and the next server starts with the same
entries (GET /health reports the policy's `store_size`)."""
from __future__ import annotations

import signal
import time

import httpx

from finemoe.models.default import DEFAULT_MODEL_NAME
from finemoe.server.process import ServerProcess

ARGS = ["--device", "cpu", "--expert-budget", "25%", "--policy", "finemoe", "--log-level", "warning"]


def settled_store_size(server, timeout_s: float = 15.0) -> int:
    """The engine thread publishes the policy's state after each batch and on idle wakeups (every 0.5 s):
    wait until two reports 0.6 s apart agree."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        state = httpx.get(server.url + "/health").json()["policy_state"]
        if "store_size" in state and state["store_size"] == last:
            return int(last)
        last = state.get("store_size")
        time.sleep(0.6)
    raise AssertionError("the server never reported a settled finemoe store_size in /health")


def test_restart_keeps_the_learned_map_store(tmp_path):
    path = tmp_path / "maps.safetensors"
    env = {"OMP_NUM_THREADS": "1"}
    with ServerProcess(ARGS + ["--map-store", str(path)], env=env) as first:
        assert settled_store_size(first) == 0 and not path.exists()
        for prompt in ("Learn this", "and this other prompt"):
            r = httpx.post(first.url + "/v1/completions", timeout=60,
                           json={"model": DEFAULT_MODEL_NAME, "prompt": prompt, "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text
        learned = settled_store_size(first)
        assert learned > 0
        first.proc.send_signal(signal.SIGTERM)   # graceful shutdown saves the store, then uvicorn
        assert first.proc.wait(60) in (0, -signal.SIGTERM)  # re-raises the signal it handled
    assert path.exists()
    with ServerProcess(ARGS + ["--map-store", str(path)], env=env) as second:
        assert settled_store_size(second) == learned

