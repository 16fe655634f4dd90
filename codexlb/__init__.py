"""codexlb: one endpoint for many Codex/ChatGPT accounts, with conversations that survive
account switches, upstream disconnects and restarts.

Data flows one way: transport (``http_proxy``) → ``exchange`` → (``pool``, ``replay``,
``store``, ``upstream``) → pure helpers (``balancer``, ``sse``, ``payload``).
"""

__version__ = "0.1.0"
