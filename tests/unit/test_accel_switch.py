"""The one switch that turns every acceleration off: ``TXFAAS_ACCEL=0`` or ``--no-accel``."""

import importlib
import os

import pytest

from txfaas import _accel

TAPS = ["txfaas.gateway.tap", "txfaas.worker.tap", "txfaas.watchdog.tap", "txfaas.local.tap"]


@pytest.fixture(autouse=True)
def _fresh_switch(monkeypatch):
    monkeypatch.setenv(_accel.ENV, "1")  # restored afterwards, whatever the test sets
    _accel.reset()
    yield
    _accel.reset()


def test_accelerations_are_on_by_default():
    assert _accel.enabled() is True


@pytest.mark.parametrize("value", ["0", "false", "OFF", " no "])
def test_the_environment_turns_them_off(monkeypatch, value):
    monkeypatch.setenv(_accel.ENV, value)
    assert _accel.enabled() is False


@pytest.mark.parametrize("tap", TAPS)
def test_no_accel_on_every_process_turns_them_off_for_its_children_too(monkeypatch, tap):
    options = importlib.import_module(tap).Options()
    extra = ["--fprocess", "cat"] if tap == "txfaas.watchdog.tap" else []
    options.parseOptions(["--no-accel", *extra])
    assert _accel.enabled() is False
    assert os.environ[_accel.ENV] == "0"


def test_with_accelerations_off_no_reactor_of_ours_is_installed(monkeypatch):
    from txfaas import reactor
    from txfaas._accel import reactor as accel

    installed = []
    monkeypatch.setattr(accel, "install", lambda: installed.append(True))
    _accel.disable()
    assert reactor.prefer() is False
    assert installed == []
