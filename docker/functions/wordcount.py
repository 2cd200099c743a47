#!/usr/bin/env python3
"""Word count: counts the lines, words and bytes of the request body, answers JSON."""

import json
import sys

data = sys.stdin.buffer.read()
json.dump({"lines": data.count(b"\n"), "words": len(data.split()), "bytes": len(data)}, sys.stdout)
sys.stdout.write("\n")
