"""The sandbox task API: a faithful local stand-in for the real API and OAuth2 server."""

from processor.effects.asgi import serve_asgi
from processor.sandbox.app import Fault, SandboxApp, SandboxState

__all__ = ["Fault", "SandboxApp", "SandboxState", "serve_asgi"]
