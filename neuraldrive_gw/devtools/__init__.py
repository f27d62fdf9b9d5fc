"""Development tools: the fake Ollama server used by the tests, the benchmarks and `demo`."""
