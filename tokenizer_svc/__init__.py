"""The tokenizer service: CPU workers between the gateway and the engines.

Each worker tokenizes prompts (chat templates included) on the way in, sends each request to
one engine replica (routing.py), and turns the engine's per-step token ids back into UTF-8-safe
text deltas with stop strings on the way out (worker.py).
"""
