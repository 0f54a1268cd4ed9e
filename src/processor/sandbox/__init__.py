"""The sandbox task API: a faithful local stand-in for the real API and OAuth2 server."""

from processor.sandbox.app import Fault, SandboxApp, SandboxState
from processor.sandbox.server import serve_asgi

__all__ = ["Fault", "SandboxApp", "SandboxState", "serve_asgi"]
