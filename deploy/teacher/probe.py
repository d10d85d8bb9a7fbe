"""Teacher health probe: exit 0 only if the server answers a one-token completion with logprobs.

The image's HEALTHCHECK and the Kubernetes startup probe run it. Standard library only.
"""

import json
import os
import sys
import urllib.request

PORT = os.environ.get("TEACHER_PORT", "8080")
BODY = {"prompt": "Review: great service.\nSentiment:", "max_tokens": 1, "logprobs": 1, "temperature": 0}


def main() -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{PORT}/v1/completions", json.dumps(BODY).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=8) as response:
            choice = json.load(response)["choices"][0]
        return 0 if choice.get("logprobs", {}).get("top_logprobs") else 1
    except (OSError, ValueError, KeyError, IndexError, AttributeError) as exc:
        print(f"teacher probe failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
