#!/usr/bin/env python3
"""Echo: the request body is the response body (fork mode: stdin to stdout)."""

import shutil
import sys

shutil.copyfileobj(sys.stdin.buffer, sys.stdout.buffer)
