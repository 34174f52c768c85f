"""Public API surface: RewardResult, verl adapter, import weight."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cipo.rewards import RewardResult, compute_score
from cipo.rewards.verl import is_code_item

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_reward_result():
    r = RewardResult(1.0, "correct", {"a": 1})
    assert r.passed and r.score == 1.0 and r.reason == "correct" and r.details == {"a": 1}
    assert not RewardResult(0.0, "wrong_answer").passed


def test_verl_compute_score_math():
    assert compute_score("openai/gsm8k", r"so \boxed{72}", "72") == 1.0
    assert compute_score("DigitalLearningGmbH/MATH-lighteval", r"\boxed{\frac12}", "0.5", extra_info={}) == 1.0
    assert compute_score("math", "I give up", "3") == 0.0


def test_verl_compute_score_code():
    code = "```python\ndef sq(x):\n    return x * x\n```"
    tests = {"type": "assert", "tests": ["assert sq(3) == 9"]}
    assert compute_score("codecontests", code, tests) == 1.0
    assert compute_score("whatever", code, json.dumps(tests), extra_info={"timeout_s": 3}) == 1.0
    assert compute_score("codecontests", code, {"type": "assert", "tests": ["assert sq(3) == 8"]}) == 0.0


def test_is_code_item():
    assert is_code_item("x", {"type": "stdio", "cases": []})
    assert is_code_item("x", '{"inputs": ["1"], "outputs": ["1"]}')
    assert not is_code_item("gsm8k", "42")
    assert not is_code_item("x", "{1, 2, 3}")  # a set answer is not JSON tests


def test_rewards_package_imports_no_torch_and_no_math_verify():
    """Loaded without the (torch-importing) parent package: cipo.rewards itself stays light."""
    code = (
        "import importlib.util, sys, types\n"
        f"pkg = types.ModuleType('cipo'); pkg.__path__ = [{os.path.join(REPO, 'cipo')!r}]; sys.modules['cipo'] = pkg\n"
        "import cipo.rewards\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'math_verify' not in sys.modules and 'sympy' not in sys.modules, 'math-verify imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
