"""``python -m services.chat``: the chat service on the shared runtime (port 50052 by default)."""

from services.runtime.server import main

from .config import ChatSettings
from .server import ChatService

if __name__ == "__main__":
    main("chat", ChatService, ChatSettings)
