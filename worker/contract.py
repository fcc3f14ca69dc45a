"""Facts of the upstream contract, as data.

Taken from the provider's published schema and CONTRACT.md for
`alibaba/wan2.1-t2v-turbo`; `tests/test_conformance.py` checks them against the
user's reference documents. Nothing here reads those documents at run time.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BASE_URL = "https://api.aimlapi.com"
DEFAULT_MODEL = "alibaba/wan2.1-t2v-turbo"
# The provider's schema for this request names one model; the fields and
# values checked below are that model's (other Wan models differ).
MODELS = (DEFAULT_MODEL,)

RESOLUTIONS = ("480P", "720P")
ASPECT_RATIOS = ("16:9", "9:16", "1:1", "4:3", "3:4")
DEFAULT_RESOLUTION = "720P"
DEFAULT_ASPECT_RATIO = "16:9"
# The upstream's documented defaults (the provider's schema): a parameter left
# out is generated as this, so a row says what was generated, and a parameter
# spelled out at its default is the same request (one job, one charge).
DEFAULT_PARAMETERS = {"resolution": DEFAULT_RESOLUTION, "aspect_ratio": DEFAULT_ASPECT_RATIO,
                      "watermark": False, "enhance_prompt": True}


def shape_of(request: dict) -> tuple[str, str]:
    """(model, resolution) of a request: what generation times are learned per."""
    return request.get("model", ""), request.get("resolution", DEFAULT_RESOLUTION)

# Optional request fields and the Python type each must have.
OPTIONAL_FIELDS: dict[str, type] = {
    "negative_prompt": str,
    "resolution": str,
    "aspect_ratio": str,
    "seed": int,
    "watermark": bool,
    "enhance_prompt": bool,
}

# Credits a video is estimated at when the upstream does not say: the figure
# the provider's schema gives as its example of `credits_used` (CONTRACT.md:
# no price is published; the sandbox reports the same).
CREDITS_PER_VIDEO_ESTIMATE = 120000.0

# What a status GET answers for a generation the upstream does not know.
FORGOTTEN_STATUSES = frozenset({404, 410})
# HTTP statuses that refuse the account (the key, the credits), not one request.
ACCOUNT_STATUSES = frozenset({401, 403})

PENDING_STATUSES = frozenset({"queued", "generating", "waiting", "active"})
# `complete`: the word the reference document's prose uses ("If the video
# generation task status is `complete`"); read as pending, a finished video
# would never be fetched and its slot held to the hard limit (review 126).
# A success still needs its video's URL (Generation.succeeded).
SUCCESS_STATUSES = frozenset({"completed", "complete", "succeeded"})
# "error" and "failed" are named by the contract; the others are words no
# pending generation is ever called. Read as pending, an upstream's own word
# for a generation it gave up on would hold a slot until the hard limit (24 h).
# Success stays strict: an unknown word is never read as a video to fetch.
FAILURE_STATUSES = frozenset({"error", "failed", "failure", "cancelled", "canceled", "aborted",
                              "rejected", "expired", "timeout", "timed_out"})


@dataclass(frozen=True)
class Endpoint:
    """One submit/fetch path pair and its name for the prompt-expansion flag."""

    name: str
    submit_path: str
    fetch_path: str
    expansion_flag: str


ENDPOINTS = {
    "universal": Endpoint(
        "universal", "/v2/video/generations", "/v2/video/generations", "enhance_prompt"
    ),
    "legacy": Endpoint(
        "legacy",
        "/v2/generate/video/alibaba/generation",
        "/v2/generate/video/alibaba/generation",
        "enable_prompt_expansion",
    ),
}
