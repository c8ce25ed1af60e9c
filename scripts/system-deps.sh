#!/bin/sh
# System packages the tests use: headless Chromium to render the HTML report.
# Installed once, only when missing and when we may (root with apt); the
# report test skips with a clear reason otherwise.
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: installing chromium (apt)" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
        || echo "system-deps: chromium install failed; the report rendering test will be skipped" >&2
else
    echo "system-deps: chromium missing and cannot be installed here; the report rendering test will be skipped" >&2
fi
exit 0
