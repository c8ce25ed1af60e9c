#!/bin/sh
# Run a command in a private network namespace that has only loopback, so Ray,
# the S3 server and the tests talk over 127.0.0.1 and nothing leaves the machine.
# Needs root (as in CI); elsewhere the command runs on the host network.
if [ "$(id -u)" = 0 ] && unshare -n true 2>/dev/null; then
    exec unshare -n sh -c 'ip link set lo up && exec "$0" "$@"' "$@"
fi
echo "in-netns: cannot create a network namespace (not root?); running on the host network" >&2
exec "$@"
