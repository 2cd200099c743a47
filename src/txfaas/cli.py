"""What the options of every txfaas twistd plugin share: ``--version``, ``--no-accel`` and
one-line errors."""

from __future__ import annotations

import sys

from twisted.python import usage

from txfaas import __version__, _accel


def version_line() -> str:
    import platform

    import twisted

    return f"txfaas {__version__} (Twisted {twisted.__version__}, Python {platform.python_version()})"


class CommandOptions(usage.Options):
    """``usage.Options`` for a plugin: ``--version`` prints txfaas's version, and a bad flag or
    value under twistd is one line naming it (twistd would print its whole usage first)."""

    def opt_version(self) -> None:
        """Print txfaas's version and exit."""
        print(version_line())
        sys.exit(0)

    def opt_no_accel(self) -> None:
        """Run the stock Twisted, pika and txredisapi paths only (also TXFAAS_ACCEL=0)."""
        _accel.disable()

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:  # not a twistd sub-command: the caller reports it
                raise
            command = self.parent.subCommand
            raise SystemExit(f"twistd {command}: {e}; see twistd {command} --help") from None
