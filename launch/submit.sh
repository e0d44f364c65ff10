#!/usr/bin/env bash
# Submit `tw-rl train` to a Ray cluster as a job: a thin wrapper of `tw-rl submit` (tw_rl/distributed/launch.py), which runs
#   ray job submit --address ADDR --working-dir . --runtime-env-json <launch/runtime_env.yaml> -- tw-rl train ...
# Run it from the repository root. The job server address defaults to http://127.0.0.1:8265 (a local head, or a
# cluster's head reached through `ray dashboard cluster.yaml` / an SSH tunnel); the token comes from
# RAY_AUTH_TOKEN or ~/.ray/auth_token.
#   launch/submit.sh --config launch/configs/smoke.yaml out_dir=/tmp/tw-smoke
#   launch/submit.sh --address http://127.0.0.1:8265 --no-wait --config launch/configs/wmt19_flan_t5.yaml
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if command -v tw-rl >/dev/null 2>&1; then exec tw-rl submit "$@"; fi
exec "$here/.venv/bin/tw-rl" submit "$@"
