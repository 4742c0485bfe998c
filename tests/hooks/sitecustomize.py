"""Read by every Python process started with this folder on PYTHONPATH (the `pab run` subprocesses
of the tests, and the ranks torch's elastic launcher starts from them, which inherit it): installs
the faults that PAB_TEST_PAUSE / PAB_TEST_FAIL / PAB_TEST_SIGNAL ask for (`pab_faults`). Nothing otherwise."""
import os

if os.environ.get("PAB_TEST_PAUSE") or os.environ.get("PAB_TEST_FAIL") or os.environ.get("PAB_TEST_SIGNAL"):
    import pab_faults

    pab_faults.install_from_env()
