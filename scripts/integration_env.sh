#!/usr/bin/env bash
# Create (once) and print the path of a cached virtual environment for an integration test suite.
#
#   bash scripts/integration_env.sh verl      # -> ~/.cache/cipo/envs/verl-<hash>/ with verl 0.9.1 + cipo
#
# verl and TRL cannot share cipo's main environment (verl pins hydra, which downgrades the antlr4 runtime that
# math-verify needs, and verl's monkey patches import classes that TRL 1.16 removed), so each suite gets its
# own venv, described by scripts/integration_envs/NAME.txt (pip requirement lines). The venv is keyed by the
# hash of that file and of this script, and lives outside the checkout (CIPO_ENV_CACHE, default
# ~/.cache/cipo/envs) so that CI's fresh clones reuse it. cipo itself is re-installed from the current checkout
# (editable, no dependencies, a few seconds) on every call, so the cached venv never holds a stale cipo.
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: integration_env.sh NAME (one of: $(ls scripts/integration_envs | sed 's/\.txt$//' | xargs))}
spec="scripts/integration_envs/$name.txt"
[ -f "$spec" ] || { echo "integration_env: no $spec" >&2; exit 2; }
PYTHON=${PYTHON:-python3}
key=$(cat "$spec" "$0" | sha256sum | cut -c1-12)
cache=${CIPO_ENV_CACHE:-$HOME/.cache/cipo/envs}
venv="$cache/$name-$key"
pipq() { "$venv/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
if [ ! -f "$venv/.complete" ]; then
  echo "integration_env: creating $venv (first use; cached afterwards)" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  "$PYTHON" -m venv "$venv"
  pipq install --quiet --upgrade pip "setuptools>=64" wheel >&2
  # torch first and pinned: the CPU wheel on this machine's disk; a bare `torch` would fetch a CUDA build.
  pipq install --quiet "torch==2.13.0" >&2
  pipq install --quiet -r "$spec" >&2
  touch "$venv/.complete"
fi
pipq install --quiet --no-deps --no-build-isolation -e . >&2
echo "$venv"
