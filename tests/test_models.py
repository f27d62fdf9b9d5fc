"""Model-name canonicalisation against the rules of Ollama's modelref and types/model."""

from __future__ import annotations

import pytest

from neuraldrive_gw.models import InvalidModelName, ModelRef, canonical_model, installed_names

LLAMA3 = "registry.ollama.ai/library/llama3:latest"

SAME_AS_LLAMA3 = [
    pytest.param("llama3", id="bare"),
    pytest.param("llama3:latest", id="explicit-tag"),
    pytest.param("LLAMA3:latest", id="upper-model"),
    pytest.param("LLAMA3:Latest", id="upper-tag"),
    pytest.param(" llama3\n", id="ascii-whitespace"),
    pytest.param("\u3000llama3\u00a0", id="unicode-space-trimmed-like-go"),
    pytest.param("library/llama3", id="namespace"),
    pytest.param("Library/llama3:latest", id="upper-namespace"),
    pytest.param("registry.ollama.ai/library/llama3", id="host"),
    pytest.param("REGISTRY.OLLAMA.AI/library/llama3:latest", id="upper-host"),
    pytest.param("https://registry.ollama.ai/library/llama3:latest", id="https-scheme"),
    pytest.param("HTTP://registry.ollama.ai/library/llama3", id="http-scheme-upper"),
    pytest.param("llama3:local", id="local-suffix"),
    pytest.param("llama3:latest:LOCAL", id="tag-and-local-suffix"),
]


@pytest.mark.parametrize("name", SAME_AS_LLAMA3)
def test_equivalent_spellings_share_one_key(name: str) -> None:
    ref = canonical_model(name)
    assert ref.key == LLAMA3
    assert ref.cloud is False


def lib(model: str, tag: str = "latest", cloud: bool = False) -> ModelRef:
    """A ref on the default host and namespace."""
    return ModelRef("registry.ollama.ai", "library", model, tag, cloud)


PARSED = [
    pytest.param("hf.co/u/r:q4", ModelRef("hf.co", "u", "r", "q4", False), id="hf-host"),
    pytest.param(
        "hf.co/User/Repo:Q4_K_M", ModelRef("hf.co", "user", "repo", "q4_k_m", False),
        id="hf-lowercased",
    ),
    pytest.param(
        "localhost:5000/ns/m:1.0", ModelRef("localhost:5000", "ns", "m", "1.0", False),
        id="host-port",
    ),
    pytest.param(
        "registry.ollama.ai:443/library/llama3",
        ModelRef("registry.ollama.ai:443", "library", "llama3", "latest", False),
        id="port-is-another-host",
    ),
    pytest.param("qwen2.5:7b-instruct", lib("qwen2.5", "7b-instruct"), id="dots-dashes"),
    pytest.param(
        "my_ns/my-model", ModelRef("registry.ollama.ai", "my_ns", "my-model", "latest", False),
        id="user-namespace",
    ),
    pytest.param("llama3:cloud", lib("llama3", "latest", cloud=True), id="cloud-suffix-stripped"),
    pytest.param("llama3:latest:cloud", lib("llama3", "latest", cloud=True), id="tag-then-cloud"),
    pytest.param("x:CLOUD", lib("x", "latest", cloud=True), id="cloud-suffix-upper"),
    pytest.param("x:20b-cloud", lib("x", "20b-cloud", cloud=True), id="dash-cloud-tag-kept"),
    pytest.param("X:20B-CLOUD", lib("x", "20b-cloud", cloud=True), id="dash-cloud-tag-upper"),
    pytest.param("gpt-oss:120b-cloud", lib("gpt-oss", "120b-cloud", cloud=True), id="gpt-oss-cloud"),
    pytest.param(
        "foo-cloud", lib("foo-cloud", "latest", cloud=True),
        id="untagged-dash-cloud-fails-closed",
    ),
    pytest.param(
        "foo-cloud:latest", lib("foo-cloud", "latest", cloud=True),
        id="model-dash-cloud-any-tag",
    ),
    pytest.param("foo-cloud:local", lib("foo-cloud", "latest", cloud=True), id="local-cannot-unflag"),
]


@pytest.mark.parametrize(("name", "expected"), PARSED)
def test_parts_and_cloud_flag(name: str, expected: ModelRef) -> None:
    assert canonical_model(name) == expected


INVALID = [
    pytest.param("", id="empty"),
    pytest.param(" \t\n", id="only-whitespace"),
    pytest.param("llama 3", id="inner-space"),
    pytest.param("llama3: local", id="space-before-suffix"),
    pytest.param("llama3@sha256:" + "a" * 64, id="digest"),
    pytest.param("llama%33", id="percent"),
    pytest.param("ll\u00e4ma3", id="non-ascii"),
    pytest.param("llama3\x1c", id="go-does-not-trim-file-separator"),
    pytest.param("\u200bllama3", id="zero-width-space"),
    pytest.param("a/b/c/d", id="four-parts"),
    pytest.param("https://h/a/b/c", id="four-parts-after-scheme"),
    pytest.param("https://llama3", id="scheme-without-namespace"),
    pytest.param("ftp://registry.ollama.ai/library/llama3", id="other-scheme"),
    pytest.param("://registry.ollama.ai/library/llama3", id="empty-scheme"),
    pytest.param("llama3:", id="empty-tag"),
    pytest.param(":latest", id="empty-model"),
    pytest.param("/llama3", id="empty-namespace"),
    pytest.param("llama3/", id="trailing-slash"),
    pytest.param("/library/llama3", id="empty-host"),
    pytest.param("my.ns/model", id="dot-in-namespace"),
    pytest.param("-llama3", id="bad-first-char"),
    pytest.param("llama3:.x", id="bad-tag-first-char"),
    pytest.param("m" * 81, id="model-too-long"),
    pytest.param("llama3:" + "t" * 81, id="tag-too-long"),
    pytest.param("h" * 351 + "/ns/m", id="host-too-long"),
    pytest.param("llama3:la:test", id="colon-in-model"),
    pytest.param("llama3:cloud:local", id="cloud-and-local"),
    pytest.param("llama3:local:cloud", id="local-and-cloud"),
    pytest.param("x:20b-cloud:local", id="dash-cloud-and-local"),
    pytest.param("llama3:cloud:cloud", id="cloud-twice"),
]


@pytest.mark.parametrize("name", INVALID)
def test_invalid_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidModelName):
        canonical_model(name)


def test_limits_are_inclusive() -> None:
    assert canonical_model("m" * 80).model == "m" * 80
    assert canonical_model("h" * 350 + "/ns/m").host == "h" * 350


def test_non_string_is_invalid_with_client_safe_message() -> None:
    with pytest.raises(InvalidModelName, match="^invalid model name$"):
        canonical_model(None)  # type: ignore[arg-type]


def test_conflicting_suffix_message_matches_ollama() -> None:
    with pytest.raises(InvalidModelName, match="use either :local or :cloud, not both"):
        canonical_model("x:cloud:local")


TAGS_OK = [
    pytest.param({"models": []}, {}, id="empty"),
    pytest.param(
        {"models": [{"name": "llama3:latest", "model": "llama3:latest", "size": 1}]},
        {LLAMA3: ("llama3:latest", canonical_model("llama3"))},
        id="one",
    ),
    pytest.param(
        {"models": [{"model": "hf.co/u/r:q4"}]},
        {"hf.co/u/r:q4": ("hf.co/u/r:q4", canonical_model("hf.co/u/r:q4"))},
        id="model-fallback",
    ),
    pytest.param(
        {"models": [{"name": "", "model": "llama3"}]},
        {LLAMA3: ("llama3", canonical_model("llama3"))},
        id="empty-name-falls-back",
    ),
    pytest.param(
        {"models": [{"name": "bad name"}, "junk", {"name": 5}, {"name": "llama3"}]},
        {LLAMA3: ("llama3", canonical_model("llama3"))},
        id="invalid-entries-skipped",
    ),
    pytest.param(
        {"models": [{"name": "mine:latest", "remote_host": "https://ollama.com:443", "remote_model": "gpt-oss:120b"}]},
        {
            "registry.ollama.ai/library/mine:latest": (
                "mine:latest",
                lib("mine", "latest", cloud=True),
            )
        },
        id="remote-stub-is-cloud",
    ),
    pytest.param(
        {"models": [{"name": "gpt-oss:latest"}, {"name": "gpt-oss:cloud"}]},
        {
            "registry.ollama.ai/library/gpt-oss:latest": (
                "gpt-oss:latest",
                lib("gpt-oss", "latest", cloud=True),
            )
        },
        id="collision-keeps-first-name-and-cloud",
    ),
]


@pytest.mark.parametrize(("tags", "expected"), TAGS_OK)
def test_installed_names(tags: object, expected: dict[str, tuple[str, ModelRef]]) -> None:
    assert installed_names(tags) == expected


@pytest.mark.parametrize(
    "tags",
    [
        pytest.param([], id="list"),
        pytest.param(None, id="null"),
        pytest.param({}, id="no-models"),
        pytest.param({"models": {"name": "llama3"}}, id="models-not-list"),
        pytest.param({"models": None}, id="models-null"),
    ],
)
def test_installed_names_refuses_wrong_shape(tags: object) -> None:
    with pytest.raises(ValueError):
        installed_names(tags)
