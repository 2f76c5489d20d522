"""`finemoe serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the offloading engine.

`create_app` is imported on first use, so the scheduler (server/scheduler.py) runs in-process without the serve
extra (benchmarks/load_test.py --in-process).
"""


def __getattr__(name: str):
    if name == "create_app":
        from finemoe.server.app import create_app
        return create_app
    raise AttributeError(f"module 'finemoe.server' has no attribute {name!r}")


__all__ = ["create_app"]
