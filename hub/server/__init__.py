"""A Hub-compatible server for adapters: ``serve(root).start()`` and point ``HF_ENDPOINT`` at its ``.url``.

It stores repositories, it does not know what an adapter is: nothing here imports torch or lightning_lora.
"""

from .app import HubServer, serve

__all__ = ["HubServer", "serve"]
