#!/usr/bin/env bash
# The browser test (tests/integration/test_ui.py) drives `shitate ui` in Debian's Chromium, which playwright cannot
# download here (no network but the package registries). Install it where we may; elsewhere say the test will skip.
set -uo pipefail

if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium.sh: no Chromium, and no root apt-get to install it; the browser test will be skipped" \
         "(Debian/Ubuntu: sudo apt-get install chromium)." >&2
    exit 0
fi
for attempt in 1 2; do
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; then
        exit 0
    fi
    echo "install_chromium.sh: apt-get install chromium failed (attempt $attempt)." >&2
    sleep 5
done
# A machine that can install packages but did not: fail, so the browser test is not silently skipped there.
exit 1
