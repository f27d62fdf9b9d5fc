"""Redaction hooks for the prompt-log tests (`prompt_logging.redact_hook`)."""


def hide_secret_words(text: str) -> str:
    return text.replace("swordfish", "[secret]")


def explode(text: str) -> str:
    raise RuntimeError("this hook always fails")


not_callable = "just a string"
