"""Talking to a trained model: the terminal chat (chat.py), and the server: an OpenAI-compatible API
(app.py, api.py) over continuous batching (engine.py), and a web chat page (static/index.html)."""
