"""Reward worker processes import ``cipo.rewards`` once each; it must not drag torch in (~2 s per worker)."""

import subprocess
import sys


def test_rewards_import_without_torch():
    code = "import sys, cipo, cipo.rewards; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_public_names_still_resolve():
    code = ("import cipo; from cipo import PackedBatch, policy_loss, group_advantages, CIPOConfig, PolicyLossConfig;"
            "assert cipo.CORRECTION_STREAM == 1 and callable(cipo.cipo_policy_loss)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
