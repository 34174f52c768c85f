"""Tests of cipo.integrations.verl against verl 0.9.1 itself (environment: scripts/integration_env.sh verl)."""
