#!/bin/sh
# Builds the example: hello-base, then hello, whose build script validates itself.
# Needs spk, spfs and spfs-changes on PATH, and root unless the spfs-changes daemon
# runs. Extra arguments go to `spk build` (e.g. -v).
set -eu
cd "$(dirname "$0")"
spk build -L "$@" hello-base.spk.yaml
spk build -L "$@" hello.spk.yaml
