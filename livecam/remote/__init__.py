"""Remote generation: `livecam serve` (a Ray Serve pool) and the client engine for --remote.

The client side (protocol, client, tokens) imports neither Ray nor torch; server.py does.
"""
