#!/usr/bin/env python3
"""Sleep N seconds, then say so: shows exec_timeout at work.

N is the request body (``echo 3 | curl --data-binary @- ...``) or the query
(``?seconds=3``); 1 second by default.
"""

import os
import sys
import time
from urllib.parse import parse_qs

body = sys.stdin.read().strip()
query = parse_qs(os.environ.get("Http_Query", ""))
try:
    seconds = float(body or query.get("seconds", ["1"])[0])
except ValueError:
    sys.stderr.write(f"not a number of seconds: {body!r}\n")
    sys.exit(2)
time.sleep(seconds)
print(f"slept {seconds:g}s")
