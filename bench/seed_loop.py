"""The seed's sequential example loop, run as its own process so its RSS and
CPU are its own: submit one prompt, GET its status every `poll_s` seconds
until it is done, download the video, then the next prompt.

    python -m bench.seed_loop BASE_URL KEY COUNT POLL_S OUT_DIR TAG
Prints one JSON line: {"first_submit": ..., "stored_at": [...], "failed": n}.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import requests

from .config import MODEL

PATH = "/v2/generate/video/alibaba/generation"
PENDING = ("waiting", "active", "queued", "generating")


def generate_video(base_url: str, headers: dict, prompt: str) -> dict:
    response = requests.post(base_url + PATH, json={"model": MODEL, "prompt": prompt},
                             headers=headers)
    if response.status_code >= 400:
        print(f"Error: {response.status_code} - {response.text}", file=sys.stderr)
        return {}
    return response.json()


def wait_for_video(base_url: str, headers: dict, gen_id: str, poll_s: float) -> dict:
    while True:
        data = requests.get(base_url + PATH, params={"generation_id": gen_id},
                            headers=headers).json()
        if data.get("status") not in PENDING:
            return data
        time.sleep(poll_s)


def download(url: str, target: Path) -> None:
    with requests.get(url, stream=True) as response, open(target, "wb") as out:
        response.raise_for_status()
        for chunk in response.iter_content(1 << 20):
            out.write(chunk)


def main(base_url: str, key: str, count: int, poll_s: float, out_dir: Path, tag: str) -> dict:
    headers = {"Authorization": f"Bearer {key}"}
    out_dir.mkdir(parents=True, exist_ok=True)
    first_submit, stored_at, failed = None, [], 0
    for index in range(count):
        first_submit = first_submit or time.time()
        gen_id = generate_video(base_url, headers, f"{tag} prompt {index}: a seed loop").get("id")
        result = wait_for_video(base_url, headers, gen_id, poll_s) if gen_id else {}
        url = (result.get("video") or {}).get("url")
        if not url:
            failed += 1
            continue
        download(url, out_dir / f"{index}.mp4")
        stored_at.append(time.time())
    return {"first_submit": first_submit, "stored_at": stored_at, "failed": failed}


if __name__ == "__main__":
    base, api_key, n, poll, out, run_tag = sys.argv[1:7]
    print(json.dumps(main(base, api_key, int(n), float(poll), Path(out), run_tag)))
