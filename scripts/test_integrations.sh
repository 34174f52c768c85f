#!/usr/bin/env bash
# Run each integration suite, tests/integrations/NAME, in its own cached environment (scripts/integration_env.sh
# NAME), since verl and TRL cannot share cipo's main environment or each other's. Called by .ci/run.
#   bash scripts/test_integrations.sh            # every suite with a scripts/integration_envs/NAME.txt
#   bash scripts/test_integrations.sh trl        # one suite
set -euo pipefail
cd "$(dirname "$0")/.."
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  for spec in scripts/integration_envs/*.txt; do names+=("$(basename "$spec" .txt)"); done
fi
rc=0
for name in "${names[@]}"; do
  start=$(date +%s)
  venv=$(bash scripts/integration_env.sh "$name")
  echo "integrations: $name in $venv (environment ready in $(( $(date +%s) - start )) s)"
  "$venv/bin/python" -m pytest "tests/integrations/$name" -q -p no:cacheprovider || rc=1
done
exit $rc
