"""txfaas._accel.raw_headers against Headers.setRawHeaders: the same headers, read back the same."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.web.http_headers import Headers

from txfaas import _accel
from txfaas import headers as hdr
from txfaas._accel import raw_headers

TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~", min_size=1
)
NAME = TOKEN.map(lambda t: hdr.canonical_name(t.encode()))
VALUE = st.binary(max_size=40).filter(lambda v: b"\r" not in v and b"\n" not in v)
PAIRS = st.lists(st.tuples(NAME, st.lists(VALUE, min_size=1, max_size=3)), max_size=8)


def test_the_probe_passes_on_this_twisted():
    assert raw_headers.probe() is True


@given(PAIRS, PAIRS)
def test_writes_read_back_as_the_stock_writes_do(first, then):
    stock, fast = Headers(), Headers()
    hdr.update_raw(stock, first)
    raw_headers.update_raw(fast, first)
    for name, values in then:
        hdr.set_raw(stock, name, values)
        raw_headers.set_raw(fast, name, values)
    assert stock == fast
    assert list(stock.getAllRawHeaders()) == list(fast.getAllRawHeaders())
    for name, _ in first + then:
        assert stock.getRawHeaders(name.lower()) == fast.getRawHeaders(name.lower())


def test_a_probe_that_fails_means_the_stock_writers(monkeypatch):
    monkeypatch.setattr(raw_headers, "probe", lambda: False)
    assert hdr.writers() == (hdr.set_raw, hdr.update_raw)


def test_accelerations_off_means_the_stock_writers(monkeypatch):
    monkeypatch.setenv(_accel.ENV, "0")
    _accel.reset()
    try:
        assert hdr.writers() == (hdr.set_raw, hdr.update_raw)
    finally:
        monkeypatch.setenv(_accel.ENV, "1")
        _accel.reset()
    assert hdr.writers() == (raw_headers.set_raw, raw_headers.update_raw)


def test_the_probe_fails_when_headers_keep_names_another_way(monkeypatch):
    """A Headers whose setRawHeaders stores lower-case names (as Twisted once did) is refused."""

    def lower(self, name, values):
        self._rawHeaders[name.lower()] = list(values)

    monkeypatch.setattr(Headers, "setRawHeaders", lower)
    assert raw_headers.probe() is False
