"""Chat backends for the triage task types (CONTRACT.md §7): OpenAI, Ollama, mock.

Each takes a `ChatRequest` (one task: messages and the strict JSON schema of the answer)
and returns a `ChatAnswer` or raises `ChatError` (a `DependencyError` with a `Fault`).
"""

from processor.effects.chat.base import ChatAnswer, ChatBackend, ChatError, ChatRequest

__all__ = ["ChatAnswer", "ChatBackend", "ChatError", "ChatRequest"]
