"""A gateway on uvicorn in a thread of the test process, and a tiny model with a chat template."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import uvicorn

from helix_daemon.gateway.app import create_app
from helix_daemon.gateway.config import GatewayConfig
from tests.conftest import free_port
from tests.daemon_harness import wait_until

# A minimal ChatML-like template: the tiny tokenizer has none, and chat needs one.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def add_chat_template(model_dir: Path) -> Path:
    """Give the tiny model's saved tokenizer ``CHAT_TEMPLATE``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    return model_dir


class GatewayServer:
    """``helix gateway``'s app on a real uvicorn server (free port), its own loop and thread."""

    def __init__(self, config: GatewayConfig) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(
            create_app(config), host="127.0.0.1", port=self.port, log_level="warning",
            lifespan="on"))
        self._thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()),
                                        name=f"gateway-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> GatewayServer:
        self._thread.start()
        wait_until(lambda: self.server.started or not self._thread.is_alive(), 30,
                   "the gateway to listen")
        if not self.server.started:
            raise RuntimeError("the gateway did not start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)
