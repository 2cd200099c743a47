"""The options every txfaas plugin shares: --version, one-line errors under twistd."""

from __future__ import annotations

import pytest
from twisted.python import usage

from txfaas import __version__
from txfaas.cli import CommandOptions, version_line
from txfaas.gateway import tap as gateway_tap
from txfaas.local import tap as local_tap
from txfaas.watchdog import tap as watchdog_tap
from txfaas.worker import tap as worker_tap


class Sub(CommandOptions):
    optParameters = [["size", None, None, "a size"]]

    def postOptions(self) -> None:
        if self["size"] == "huge":
            raise usage.UsageError("--size: too big")


class Top(usage.Options):
    subCommands = [["faas-thing", None, Sub, "a plugin"]]


def test_version_names_txfaas(capsys):
    with pytest.raises(SystemExit) as exit:
        Sub().parseOptions(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == version_line() + "\n"
    assert version_line().startswith(f"txfaas {__version__} (Twisted ")


@pytest.mark.parametrize(
    "options", [gateway_tap.Options, worker_tap.Options, watchdog_tap.Options, local_tap.Options]
)
def test_every_plugin_has_them(options):
    assert issubclass(options, CommandOptions)


def test_under_twistd_a_bad_value_is_one_line_naming_it():
    with pytest.raises(SystemExit) as exit:
        Top().parseOptions(["faas-thing", "--size", "huge"])
    assert exit.value.code == "twistd faas-thing: --size: too big; see twistd faas-thing --help"


def test_under_twistd_an_unknown_flag_is_one_line():
    with pytest.raises(SystemExit) as exit:
        Top().parseOptions(["faas-thing", "--nope"])
    assert exit.value.code == "twistd faas-thing: option --nope not recognized; see twistd faas-thing --help"


def test_alone_the_usage_error_reaches_the_caller():
    with pytest.raises(usage.UsageError, match="--size: too big"):
        Sub().parseOptions(["--size", "huge"])
