"""`finemoe serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the offloading engine."""
from finemoe.server.app import create_app

__all__ = ["create_app"]
