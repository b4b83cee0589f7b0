"""MPI tests: only rank 0 reports, and a test that fails on one rank aborts the job.

Otherwise the other ranks would wait forever in the next collective of the failing test (a hang
until the CI time limit instead of a red line). The failing rank prints its report first.
"""
import sys
import time

import pytest
from mpi4py import MPI


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    world = MPI.COMM_WORLD
    if report.failed and world.Get_size() > 1:
        sys.stderr.write(f"\n[rank {world.Get_rank()} of {world.Get_size()}] {item.nodeid} FAILED\n"
                         f"{report.longreprtext}\n")
        sys.stderr.flush()
        time.sleep(1.0)  # the abort tears the launcher's output forwarding down: let the report through
        world.Abort(1)


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    if MPI.COMM_WORLD.Get_rank() != 0:  # R copies of the same progress dots help nobody
        reporter = config.pluginmanager.getplugin("terminalreporter")
        if reporter is not None:
            config.pluginmanager.unregister(reporter)
