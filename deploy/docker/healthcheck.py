#!/usr/bin/env python
"""Container healthcheck of an r2vpo service: exit 0 when `GET URL` answers 2xx, else 1 (standard library
only, so it runs in any image that has Python; no curl needed).

    r2vpo-healthcheck [URL]

Without URL: `$R2VPO_HEALTHCHECK_URL`, else `http://127.0.0.1:<port>/readyz` where <port> is the value of
the one `R2VPO_<SERVICE>_PORT` variable set in the environment (compose and Kubernetes set it).
"""

from __future__ import annotations

import os
import re
import sys
import urllib.error
import urllib.request

PORT_VAR = re.compile(r"^R2VPO_[A-Z]+_PORT$")


def default_url(environ: dict[str, str]) -> str:
    if url := environ.get("R2VPO_HEALTHCHECK_URL"):
        return url
    ports = sorted({value for name, value in environ.items() if PORT_VAR.match(name)})
    if len(ports) != 1:
        raise SystemExit(f"r2vpo-healthcheck: give a URL (found ports {ports or 'none'} in R2VPO_*_PORT)")
    return f"http://127.0.0.1:{ports[0]}/readyz"


def check(url: str, timeout: float) -> tuple[bool, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    try:
        with opener.open(url, timeout=timeout) as response:
            return 200 <= response.status < 300, f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except OSError as exc:
        return False, str(exc)


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else default_url(dict(os.environ))
    healthy, detail = check(url, float(os.environ.get("R2VPO_HEALTHCHECK_TIMEOUT_S", "4")))
    if not healthy:
        print(f"unhealthy: GET {url}: {detail}", file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
