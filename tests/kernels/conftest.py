"""Fixtures for the kernel tests."""

import logging

import pytest


@pytest.fixture
def ops_log(caplog, monkeypatch):
    """caplog at INFO for the dispatch point's logger ("daformer_fast.ops"), with no decision logged yet.

    Each decision is logged once per process (`utils.log_once`): a fresh record of what was logged lets a test see
    its own. caplog listens on the root logger; the trainer turns off propagation of the package logger for its own
    handlers, so a training run earlier in the same process would otherwise hide these records.
    """
    monkeypatch.setattr(logging.getLogger("daformer_fast"), "propagate", True)
    monkeypatch.setattr("daformer_fast.utils._logged", set())
    caplog.set_level(logging.INFO, logger="daformer_fast.ops")
    return caplog
