"""The tokenizer service: CPU workers between the gateway and the engine.

Each worker tokenizes prompts (chat templates included) on the way in and turns the engine's
per-step token ids back into UTF-8-safe text deltas with stop strings on the way out.
"""
