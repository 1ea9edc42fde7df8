"""`gpt2kit serve`: an OpenAI-compatible HTTP server with continuous batching (see cli.py, app.py, scheduler.py)."""
