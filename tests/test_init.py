"""What importing llmbuild does to the process: torch's CPU allocations on transparent huge pages."""

from __future__ import annotations

import os
import subprocess
import sys


def _thp_setting(env: dict[str, str]) -> str:
    code = "import llmbuild, os; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


def test_import_asks_torch_for_huge_pages_unless_the_user_said_otherwise():
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert _thp_setting(env).strip() == "1"
    assert _thp_setting({**env, "THP_MEM_ALLOC_ENABLE": "0"}).strip() == "0"
