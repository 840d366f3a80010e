"""The aarch64 run tests' environment rule, shared by every test file that runs code under qemu
(tests/test_arm.py, test_bundle.py, test_text2img_lower.py).

Those tests need the cross toolchain and qemu from `.ci/arm_setup.sh` (the Relax VM / bundle
tests also its arm64 Python root). Without them they SKIP with the reason, which names the
script, unless BQC_REQUIRE_ARM=1 (set by `.ci/run`, which runs the setup first): then a missing
environment is a FAILURE. BQC_SKIP_ARM=1 skips them even when the environment is there.
"""
from __future__ import annotations

import os

import pytest

from bqc.errors import BqcError
import qemu


def require_arm(vm: bool = False) -> None:
    """Skip with BQC_SKIP_ARM=1, or with the reason when the toolchain + qemu (``vm``: the arm64
    Python root of the full route) are missing; BQC_REQUIRE_ARM=1 (CI) makes that a FAILURE."""
    if os.environ.get("BQC_SKIP_ARM") == "1":
        pytest.skip("BQC_SKIP_ARM=1: aarch64 run tests skipped")
    what = "arm64 Python root" if vm else "aarch64 toolchain/emulator"
    try:
        qemu.check_arm_vm_env() if vm else qemu.check_arm_run_env()
    except BqcError as e:
        msg = f"{what} missing ({e})"
        if os.environ.get("BQC_REQUIRE_ARM") == "1":
            pytest.fail(f"{msg} (BQC_REQUIRE_ARM=1 requires it)")
        pytest.skip(msg)
