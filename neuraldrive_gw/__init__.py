"""neuraldrive-gw: the authenticating, policy-enforcing API gateway in front of Ollama."""

__version__ = "0.1.0"
