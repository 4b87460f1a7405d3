"""Test doubles shared by several test modules (a local OpenAI-compatible server)."""
